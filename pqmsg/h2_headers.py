"""h2's check of header characters, made as fast as it is strict.

Every HTTP/2 request's header block passes through h2's
``_reject_illegal_characters`` (RFC 9113 §8.2.1: no uppercase or control
characters in names, no NUL, CR or LF in values, no whitespace around
values). h2 4.4 walks every byte of every name and value in a Python loop.
An authenticated request carries a 4,412-character ``Pqmsg-Signature``
(the base64url of an ML-DSA-65 signature), so that loop alone cost about
0.2 ms of the event loop per request, 5-6 % of a send.

:func:`apply` replaces the function with one that makes the same checks
with byte searches and byte-class regular expressions (C speed), in the
same order, raising the same :class:`h2.exceptions.ProtocolError` messages
for the same first offending byte; tests compare the two on generated header blocks. Nothing
is loosened: a header block is refused exactly when h2 would refuse it.

The patch applies only to the h2 release it was written against and only
while h2's own function is in place; otherwise h2 keeps its own check (and
the server logs that it did).
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from collections.abc import Generator, Iterable
from typing import Final

import h2.utilities
from h2.exceptions import ProtocolError

log = logging.getLogger("pqmsg.h2_headers")

#: The h2 releases whose ``_reject_illegal_characters`` this replaces.
H2_VERSIONS: Final = ("4.4.1",)

#: A name byte h2 refuses: 0x00-0x20, uppercase ASCII, 0x7f-0xff.
_BAD_NAME_BYTE = re.compile(rb"[\x00-\x20A-Z\x7f-\xff]")
#: A value byte h2 refuses: NUL, LF, CR.
_BAD_VALUE_BYTE = re.compile(rb"[\x00\n\r]")

Header = tuple[bytes, bytes]

_upstream = h2.utilities._reject_illegal_characters


def reject_illegal_characters(
    headers: Iterable[Header], hdr_validation_flags: object
) -> Generator[Header, None, None]:
    """h2's ``_reject_illegal_characters``, with regular expressions for the byte loops."""
    for header in headers:
        name = header[0]
        bad = _BAD_NAME_BYTE.search(name)
        if bad is not None:
            c = bad.group()[0]
            if 0x41 <= c <= 0x5A:
                msg = f"Received uppercase header name {name!r}."
                raise ProtocolError(msg)
            msg = f"Illegal character '{chr(c)}' in header name: {name!r}"
            raise ProtocolError(msg)

        if name.find(b":", 1) != -1:
            msg = f"Illegal character ':' in header name: {name!r}"
            raise ProtocolError(msg)

        if field_value := header[1]:
            # Three memchr scans beat one regex scan of a long value; the
            # regex finds the first bad byte only for the error message.
            if b"\r" in field_value or b"\n" in field_value or b"\x00" in field_value:
                bad = _BAD_VALUE_BYTE.search(field_value)
                assert bad is not None
                msg = f"Illegal character '{chr(bad.group()[0])}' in header value: {field_value!r}"
                raise ProtocolError(msg)
            if (
                field_value[0] == 0x20
                or field_value[0] == 0x09
                or field_value[-1] == 0x20
                or field_value[-1] == 0x09
            ):
                msg = f"Received header value surrounded by whitespace {field_value!r}"
                raise ProtocolError(msg)

        yield header


def upstream() -> object:
    """h2's own function (for tests)."""
    return _upstream


def apply() -> bool:
    """Install the fast check if h2 is a release it was written for; idempotent.

    Returns whether the patched check is in place.
    """
    current = h2.utilities._reject_illegal_characters
    if current is reject_illegal_characters:
        return True
    version = importlib.metadata.version("h2")
    if version not in H2_VERSIONS or current is not _upstream:
        log.info("h2 %s: its header character check is left as it is", version)
        return False
    h2.utilities._reject_illegal_characters = reject_illegal_characters
    return True


def revert() -> None:
    """Put h2's own function back (for tests)."""
    h2.utilities._reject_illegal_characters = _upstream
