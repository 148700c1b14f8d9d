"""Operational endpoints, request ids, problem+json and route-template metrics."""

from __future__ import annotations

import httpx
import trio

from pqmsg.client import Client
from tests.support.server import RunningServer


async def get(server: RunningServer, path: str, **kwargs: object) -> httpx.Response:
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=server.url, http1=False, http2=True) as http:
            return await http.get(path, **kwargs)  # type: ignore[arg-type]


async def test_health_names_every_component(server: RunningServer) -> None:
    response = await get(server, "/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert {"storage", "audit", "limiter", "replay", "push", "notifier"} <= set(body["components"])
    assert body["components"]["storage"]["backend"] == "sqlite"


async def test_request_id_is_generated_or_echoed(server: RunningServer) -> None:
    generated = await get(server, "/health/live")
    assert len(generated.headers["x-request-id"]) >= 16
    echoed = await get(server, "/health/live", headers={"X-Request-Id": "client-chosen-123"})
    assert echoed.headers["x-request-id"] == "client-chosen-123"
    unsafe = await get(server, "/health/live", headers={"X-Request-Id": "bad id\twith spaces"})
    assert unsafe.headers["x-request-id"] != "bad id\twith spaces"


async def test_unknown_path_is_problem_json(server: RunningServer) -> None:
    response = await get(server, "/v1/nothing-here", headers={"X-Request-Id": "trace-me-12345"})
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 404 and body["reason"] == "not_found"
    assert body["request_id"] == "trace-me-12345"


async def test_metrics_use_route_templates_not_raw_paths(server: RunningServer, client: Client) -> None:
    alice = await client.register()
    bob = await client.register()
    await alice.send(bob.account, {1: b"x"})
    text = (await get(server, "/metrics")).text
    assert 'route="/v1/messages/{account}"' in text
    assert bob.account not in text
    for name in (
        "pqmsg_http_requests_total", "pqmsg_http_request_duration_seconds_bucket",
        "pqmsg_http_in_flight_requests", "pqmsg_auth_rejects_total", "pqmsg_rate_limit_rejects_total",
        "pqmsg_registrations_total", "pqmsg_device_revocations_total", "pqmsg_messages_stored_total",
        "pqmsg_messages_delivered_total", "pqmsg_messages_acked_total", "pqmsg_pq_ratchet_advances_total",
        "pqmsg_pq_last_resort_served_total", "pqmsg_signed_prekey_stale_devices",
        "pqmsg_push_requests_total", "pqmsg_push_circuit_state", "pqmsg_audit_queue_depth",
        "pqmsg_audit_events_total", "pqmsg_audit_dropped_total", "pqmsg_nursery_tasks",
        "pqmsg_db_pool_connections",
    ):
        assert name in text, name
    assert "pqmsg_registrations_total 2.0" in text
    assert "pqmsg_messages_stored_total 1.0" in text


async def test_openapi_is_served(server: RunningServer) -> None:
    response = await get(server, "/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    assert spec["openapi"].startswith("3.1")
    assert "/v1/messages/{account}" in spec["paths"]
