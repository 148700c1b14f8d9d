"""The signature-check helper's batch format, in memory and as a real process."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from pqmsg.protocol import crypto
from pqmsg.protocol.verify_worker import (
    COUNT,
    LENGTHS,
    MAX_BATCH,
    BadBatch,
    answer_batch,
    encode_batch,
)

KEY = crypto.generate_signing_key()
GOOD = (KEY.public_key, b"message", crypto.sign(KEY.secret_key, b"message"))
BAD = (KEY.public_key, b"message!", GOOD[2])


def test_answers_one_byte_per_check_in_order() -> None:
    stream = io.BytesIO(encode_batch([GOOD, BAD, GOOD]) + encode_batch([BAD]))
    assert answer_batch(stream) == b"\x01\x00\x01"
    assert answer_batch(stream) == b"\x00"
    assert answer_batch(stream) is None  # end of input between batches


@pytest.mark.parametrize(
    "data",
    [
        COUNT.pack(0),
        COUNT.pack(MAX_BATCH + 1),
        COUNT.pack(1) + LENGTHS.pack(2**20, 1, 1),
        COUNT.pack(1) + LENGTHS.pack(1, 2**21, 1),
        encode_batch([GOOD])[:-1],  # input ends inside a check
        encode_batch([GOOD, GOOD])[: COUNT.size + LENGTHS.size + 10],
        COUNT.pack(2) + encode_batch([GOOD])[COUNT.size :],  # one check short
        b"\x01\x00",  # inside the count
        COUNT.pack(1) + LENGTHS.pack(1, 1, 1),  # input ends where the parts begin
    ],
    ids=["empty", "too-many", "huge-key", "huge-message", "cut-check", "cut-parts", "short", "cut-count", "no-parts"],
)
def test_refuses_what_is_not_a_batch(data: bytes) -> None:
    with pytest.raises(BadBatch):
        answer_batch(io.BytesIO(data))


def run_helper(data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "pqmsg.protocol.verify_worker"], input=data, capture_output=True, timeout=60
    )


def test_the_helper_process_answers_and_exits_at_end_of_input() -> None:
    done = run_helper(encode_batch([GOOD, BAD]) + encode_batch([BAD, BAD, GOOD]))
    assert (done.returncode, done.stdout, done.stderr) == (0, b"\x01\x00\x00\x00\x01", b"")


def test_the_helper_process_exits_2_on_a_broken_batch() -> None:
    done = run_helper(encode_batch([GOOD]) + COUNT.pack(0))
    assert (done.returncode, done.stdout) == (2, b"\x01")
    assert b"a batch of 0 checks" in done.stderr
