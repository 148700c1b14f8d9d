"""The README keeps its promises: two commands first, every setting documented."""

from __future__ import annotations

import re
from pathlib import Path

from pqmsg.settings import ENVIRONMENT

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_starts_with_the_run_and_test_commands() -> None:
    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
    assert blocks[0].strip() == "python3 -m pip install . && python3 -m pqmsg serve"
    assert blocks[1].strip() == "./scripts/test.sh"
    assert README.index("```sh") < README.index("## ")


def test_every_environment_variable_is_documented() -> None:
    wildcards = [w.replace("*", ".*").replace("<LIMITER>", "[A-Z]+") for w in re.findall(r"`(PQMSG_[A-Z_<>*]+)`", README)]
    for name in ENVIRONMENT:
        assert any(re.fullmatch(w, name) for w in wildcards), f"{name} is not in the README"
