"""Operational endpoints: liveness, health by component, metrics, OpenAPI."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Blueprint, Response

from pqmsg.openapi import openapi_document
from pqmsg.routes.common import json_response
from pqmsg.services import Services


def component_health(stats: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"status": "ok" if stats.healthy else "failing"}
    if getattr(stats, "detail", None):
        entry["detail"] = stats.detail
    for name in ("backend", "state"):
        if hasattr(stats, name):
            entry[name] = getattr(stats, name)
    providers = getattr(stats, "providers", None)
    if providers:
        entry["providers"] = {
            name: {"enabled": p.enabled, "state": p.state if p.enabled else "disabled"}
            for name, p in providers.items()
        }
    return entry


def blueprint(svc: Services) -> Blueprint:
    bp = Blueprint("ops", __name__)
    spec = openapi_document()

    @bp.get("/health/live")
    async def live() -> Response:
        return json_response({"status": "ok"})

    @bp.get("/health")
    async def health() -> Response:
        components = {name: component_health(s) for name, s in svc.component_statistics().items()}
        healthy = all(c["status"] == "ok" for c in components.values())
        return json_response(
            {"status": "ok" if healthy else "failing", "components": components},
            status=200 if healthy else 503,
        )

    @bp.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(svc.metrics.registry), content_type=CONTENT_TYPE_LATEST)

    @bp.get("/openapi.json")
    async def openapi() -> Response:
        return json_response(spec)

    return bp
