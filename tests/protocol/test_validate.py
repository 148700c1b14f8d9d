"""The request parser: any input is a value that meets the contract, or a 4xx problem.

Properties over arbitrary bytes and arbitrary JSON (``st.recursive``), plus
"nearly valid" bodies that get past the first checks, for the helpers in
:mod:`pqmsg.protocol.validate` and the route parsers built on them. The
strategies lean on what once got through: lone surrogates, final newlines,
integers too long to convert, JSON in UTF-16 or UTF-32.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pqmsg.errors import BadRequest, PayloadTooLarge, ProblemError, UnsupportedMediaType
from pqmsg.protocol import crypto
from pqmsg.protocol.auth import MAX_DEVICE_ID, parse_device_id
from pqmsg.protocol.b64 import b64encode
from pqmsg.protocol.validate import (
    MAX_KEY_ID,
    MAX_NAME_CHARS,
    b64_field,
    int_field,
    list_field,
    object_field,
    optional_name,
    parse_json_object,
    str_field,
    uuid_field,
    uuid_path,
)
from pqmsg.routes.keys import parse_upload
from pqmsg.routes.messages import MAX_COPIES, parse_copies
from pqmsg.storage.base import KeyUpload

MAX_PER_UPLOAD = 100
MAX_CIPHERTEXT = 64

# Any text, lone surrogates (which JSON escapes can produce) and control characters included.
any_text = st.text(
    st.characters(exclude_categories=()) | st.sampled_from("\ud800\udfff\n\x00"), max_size=20
)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(any_text, json_values, max_size=6)
JSON_MEDIA_TYPES = (
    None,
    "",
    "application/json",
    "application/json; charset=utf-8",
    "Application/JSON ;x=1",
)


def canonical_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


# A UUID as a client might get it wrong: case, hyphens, braces, extra characters.
uuid_texts = st.uuids().map(str) | st.builds(
    lambda u, how, extra: {
        "upper": u.upper(),
        "no hyphens": u.replace("-", ""),
        "braces": "{" + u + "}",
        "prefix": extra + u,
        "suffix": u + extra,
        "cut": u[: len(extra) * 3],
        "newline": u + "\n",
    }[how],
    st.uuids().map(str),
    st.sampled_from(["upper", "no hyphens", "braces", "prefix", "suffix", "cut", "newline"]),
    st.text(min_size=1, max_size=3),
)


def b64_of(size: int) -> st.SearchStrategy[str]:
    return st.binary(min_size=size, max_size=size).map(b64encode)


def _text_or(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``value``, sometimes anything at all."""
    return st.one_of(value, value, value, json_values)


# -- parse_json_object ---------------------------------------------------------------


def mutated(data: bytes, cut: int, flip: int) -> bytes:
    """``data`` truncated and with one byte changed: typical broken JSON."""
    data = data[: max(0, len(data) - cut)]
    if data and flip:
        i = flip % len(data)
        data = data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :]
    return data


bodies = st.one_of(
    st.binary(max_size=120),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(
        mutated,
        json_objects.map(lambda v: json.dumps(v).encode()),
        st.integers(0, 5),
        st.integers(0, 50),
    ),
    st.builds(
        lambda v, encoding: json.dumps(v, ensure_ascii=False).encode(encoding, "surrogatepass"),
        json_objects,
        st.sampled_from(["utf-8", "utf-16", "utf-16-le", "utf-32", "utf-8-sig"]),
    ),
    st.integers(4290, 4310).map(lambda n: b'{"n": ' + b"7" * n + b"}"),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
)


@settings(deadline=None)
@given(body=bodies, content_type=st.sampled_from(JSON_MEDIA_TYPES))
@example(body=b"\xff\xfe", content_type=None)
@example(body=b"[" * 100_000, content_type=JSON_MEDIA_TYPES[2])
def test_parse_json_object_returns_an_object_or_raises_bad_json(
    body: bytes, content_type: str | None
) -> None:
    try:
        value = parse_json_object(body, content_type)
    except BadRequest as exc:
        assert (exc.status, exc.reason) == (400, "bad_json")
        assert "body" in exc.detail
    else:
        assert isinstance(value, dict)
        body.decode("utf-8")  # RFC 8259: nothing else is JSON


@given(body=bodies, media_type=st.text(max_size=30))
def test_any_other_media_type_is_415_whatever_the_body(body: bytes, media_type: str) -> None:
    if media_type.split(";")[0].strip().lower() in ("application/json", ""):
        return
    with pytest.raises(UnsupportedMediaType) as raised:
        parse_json_object(body, media_type)
    assert raised.value.status == 415


