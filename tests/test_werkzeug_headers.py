"""Werkzeug's header value check without a regex accepts and refuses exactly as Werkzeug does."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import pytest
import werkzeug.datastructures.headers as werkzeug_headers
from hypothesis import example, given
from hypothesis import strategies as st
from werkzeug.datastructures import Headers

from pqmsg import werkzeug_headers as patch
from tests.support.server import RunningServer

UPSTREAM: Callable[[Any], str] = patch.upstream()
PATCHED = patch.str_header_value

values = (
    st.text(alphabet=st.sampled_from("ab \t\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029é"), max_size=10)
    | st.text(max_size=10)
    | st.integers()
    | st.floats(allow_nan=False)
    | st.binary(max_size=5)
)


def outcome(check: Callable[[Any], str], value: Any) -> tuple[str, object]:
    try:
        return "accepted", check(value)
    except ValueError as exc:
        return "refused", str(exc)


@given(values)
@example("A" * 4412)
@example("a\r")
@example("\nb")
@example("a\u2028b")  # a line separator to str.splitlines(), not to the check
@example(b"a\nb")  # str() of bytes has no newline byte left in it
def test_the_fast_check_accepts_and_refuses_exactly_what_werkzeug_does(value: Any) -> None:
    assert outcome(PATCHED, value) == outcome(UPSTREAM, value)


async def test_a_running_server_has_it_and_headers_still_refuse_newlines(server: RunningServer) -> None:
    assert werkzeug_headers._str_header_value is PATCHED  # applied at the server's start-up
    headers = Headers()
    headers.add("Pqmsg-Signature", "A" * 4412)
    for bad in ("a\r\nSet-Cookie: x=y", "a\nb", "a\rb"):
        with pytest.raises(ValueError, match="newline"):
            headers.add("X-Test", bad)
        with pytest.raises(ValueError, match="newline"):
            headers["X-Test"] = bad
    assert headers["Pqmsg-Signature"] == "A" * 4412


def test_apply_is_idempotent_and_revert_restores_werkzeug() -> None:
    try:
        assert patch.apply() is True
        assert patch.apply() is True
        assert werkzeug_headers._str_header_value is PATCHED
    finally:
        patch.revert()
    assert werkzeug_headers._str_header_value is UPSTREAM
    patch.apply()


def test_another_werkzeug_release_keeps_its_own_check(monkeypatch: pytest.MonkeyPatch) -> None:
    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "3.2.0" if name == "werkzeug" else real_version(name)
    )
    patch.revert()
    try:
        assert patch.apply() is False
        assert werkzeug_headers._str_header_value is UPSTREAM
    finally:
        monkeypatch.undo()
        patch.apply()
