"""Typed access to JSON request bodies, with a clear 400 for every mistake.

Every function names the offending field in its error ``detail`` so a client
author can tell what to fix. Nothing here touches storage: handlers validate
the whole request before they change anything.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pqmsg.errors import BadRequest, UnsupportedMediaType
from pqmsg.protocol.b64 import Base64Error, b64decode

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_NAME_CHARS = 64
MAX_KEY_ID = 2**63 - 1

Obj = dict[str, Any]


def parse_json_object(body: bytes, content_type: str | None) -> Obj:
    """The body as a JSON object; 415 for another media type, 400 if not an object."""
    if content_type is not None and content_type.split(";")[0].strip().lower() not in (
        "application/json",
        "",
    ):
        raise UnsupportedMediaType("the body must be application/json")
    try:
        text = body.decode("utf-8")  # RFC 8259 §8.1: UTF-8 only (json.loads would guess UTF-16/32)
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8", reason="bad_json") from None
    try:
        value = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and integers longer than Python converts
        raise BadRequest(f"the body is not valid JSON: {exc}", reason="bad_json") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply", reason="bad_json") from None
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object", reason="bad_json")
    return value


def reject_unknown(obj: Obj, allowed: set[str], where: str = "body") -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise BadRequest(f"{where} has unknown field {unknown[0]!r}", reason="unknown_field")


def field(obj: Obj, name: str, where: str = "") -> Any:
    if name not in obj:
        raise BadRequest(f"missing field {where}{name!r}", reason="missing_field")
    return obj[name]


def b64_field(
    obj: Obj, name: str, *, length: int | None = None, max_length: int | None = None, where: str = ""
) -> bytes:
    value = field(obj, name, where)
    if not isinstance(value, str):
        raise BadRequest(f"{where}{name!r} must be a base64url string", reason="wrong_type")
    try:
        return b64decode(value, length=length, max_length=max_length)
    except Base64Error as exc:
        raise BadRequest(f"{where}{name!r} {exc}", reason="bad_base64") from None


def int_field(obj: Obj, name: str, *, low: int, high: int, where: str = "") -> int:
    value = field(obj, name, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{where}{name!r} must be an integer", reason="wrong_type")
    if not low <= value <= high:
        raise BadRequest(f"{where}{name!r} must be between {low} and {high}", reason="out_of_range")
    return value


def optional_int(obj: Obj, name: str, *, low: int, high: int, where: str = "") -> int | None:
    if obj.get(name) is None:
        return None
    return int_field(obj, name, low=low, high=high, where=where)


def _encodable(value: str, name: str) -> None:
    """JSON escapes can produce lone surrogates, which no UTF-8 store accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{name!r} is not valid Unicode text", reason="bad_text") from None


def optional_name(obj: Obj, name: str = "name") -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name!r} must be a string", reason="wrong_type")
    _encodable(value, name)
    if len(value) > MAX_NAME_CHARS or any(ord(c) < 0x20 for c in value):
        raise BadRequest(
            f"{name!r} must be at most {MAX_NAME_CHARS} printable characters",
            reason="out_of_range",
        )
    return value


def str_field(obj: Obj, name: str, *, max_chars: int, where: str = "") -> str:
    value = field(obj, name, where)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{where}{name!r} must be a non-empty string", reason="wrong_type")
    if len(value) > max_chars:
        raise BadRequest(f"{where}{name!r} is longer than {max_chars} characters", reason="out_of_range")
    _encodable(value, where + name)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise BadRequest(f"{where}{name!r} must not contain control characters", reason="bad_text")
    return value


def uuid_field(obj: Obj, name: str, where: str = "") -> str:
    value = field(obj, name, where)
    if not isinstance(value, str) or not UUID_RE.fullmatch(value):
        raise BadRequest(f"{where}{name!r} must be a lowercase hyphenated UUID", reason="bad_uuid")
    return value


def object_field(obj: Obj, name: str, where: str = "") -> Obj:
    value = field(obj, name, where)
    if not isinstance(value, dict):
        raise BadRequest(f"{where}{name!r} must be a JSON object", reason="wrong_type")
    return value


def list_field(obj: Obj, name: str, *, max_items: int, where: str = "") -> list[Any]:
    value = field(obj, name, where)
    if not isinstance(value, list):
        raise BadRequest(f"{where}{name!r} must be a JSON array", reason="wrong_type")
    if len(value) > max_items:
        raise BadRequest(f"{where}{name!r} has more than {max_items} items", reason="too_many")
    return value


def uuid_path(value: str, name: str) -> str:
    """A path parameter that must be an account UUID."""
    if not UUID_RE.fullmatch(value):
        raise BadRequest(f"path parameter {name!r} must be a lowercase hyphenated UUID", reason="bad_path")
    return value
