"""The OpenAPI document: valid 3.1, complete against PROTOCOL.md §5, and true to the handlers."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from pqmsg.openapi import openapi_document

# PROTOCOL.md §5, copied here on purpose: the test must not trust the module
# under test for the list of what it has to describe.
PROTOCOL_ENDPOINTS = """
POST /v1/accounts
DELETE /v1/accounts/self
POST /v1/devices/provisioning
POST /v1/devices
GET /v1/devices
DELETE /v1/devices/{device}
PUT /v1/keys
GET /v1/keys/status
GET /v1/keys/{account}/{device}
PUT /v1/messages/{account}
GET /v1/messages
POST /v1/messages/ack
PUT /v1/devices/self/push
DELETE /v1/devices/self/push
GET /v1/stream
GET /health/live
GET /health
GET /metrics
GET /openapi.json
"""
NO_AUTH = {"POST /v1/accounts", "POST /v1/devices", "GET /health/live", "GET /health",
           "GET /metrics", "GET /openapi.json"}

# PROTOCOL.md §3, verbatim.
CANONICAL_STRING = """\
PQMSG-V1
<METHOD upper case>
<path, exactly as sent, percent-encoding untouched>
<raw query string, exactly as sent, empty if none>
<account>
<device>
<timestamp>
<nonce>
<lowercase hex SHA-256 of the raw request body (of the empty string if none)>"""
AUTH_REASONS_IN_ORDER = ("malformed", "skew", "unknown_device", "revoked", "signature", "replay")
AUTH_HEADERS = {
    "Pqmsg-Account", "Pqmsg-Device", "Pqmsg-Timestamp", "Pqmsg-Nonce", "Pqmsg-Signature"
}
TAGS = {"accounts", "devices", "keys", "messages", "push", "stream", "operations"}
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
PROBLEM_JSON = "application/problem+json"


def protocol_endpoints() -> list[tuple[str, str]]:
    pairs = (line.split() for line in PROTOCOL_ENDPOINTS.strip().splitlines())
    return [(method.lower(), path) for method, path in pairs]


@pytest.fixture
def doc() -> dict[str, Any]:
    return openapi_document()


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in HTTP_METHODS
    ]


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def schema_validator(doc: dict[str, Any], name: str) -> Draft202012Validator:
    """A JSON Schema validator for ``#/components/schemas/<name>`` of the document."""
    root = {"components": doc["components"], "$ref": f"#/components/schemas/{name}"}
    return Draft202012Validator(root)


def b64(size: int, fill: int = 0xAB) -> str:
    return base64.urlsafe_b64encode(bytes([fill]) * size).rstrip(b"=").decode()


def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.1.")
    validate(doc, cls=OpenAPIV31SpecValidator)


def test_the_document_survives_a_json_round_trip(doc: dict[str, Any]) -> None:
    # Tuples or other non-JSON values would come back different (or not at all).
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc


def test_each_call_builds_a_fresh_document() -> None:
    # ops.py keeps one; a caller that edits its copy must not change the next one.
    expected = json.dumps(openapi_document())
    _wipe(openapi_document())
    assert json.dumps(openapi_document()) == expected


def _wipe(node: Any) -> None:
    children = list(node.values()) if isinstance(node, dict) else node
    if isinstance(node, dict | list):
        for child in children:
            _wipe(child)
        node.clear()


@pytest.mark.parametrize(("method", "path"), protocol_endpoints())
def test_every_protocol_endpoint_is_described(doc: dict[str, Any], method: str, path: str) -> None:
    assert method in doc["paths"].get(path, {}), f"{method.upper()} {path} is missing"


def test_nothing_outside_the_protocol_is_described(doc: dict[str, Any]) -> None:
    described = {(method, path) for method, path, _ in operations(doc)}
    assert described == set(protocol_endpoints())


def test_every_operation_has_a_unique_id_a_summary_and_a_known_tag(doc: dict[str, Any]) -> None:
    ids = [op["operationId"] for _, _, op in operations(doc)]
    assert all(ids) and len(set(ids)) == len(ids)
    for method, path, op in operations(doc):
        assert op["summary"], (method, path)
        assert op["tags"] and set(op["tags"]) <= TAGS, (method, path)
    assert {tag["name"] for tag in doc["tags"]} == TAGS


def test_every_operation_that_takes_input_declares_a_4xx(doc: dict[str, Any]) -> None:
    for method, path, op in operations(doc):
        if op.get("parameters") or op.get("requestBody"):
            codes = [code for code in op["responses"] if code.startswith("4")]
            assert codes, f"{method.upper()} {path} takes input but lists no 4xx"


def test_authenticated_operations_require_the_five_headers(doc: dict[str, Any]) -> None:
    schemes = doc["components"]["securitySchemes"]
    for method, path, op in operations(doc):
        if f"{method.upper()} {path}" in NO_AUTH:
            assert op["security"] == [], (method, path)
            continue
        [requirement] = op["security"]
        assert {schemes[name]["name"] for name in requirement} == AUTH_HEADERS
        params = {resolve(doc, p)["name"] for p in op["parameters"]}
        assert params >= AUTH_HEADERS, (method, path)
        assert "401" in op["responses"], (method, path)


