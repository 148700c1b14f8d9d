"""Unexpected failures are a bare 500: the detail goes to the log, never to the client."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import trio

from pqmsg.app import create_app
from pqmsg.client import Client
from pqmsg.server import open_services
from tests.support.server import make_settings


async def test_unknown_error_is_a_bare_500_logged_with_its_request_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path / "data")
    with trio.fail_after(30):
        async with open_services(settings) as services:
            app = create_app(services)
            transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
            async with Client("http://pqmsg.test", http=httpx.AsyncClient(transport=transport, base_url="http://pqmsg.test")) as client:
                alice = await client.register()

                async def broken(account: str) -> object:
                    raise RuntimeError("secret internal detail")

                services.storage.db.list_devices = broken  # type: ignore[method-assign]
                with caplog.at_level(logging.ERROR, logger="pqmsg.app"):
                    response = await client.http.get(
                        "/v1/devices",
                        headers={**_signed(alice), "X-Request-Id": "trace-500-abcdef"},
                    )
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == {
        "type": "about:blank", "title": "Internal Server Error", "status": 500, "request_id": "trace-500-abcdef",
    }
    assert b"secret" not in response.content
    assert "trace-500-abcdef" in caplog.text and "secret internal detail" in caplog.text


def _signed(device: object) -> dict[str, str]:
    from pqmsg.client import sign_headers

    return sign_headers(
        "GET", "/v1/devices", "", b"", account=device.account, device=device.device,  # type: ignore[attr-defined]
        device_key=device.device_key, now=device.client.clock(),  # type: ignore[attr-defined]
    )
