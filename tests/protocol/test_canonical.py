import hashlib

from hypothesis import given
from hypothesis import strategies as st

from pqmsg.protocol.canonical import SignedRequest, canonical_string

ASCII_PATH = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60)


def test_matches_the_protocol_example_layout() -> None:
    req = SignedRequest(
        "put", "/v1/messages/0f8fad5b-d9cb-469f-a165-70867728950e", "", "0f8fad5b-d9cb-469f-a165-70867728950e",
        2, 1700000000, "abcdefghijklmnop", b'{"a":1}',
    )
    lines = canonical_string(req).decode().split("\n")
    assert lines == [
        "PQMSG-V1",
        "PUT",
        "/v1/messages/0f8fad5b-d9cb-469f-a165-70867728950e",
        "",
        "0f8fad5b-d9cb-469f-a165-70867728950e",
        "2",
        "1700000000",
        "abcdefghijklmnop",
        hashlib.sha256(b'{"a":1}').hexdigest(),
    ]


def test_empty_body_hashes_the_empty_string_and_no_trailing_newline() -> None:
    req = SignedRequest("GET", "/v1/devices", "", "a", 1, 1, "n" * 16, b"")
    text = canonical_string(req)
    assert text.endswith(hashlib.sha256(b"").hexdigest().encode())
    assert not text.endswith(b"\n")


@given(
    method=st.sampled_from(["GET", "PUT", "POST", "DELETE"]),
    path=ASCII_PATH,
    query=ASCII_PATH,
    device=st.integers(1, 2**31 - 1),
    timestamp=st.integers(0, 10**12),
    body=st.binary(max_size=64),
)
def test_every_part_is_one_line_and_changes_the_string(
    method: str, path: str, query: str, device: int, timestamp: int, body: bytes
) -> None:
    base = SignedRequest(method, path, query, "acct", device, timestamp, "n" * 16, body)
    text = canonical_string(base)
    assert text.count(b"\n") == 8
    for changed in (
        SignedRequest(method, path + "x", query, "acct", device, timestamp, "n" * 16, body),
        SignedRequest(method, path, query + "x", "acct", device, timestamp, "n" * 16, body),
        SignedRequest(method, path, query, "acct", device + 1, timestamp, "n" * 16, body),
        SignedRequest(method, path, query, "acct", device, timestamp + 1, "n" * 16, body),
        SignedRequest(method, path, query, "acct", device, timestamp, "n" * 16, body + b"x"),
    ):
        assert canonical_string(changed) != text