def test_the_canonical_string_and_check_order_are_documented(doc: dict[str, Any]) -> None:
    text = doc["components"]["securitySchemes"]["PqmsgSignature"]["description"]
    assert CANONICAL_STRING in text
    positions = [text.index(f"`{reason}`") for reason in AUTH_REASONS_IN_ORDER]
    assert positions == sorted(positions)
    auth_problem = schema_validator(doc, "AuthProblem")
    assert auth_problem.is_valid(_problem(401, reason="replay"))
    assert not auth_problem.is_valid(_problem(401, reason="forgot"))


def _problem(status: int, **extra: Any) -> dict[str, Any]:
    return {"type": "https://pqmsg.dev/problems/x", "title": "X", "status": status,
            "detail": "d", "reason": "r", "request_id": "abc", **extra}


def test_errors_are_problem_json_and_retryable_ones_carry_retry_after(doc: dict[str, Any]) -> None:
    for method, path, op in operations(doc):
        for code, response in op["responses"].items():
            if not code.startswith(("4", "5")):
                continue
            response = resolve(doc, response)
            assert PROBLEM_JSON in response["content"], (method, path, code)
            if code in ("429", "503"):
                retry_after = resolve(doc, response["headers"]["Retry-After"])
                # A failing /health answers 503 with its own body and no Retry-After.
                assert retry_after.get("required", False) is (path != "/health"), (method, path)


def test_device_mismatch_lists_missing_and_extra_devices(doc: dict[str, Any]) -> None:
    response = resolve(doc, doc["paths"]["/v1/messages/{account}"]["put"]["responses"]["409"])
    name = response["content"][PROBLEM_JSON]["schema"]["$ref"].rsplit("/", 1)[1]
    mismatch = schema_validator(doc, name)
    assert mismatch.is_valid(_problem(409, reason="device_mismatch", missing=[2], extra=[]))
    assert not mismatch.is_valid(_problem(409, reason="device_mismatch", missing=[2]))


def test_a_real_registration_body_matches_and_bad_encodings_do_not(doc: dict[str, Any]) -> None:
    register = schema_validator(doc, "RegisterRequest")
    body = {"identity_key": b64(1952), "device_key": b64(1952), "device_certificate": b64(3309),
            "proof": b64(3309), "name": "phone"}
    assert register.is_valid(body)
    assert not register.is_valid({**body, "proof": b64(3308)})  # wrong decoded size
    padded = base64.urlsafe_b64encode(bytes(1952)).decode()
    assert padded.endswith("=") and not register.is_valid({**body, "identity_key": padded})
    standard = b64(1952, fill=0xFB).replace("-", "+").replace("_", "/")
    assert "+" in standard or "/" in standard
    assert not register.is_valid({**body, "device_key": standard})
    assert not register.is_valid({**body, "colour": "blue"})


def test_key_and_message_sizes_match_the_protocol(doc: dict[str, Any]) -> None:
    upload = schema_validator(doc, "KeyUpload")
    assert upload.is_valid({})
    signed = {"id": 1, "public_key": b64(1184), "signature": b64(3309)}
    assert upload.is_valid({"pq_last_resort": signed, "pq_one_time_prekeys": [signed],
                            "signed_prekey": {**signed, "public_key": b64(32)},
                            "one_time_prekeys": [{"id": 2, "public_key": b64(32)}]})
    assert not upload.is_valid({"signed_prekey": signed})  # a KEM key is no X25519 key
    assert not upload.is_valid({"one_time_prekeys": [{"id": 1, "public_key": b64(32)}] * 101})
    send = schema_validator(doc, "SendRequest")
    copy = {"device": 1, "ciphertext": b64(256 * 1024)}
    assert send.is_valid({"id": "0b7e5f3c-9a1d-4c2e-8f00-1234567890ab", "messages": [copy]})
    too_big = {**copy, "ciphertext": b64(256 * 1024 + 1)}
    assert not send.is_valid({"id": "0b7e5f3c-9a1d-4c2e-8f00-1234567890ab", "messages": [too_big]})


def test_fetch_query_limits(doc: dict[str, Any]) -> None:
    params = {p["name"]: p["schema"] for p in doc["paths"]["/v1/messages"]["get"]["parameters"]
              if "name" in p}
    def bounds(name: str) -> tuple[int, int, int]:
        return params[name]["minimum"], params[name]["maximum"], params[name]["default"]

    assert bounds("limit") == (1, 500, 100)
    assert bounds("wait") == (0, 30, 0)


def test_the_stream_describes_its_upgrade_and_frames(doc: dict[str, Any]) -> None:
    op = doc["paths"]["/v1/stream"]["get"]
    assert "101" in op["responses"]
    assert '{"type": "message"' in op["description"]
    assert '{"type": "ack", "ids": [...]}' in op["description"]
    assert schema_validator(doc, "StreamAckFrame").is_valid(
        {"type": "ack", "ids": ["0b7e5f3c-9a1d-4c2e-8f00-1234567890ab"]}
    )
