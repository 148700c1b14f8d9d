"""A signature-check helper: ``python -m pqmsg.protocol.verify_worker``.

:mod:`pqmsg.nurseries.verifier` starts these and talks to each over its
stdin and stdout. The helper reads a batch, checks every signature with
:func:`pqmsg.protocol.crypto.verifies` and answers one byte per check, in
order: ``1`` verified, ``0`` did not. A batch is::

    u32 count, then count times: u32 key length, u32 message length,
    u32 signature length, key, message, signature     (little-endian)

The helper exits 0 at end of input (the server closed its side, or died),
and 2 on a batch it cannot parse. It ignores SIGINT: a Ctrl-C in the
server's terminal reaches the whole process group, and the server, not the
terminal, decides when its helpers stop.
"""

from __future__ import annotations

import signal
import struct
import sys
from typing import BinaryIO

from pqmsg.protocol import crypto

COUNT = struct.Struct("<I")
LENGTHS = struct.Struct("<III")
#: The most checks in one batch, and the largest parts of one check. The
#: server never sends more; anything larger is a broken stream.
MAX_BATCH = 1024
MAX_KEY_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_SIGNATURE_BYTES = 64 * 1024


def encode_batch(checks: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """One batch of (key, message, signature) checks, as the helper reads it."""
    parts = [COUNT.pack(len(checks))]
    for key, message, signature in checks:
        parts += (LENGTHS.pack(len(key), len(message), len(signature)), key, message, signature)
    return b"".join(parts)


class BadBatch(Exception):
    """The input is not a well-formed batch."""


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    """``size`` bytes; :class:`BadBatch` if the input ends first."""
    data = stream.read(size)
    if len(data) != size:
        raise BadBatch("input ended inside a batch")
    return data


def answer_batch(stream: BinaryIO) -> bytes | None:
    """Read one batch and check it: one answer byte per check, or None at end of input."""
    header = stream.read(COUNT.size)
    if not header:
        return None  # end of input between batches
    if len(header) != COUNT.size:
        raise BadBatch("input ended inside a batch")
    (count,) = COUNT.unpack(header)
    if not 0 < count <= MAX_BATCH:
        raise BadBatch(f"a batch of {count} checks")
    answers = bytearray(count)
    for index in range(count):
        key_len, message_len, signature_len = LENGTHS.unpack(_read_exactly(stream, LENGTHS.size))
        if key_len > MAX_KEY_BYTES or message_len > MAX_MESSAGE_BYTES or signature_len > MAX_SIGNATURE_BYTES:
            raise BadBatch("a check larger than any the server sends")
        parts = _read_exactly(stream, key_len + message_len + signature_len)
        key = parts[:key_len]
        message = parts[key_len : key_len + message_len]
        signature = parts[key_len + message_len :]
        answers[index] = 1 if crypto.verifies(key, message, signature) else 0
    return bytes(answers)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    try:
        while (answers := answer_batch(source)) is not None:
            sink.write(answers)
            sink.flush()
    except BadBatch as exc:
        print(f"pqmsg verify helper: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        pass  # the server went away mid-answer
    return 0


if __name__ == "__main__":
    sys.exit(main())
