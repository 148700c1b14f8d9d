import base64

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