@given(
    obj=json_objects.filter(lambda o: not _has_nan(o)),
    content_type=st.sampled_from(JSON_MEDIA_TYPES),
)
def test_every_json_object_round_trips(obj: dict[str, Any], content_type: str | None) -> None:
    assert parse_json_object(json.dumps(obj).encode(), content_type) == obj


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    return False


def test_an_integer_too_long_to_convert_is_bad_json() -> None:
    # json.loads raises a bare ValueError past sys.get_int_max_str_digits() (4300).
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_json_object(b'{"id": ' + b"1" * 5000 + b"}", "application/json")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_json_in_another_encoding_is_bad_json(encoding: str) -> None:
    # json.loads would detect and decode these; RFC 8259 §8.1 allows UTF-8 only.
    with pytest.raises(BadRequest) as raised:
        parse_json_object('{"ids": []}'.encode(encoding), "application/json")
    assert raised.value.reason == "bad_json"


# -- field helpers ---------------------------------------------------------------------


@given(value=json_values | b64_of(32) | b64_of(31) | st.text(alphabet="AB+/=-_", max_size=46))
def test_b64_field_returns_exactly_length_bytes_or_bad_request(value: Any) -> None:
    try:
        data = b64_field({"key": value}, "key", length=32)
    except BadRequest as exc:
        assert exc.reason in ("wrong_type", "bad_base64") and "'key'" in exc.detail
    else:
        assert len(data) == 32 and b64encode(data) == value


@given(data=st.binary(min_size=32, max_size=32))
def test_b64_field_decodes_what_b64encode_wrote(data: bytes) -> None:
    assert b64_field({"key": b64encode(data)}, "key", length=32) == data


@given(value=json_values | st.integers() | st.sampled_from([True, False, 1.0, -0.0]))
def test_int_field_returns_an_int_in_range_or_bad_request(value: Any) -> None:
    try:
        n = int_field({"n": value}, "n", low=1, high=1000)
    except BadRequest as exc:
        assert exc.reason in ("wrong_type", "out_of_range") and "'n'" in exc.detail
    else:
        assert type(n) is int and 1 <= n <= 1000 and n == value


@given(value=json_values | uuid_texts)
def test_uuid_field_returns_a_canonical_uuid_or_bad_request(value: Any) -> None:
    try:
        text = uuid_field({"id": value}, "id")
    except BadRequest as exc:
        assert exc.reason == "bad_uuid" and "'id'" in exc.detail
    else:
        assert canonical_uuid(text)


@given(value=uuid_texts)
def test_uuid_path_returns_a_canonical_uuid_or_bad_request(value: str) -> None:
    try:
        text = uuid_path(value, "account")
    except BadRequest as exc:
        assert exc.reason == "bad_path" and "'account'" in exc.detail
    else:
        assert canonical_uuid(text)


@given(value=json_values)
def test_string_list_and_object_fields_return_their_type_or_bad_request(value: Any) -> None:
    obj = {"f": value}
    try:
        text = str_field(obj, "f", max_chars=5)
    except BadRequest as exc:
        assert exc.reason in ("wrong_type", "out_of_range", "bad_text") and "'f'" in exc.detail
    else:
        assert isinstance(text, str) and 0 < len(text) <= 5
        text.encode("utf-8")  # storable
    try:
        items = list_field(obj, "f", max_items=2)
    except BadRequest as exc:
        assert exc.reason in ("wrong_type", "too_many") and "'f'" in exc.detail
    else:
        assert isinstance(items, list) and len(items) <= 2
    try:
        member = object_field(obj, "f")
    except BadRequest as exc:
        assert exc.reason == "wrong_type" and "'f'" in exc.detail
    else:
        assert isinstance(member, dict)


@given(value=json_values)
def test_optional_name_is_none_or_a_short_printable_string(value: Any) -> None:
    try:
        name = optional_name({"name": value})
    except BadRequest as exc:
        assert exc.reason in ("wrong_type", "out_of_range", "bad_text") and "'name'" in exc.detail
    else:
        if name is not None:
            assert len(name) <= MAX_NAME_CHARS and all(ord(c) >= 0x20 for c in name)
            name.encode("utf-8")  # storable


@pytest.mark.parametrize("parse", [lambda o: str_field(o, "name", max_chars=10), optional_name])
def test_a_lone_surrogate_is_bad_request(parse: Any) -> None:
    # The JSON escape \ud800 decodes to a lone surrogate, which UTF-8 cannot store.
    with pytest.raises(BadRequest) as raised:
        parse(json.loads(b'{"name": "\\ud800"}'))
    assert raised.value.reason == "bad_text" and "'name'" in raised.value.detail


