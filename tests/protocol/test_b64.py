import base64
import binascii
import re
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pqmsg.protocol.b64 import Base64Error, b64decode, b64encode


@given(st.binary(max_size=200))
def test_round_trip(data: bytes) -> None:
    text = b64encode(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert b64decode(text) == data


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("YWJj=", "unpadded"),
        ("YWI=", "unpadded"),
        ("a+/b", "alphabet"),
        ("YWJjZ", "length"),
        ("YR", "canonical"),  # 'R' carries non-zero trailing bits
        ("YW Jj", "alphabet"),
    ],
)
def test_rejects_padding_alphabet_length_and_non_canonical(text: str, message: str) -> None:
    with pytest.raises(Base64Error, match=message):
        b64decode(text)


def test_exact_and_maximum_length() -> None:
    text = b64encode(b"x" * 32)
    assert b64decode(text, length=32) == b"x" * 32
    with pytest.raises(Base64Error, match="must decode to 31 bytes"):
        b64decode(text, length=31)
    with pytest.raises(Base64Error, match="longer than 16 bytes"):
        b64decode(text, max_length=16)


@given(st.text(max_size=40))
def test_never_raises_anything_but_base64error(text: str) -> None:
    try:
        data = b64decode(text)
    except Base64Error:
        return
    assert base64.urlsafe_b64encode(data).rstrip(b"=").decode() == text


# The decoder as it was before the alphabet and canonical checks were made
# cheaper: a regex for the alphabet, a full re-encode for canonical form. Kept
# here only as the oracle the faster one must agree with, error for error.
_REFERENCE_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")


def reference_b64decode(
    text: str, *, length: int | None = None, max_length: int | None = None
) -> bytes:
    if not isinstance(text, str):
        raise Base64Error("must be a base64url string")
    if max_length is not None and len(text) > (max_length * 4 + 2) // 3:
        raise Base64Error(f"longer than {max_length} bytes")
    if "=" in text:
        raise Base64Error("must be unpadded base64url (no '=')")
    if not _REFERENCE_ALPHABET.fullmatch(text):
        raise Base64Error("must use the base64url alphabet (A-Z a-z 0-9 - _)")
    if len(text) % 4 == 1:
        raise Base64Error("is not a valid base64url length")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise Base64Error("is not valid base64url") from exc
    if b64encode(data) != text:
        raise Base64Error("is not canonical base64url")
    if length is not None and len(data) != length:
        raise Base64Error(f"must decode to {length} bytes, got {len(data)}")
    return data


Decoder = Callable[..., bytes]


def _outcome(
    decode: Decoder, text: object, length: int | None, max_length: int | None
) -> tuple[object, object]:
    """The decoded bytes, or the exception's type and message: any difference counts."""
    try:
        return "ok", decode(text, length=length, max_length=max_length)
    except Exception as exc:
        return type(exc), str(exc)


def _agrees(text: object, length: int | None = None, max_length: int | None = None) -> None:
    expected = _outcome(reference_b64decode, text, length, max_length)
    assert _outcome(b64decode, text, length, max_length) == expected, (text, length, max_length)


URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Characters just outside the alphabet, or easily mistaken for it.
NEAR_ALPHABET = "+/=.! \t\n\r\x00\x7féÀ\uff10\uff21\uff0d\uff3f\u00a0\u2028\U0001f600"
sizes = st.none() | st.integers(min_value=0, max_value=80)


@st.composite
def perturbed_encodings(draw: st.DrawFn) -> str:
    """A valid encoding of random bytes with one to four characters changed, added or removed."""
    text = b64encode(draw(st.binary(max_size=60)))
    pool = URL_ALPHABET + NEAR_ALPHABET
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["last", "any", "append", "drop", "insert"]))
        if how == "append" or not text:
            text += draw(st.sampled_from(pool))
            continue
        at = len(text) - 1 if how == "last" else draw(st.integers(0, len(text) - 1))
        if how == "drop":
            text = text[:at] + text[at + 1 :]
        elif how == "insert":
            text = text[:at] + draw(st.sampled_from(pool)) + text[at:]
        else:
            text = text[:at] + draw(st.sampled_from(pool)) + text[at + 1 :]
    return text


@given(st.text(max_size=80), sizes, sizes)
def test_agrees_with_reference_on_any_text(
    text: str, length: int | None, max_length: int | None
) -> None:
    _agrees(text, length, max_length)


@given(st.text(alphabet=URL_ALPHABET, max_size=120), sizes, sizes)
def test_agrees_with_reference_on_alphabet_text(
    text: str, length: int | None, max_length: int | None
) -> None:
    _agrees(text, length, max_length)


@given(st.text(alphabet=URL_ALPHABET + NEAR_ALPHABET, max_size=40), sizes, sizes)
def test_agrees_with_reference_near_the_alphabet(
    text: str, length: int | None, max_length: int | None
) -> None:
    _agrees(text, length, max_length)


@given(perturbed_encodings(), sizes, sizes)
def test_agrees_with_reference_on_perturbed_encodings(
    text: str, length: int | None, max_length: int | None
) -> None:
    _agrees(text, length, max_length)


@given(st.binary(max_size=100), st.data())
def test_agrees_with_reference_on_every_last_character(data: bytes, draw: st.DataObject) -> None:
    text = b64encode(data)[:-1]
    if len(text) % 4 == 1:
        return
    for last in URL_ALPHABET:
        _agrees(text + last, draw.draw(sizes), draw.draw(sizes))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "A",
        "AA",
        "AQ",
        "AR",
        "AAA",
        "AAE",
        "AAF",
        "é",
        "éAAA",
        "\uff21" * 4,
        "AA\n",
        "AAAA\n",
        " AAAA",
        "AA==",
        "=",
        "a+/b",
        "a+b",
        "a/bc",
        "YW Jj",
        "\x00AAA",
        "AAAA" * 1000,
        "AAAA    AA",
        "AA\nAA\r\nAAAA\tAA",
        "AA!!!!AQ",
    ],
)
def test_agrees_with_reference_on_edge_cases(text: str) -> None:
    _agrees(text)
    _agrees(text, length=0, max_length=0)
    _agrees(text, length=2, max_length=3)


@pytest.mark.parametrize("text", [b"AAAA", None, 1234, ["AAAA"]])
def test_agrees_with_reference_on_non_strings(text: object) -> None:
    _agrees(text)
