"""Cost of the header checks on one authenticated request's header block (h2, Werkzeug).

``python -m bench.header_checks``: times h2's ``_reject_illegal_characters``
and Werkzeug's ``_str_header_value`` as released and as replaced by
:mod:`pqmsg.h2_headers` and :mod:`pqmsg.werkzeug_headers`, on the header
block of a signed send (a real ML-DSA-65 signature, base64url), with
``timeit`` (best of 7 repeats). Microseconds per request.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

import h2.utilities

from pqmsg import h2_headers, werkzeug_headers
from pqmsg.client import sign_headers
from pqmsg.protocol import crypto

FLAGS = h2.utilities.HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
ACCOUNT = "0b6f0d55-6a43-4a8e-9d0e-2f6a3c1d9e11"


def header_block() -> list[tuple[bytes, bytes]]:
    path = f"/v1/messages/{ACCOUNT}"
    signed = sign_headers(
        "PUT", path, "", b"{}", account=ACCOUNT, device=1, device_key=crypto.generate_signing_key(),
        now=1_700_000_000,
    )
    block = [(b":method", b"PUT"), (b":scheme", b"http"), (b":authority", b"127.0.0.1:8080"),
             (b":path", path.encode()), (b"content-type", b"application/json"),
             (b"content-length", b"420")]
    return block + [(name.lower().encode(), value.encode()) for name, value in signed.items()]


def per_call_us(call: Callable[[], object], number: int = 2000) -> float:
    return min(timeit.repeat(call, number=number, repeat=7)) / number * 1e6


def main() -> None:
    block = header_block()
    values = [value.decode("latin-1") for _, value in block if not _.startswith(b":")]
    rows = [
        ("h2 _reject_illegal_characters, h2 4.4.1", lambda: list(h2_headers.upstream()(block, FLAGS))),  # type: ignore[operator]
        ("h2 check, pqmsg.h2_headers", lambda: list(h2_headers.reject_illegal_characters(block, FLAGS))),
        ("werkzeug _str_header_value, 3.1.9", lambda: [werkzeug_headers.upstream()(v) for v in values]),
        ("werkzeug check, pqmsg.werkzeug_headers", lambda: [werkzeug_headers.str_header_value(v) for v in values]),
    ]
    longest = max(len(value) for _, value in block)
    print(f"one signed send: {len(block)} header fields, the longest {longest} bytes")
    for name, call in rows:
        print(f"{name:45s} {per_call_us(call):8.2f} us")


if __name__ == "__main__":
    main()