@given(text=any_text | st.integers(-5, 2**32).map(str) | st.integers(1, 99).map(lambda n: f"{n}\n"))
def test_device_ids_are_canonical_decimals_in_range(text: str) -> None:
    try:
        device = parse_device_id(text)
    except ValueError:
        return
    assert str(device) == text and 1 <= device <= MAX_DEVICE_ID


@pytest.mark.parametrize("parse", [parse_device_id, lambda t: uuid_path(t, "account")])
def test_a_trailing_newline_is_refused(parse: Any) -> None:
    # re's $ also matches before a final newline: the patterns must match in full.
    text = "2\n" if parse is parse_device_id else str(uuid.uuid4()) + "\n"
    with pytest.raises((ValueError, BadRequest)):
        parse(text)


# -- route parsers --------------------------------------------------------------------


def signed_entries(key_bytes: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "id": _text_or(st.integers(0, MAX_KEY_ID)),
            "public_key": _text_or(b64_of(key_bytes)),
            "signature": _text_or(st.just(b64encode(bytes(crypto.SIGNATURE_BYTES)))),
        },
        optional={"surprise": json_values},
    )


ec_entries = st.fixed_dictionaries(
    {
        "id": _text_or(st.integers(0, MAX_KEY_ID)),
        "public_key": _text_or(b64_of(crypto.X25519_PUBLIC_KEY_BYTES)),
    },
    optional={"signature": json_values},
)
uploads = json_objects | st.fixed_dictionaries(
    {},
    optional={
        "signed_prekey": _text_or(signed_entries(crypto.X25519_PUBLIC_KEY_BYTES)),
        "pq_last_resort": _text_or(signed_entries(crypto.KEM_PUBLIC_KEY_BYTES)),
        "one_time_prekeys": _text_or(st.lists(_text_or(ec_entries), max_size=4)),
        "pq_one_time_prekeys": _text_or(
            st.lists(_text_or(signed_entries(crypto.KEM_PUBLIC_KEY_BYTES)), max_size=3)
        ),
        "surprise": json_values,
    },
)


# Building ML-KEM-sized keys is slow for hypothesis' taste, and the deadline flaky under load.
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=uploads)
def test_parse_upload_returns_a_well_formed_upload_or_a_4xx(body: dict[str, Any]) -> None:
    try:
        upload = parse_upload(body, MAX_PER_UPLOAD)
    except ProblemError as exc:
        assert exc.status == 400, exc
        return
    assert isinstance(upload, KeyUpload)
    for key, size in (
        (upload.signed_prekey, crypto.X25519_PUBLIC_KEY_BYTES),
        (upload.pq_last_resort, crypto.KEM_PUBLIC_KEY_BYTES),
    ):
        assert key is None or (
            len(key.public_key) == size and len(key.signature) == crypto.SIGNATURE_BYTES
        )
    keys = upload.one_time_prekeys + upload.pq_one_time_prekeys
    assert all(0 <= k.key_id <= MAX_KEY_ID for k in keys)
    assert all(
        len(k.public_key) == crypto.X25519_PUBLIC_KEY_BYTES and k.signature is None
        for k in upload.one_time_prekeys
    )
    assert all(len(k.public_key) == crypto.KEM_PUBLIC_KEY_BYTES for k in upload.pq_one_time_prekeys)


copies_entries = st.fixed_dictionaries(
    {
        "device": _text_or(st.integers(-1, MAX_DEVICE_ID + 1)),
        "ciphertext": _text_or(st.binary(max_size=MAX_CIPHERTEXT + 2).map(b64encode)),
    },
    optional={"pq_epoch": _text_or(st.integers(-1, 2**63)), "surprise": json_values},
)
sends = json_objects | st.fixed_dictionaries(
    {"messages": _text_or(st.lists(_text_or(copies_entries), max_size=4))}
)


@settings(deadline=None)
@given(body=sends)
def test_parse_copies_returns_distinct_well_formed_copies_or_a_4xx(body: dict[str, Any]) -> None:
    try:
        copies = parse_copies(body, MAX_CIPHERTEXT)
    except PayloadTooLarge as exc:
        assert exc.status == 413 and "ciphertext" in exc.detail
        return
    except ProblemError as exc:
        assert exc.status == 400, exc
        return
    assert 1 <= len(copies) <= MAX_COPIES
    assert len({c.device for c in copies}) == len(copies)
    for copy in copies:
        assert 1 <= copy.device <= MAX_DEVICE_ID
        assert 0 < len(copy.ciphertext) <= MAX_CIPHERTEXT
        assert copy.pq_epoch is None or 0 <= copy.pq_epoch < 2**63
