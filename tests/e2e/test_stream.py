"""WebSocket delivery (``GET /v1/stream``) from a real server, over HTTP/1.1 and HTTP/2."""

from __future__ import annotations

import json
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
import trio_websocket
import trustme
from prometheus_client.parser import text_string_to_metric_families

from pqmsg.client import Client, Device, ProblemResponse, sign_headers
from pqmsg.client.stream import StreamClosed, StreamUnsupported, open_stream
from pqmsg.client.ws_h1 import open_websocket
from pqmsg.client.ws_h2 import open_h2_transport
from pqmsg.protocol.b64 import b64encode
from pqmsg.settings import Settings
from tests.support.postgres import create_throwaway_database, drop_throwaway_database
from tests.support.process import two_replicas
from tests.support.server import RunningServer, make_settings, running_server

#: Real seconds of idleness before the mock clock jumps: the server's SQLite
#: thread and loopback sockets get real time, the timers virtual time.
THREAD_PATIENCE_S = 1.0
TRANSPORTS = [pytest.param(False, id="http1"), pytest.param(True, id="http2")]


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=THREAD_PATIENCE_S)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Short stream timers, and no 1 s audit fsync timer.

    Under the patient clock every timer deadline costs a second of real time.
    """
    return make_settings(
        tmp_path / "data",
        audit__fsync_interval_s=3600.0,
        stream__ping_interval_s=2.0,
        stream__idle_timeout_s=5.0,
        stream__send_timeout_s=3.0,
        stream__ack_timeout_s=3.0,
    )


def upgrade_headers(device: Device, query: str = "") -> dict[str, str]:
    return sign_headers(
        "GET",
        "/v1/stream",
        query,
        b"",
        account=device.account,
        device=device.device,
        device_key=device.device_key,
        now=time.time(),
    )


@asynccontextmanager
async def raw_stream(
    server: RunningServer, headers: dict[str, str], target: str = "/v1/stream"
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A bare WebSocket client: it sends what the test says and answers no ping."""
    async with open_websocket(httpx.URL(server.url), headers, None, target=target) as ws:
        yield ws


async def next_message(ws: trio_websocket.WebSocketConnection) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = json.loads(await ws.get_message())
        if frame["type"] == "message":
            return frame


async def close_of(ws: trio_websocket.WebSocketConnection) -> trio_websocket.CloseReason:
    """Read (and drop) frames until the server closes; return its close."""
    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
        while True:
            await ws.get_message()
    assert closed.value.reason is not None
    return closed.value.reason


async def metric(client: Client, name: str, **labels: str) -> float:
    text = (await client.http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def pair(client: Client) -> tuple[Device, Device]:
    return await client.register(), await client.register()


@pytest.mark.parametrize("http2", TRANSPORTS)
async def test_the_backlog_comes_first_then_live_messages_then_acks(
    client: Client, http2: bool
) -> None:
    with trio.fail_after(30):
        alice, bob = await pair(client)
        for text in (b"1", b"2", b"3"):
            await alice.send(bob.account, {1: text}, pq_epochs={1: 7})
        async with open_stream(bob, http2=http2) as stream:
            backlog = [await stream.receive() for _ in range(3)]
            await alice.send(bob.account, {1: b"4"})
            live = await stream.receive()  # not one of the three again
            assert await stream.ack([m.id for m in [*backlog, live]]) == 4
        assert await bob.receive() == ([], False)
        delivered = await metric(client, "pqmsg_messages_delivered_total")
        acked = await metric(client, "pqmsg_messages_acked_total")
    assert [m.ciphertext for m in [*backlog, live]] == [b"1", b"2", b"3", b"4"]
    assert (backlog[0].sender_account, backlog[0].sender_device) == (alice.account, 1)
    assert (backlog[0].pq_epoch, live.pq_epoch) == (7, None)
    assert (delivered, acked) == (4.0, 4.0)


async def test_unacknowledged_messages_come_again_on_the_next_stream(client: Client) -> None:
    with trio.fail_after(30):
        alice, bob = await pair(client)
        await alice.send(bob.account, {1: b"acked"})
        await alice.send(bob.account, {1: b"not acked"})
        async with open_stream(bob) as stream:
            first = [await stream.receive() for _ in range(2)]
            await stream.ack([first[0].id])
        async with open_stream(bob, http2=True) as stream:
            again = await stream.receive()
            await alice.send(bob.account, {1: b"new"})
            new = await stream.receive()
    assert again.id == first[1].id
    assert new.ciphertext == b"new"


async def test_the_upgrade_is_authenticated_and_refused_with_problem_json(
    server: RunningServer, client: Client
) -> None:
    with trio.fail_after(30):
        alice, bob = await pair(client)
        forged = Device(client, bob.account, bob.device, alice.device_key, None)
        refused: list[ProblemResponse] = []
        for http2 in (False, True):
            with pytest.raises(ProblemResponse) as signature:
                async with open_stream(forged, http2=http2):
                    pass
            refused.append(signature.value)
        headers = upgrade_headers(bob)
        async with raw_stream(server, headers):
            pass
        with pytest.raises(ProblemResponse) as replay:
            async with raw_stream(server, headers):
                pass
        with pytest.raises(ProblemResponse) as query:
            async with raw_stream(server, upgrade_headers(bob, "x=1"), "/v1/stream?x=1"):
                pass
        signatures = await metric(client, "pqmsg_auth_rejects_total", reason="signature")
        replays = await metric(client, "pqmsg_auth_rejects_total", reason="replay")
    for problem in refused:
        assert (problem.status, problem.reason) == (401, "signature")
        assert problem.problem["type"] == "https://pqmsg.dev/problems/auth"
        assert problem.problem["request_id"] == problem.headers["x-request-id"]
    assert (replay.value.status, replay.value.reason) == (401, "replay")
    assert (query.value.status, query.value.reason) == (400, "bad_query")
    assert (signatures, replays) == (2.0, 1.0)


@pytest.mark.parametrize("http2", TRANSPORTS)
async def test_revoking_a_device_closes_its_stream_at_once(client: Client, http2: bool) -> None:
    with trio.fail_after(30):
        primary = await client.register()
        laptop = await primary.link_new_device()
        async with open_stream(laptop, http2=http2) as stream:
            await primary.revoke(laptop.device)
            with trio.fail_after(1), pytest.raises(StreamClosed) as closed:
                await stream.receive()
        with pytest.raises(ProblemResponse) as again:
            async with open_stream(laptop, http2=http2):
                pass
    assert (closed.value.code, closed.value.reason) == (4001, "revoked")
    assert (again.value.status, again.value.reason) == (401, "revoked")


async def test_deleting_the_account_closes_its_streams(client: Client) -> None:
    with trio.fail_after(30):
        primary = await client.register()
        laptop = await primary.link_new_device()
        async with open_stream(laptop) as stream:
            await primary.delete_account()
            with trio.fail_after(1), pytest.raises(StreamClosed) as closed:
                await stream.receive()
    assert (closed.value.code, closed.value.reason) == (4001, "revoked")


async def test_a_new_stream_of_the_same_device_replaces_the_old_one(client: Client) -> None:
    with trio.fail_after(30):
        alice, bob = await pair(client)
        async with open_stream(bob) as old, open_stream(bob, http2=True) as new:
            with pytest.raises(StreamClosed) as replaced:
                await old.receive()
            await alice.send(bob.account, {1: b"to the new one"})
            message = await new.receive()
    assert (replaced.value.code, replaced.value.reason) == (4002, "replaced")
    assert message.ciphertext == b"to the new one"


NOT_ACKS = [
    pytest.param(b"\x00", 1003, "unsupported", id="binary"),
    pytest.param("not json", 1008, "bad_frame: not JSON", id="not-json"),
    pytest.param("[]", 1008, "bad_frame: a frame must be a JSON object", id="array"),
    pytest.param('{"type":"nack"}', 1008, "bad_frame: unknown frame type 'nack'", id="type"),
    pytest.param('{"type":"ack","ids":[],"all":true}', 1008, "bad_frame: an ack", id="fields"),
    pytest.param('{"type":"ack","ids":["1"]}', 1008, "bad_frame: 'ids' must", id="not-uuid"),
    pytest.param(
        json.dumps({"type": "ack", "ids": ["0b7e5f3c-9a1d-4c2e-8f00-1234567890ab"] * 501}),
        1008,
        "bad_frame: 'ids' must be a list of at most 500",
        id="501-ids",
    ),
    pytest.param(" " * 65_537, 1009, "too_big", id="too-big"),
]


@pytest.mark.parametrize(("frame", "code", "reason"), NOT_ACKS)
async def test_a_frame_that_breaks_the_protocol_closes_the_stream_and_acks_nothing(
    server: RunningServer, client: Client, frame: str | bytes, code: int, reason: str
) -> None:
    with trio.fail_after(30):
        alice, bob = await pair(client)
        await alice.send(bob.account, {1: b"still queued"})
        async with raw_stream(server, upgrade_headers(bob)) as ws:
            await next_message(ws)
            await ws.send_message(frame)
            closed = await close_of(ws)
        messages, _ = await bob.receive()
    assert closed.code == code
    assert (closed.reason or "").startswith(reason)
    assert [m.ciphertext for m in messages] == [b"still queued"]


async def test_the_server_pings_and_closes_a_silent_stream(
    server: RunningServer, client: Client, patient_clock: trio.testing.MockClock
) -> None:
    stream_settings = server.settings.stream
    with trio.fail_after(600):
        alice, bob = await pair(client)
        async with raw_stream(server, upgrade_headers(bob)) as ws:
            opened = trio.current_time()
            pings: list[float] = []
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    assert json.loads(await ws.get_message()) == {"type": "ping"}
                    pings.append(trio.current_time() - opened)
            silent_for = trio.current_time() - opened
        # A client that answers pings (the SDK does) stays open.
        async with open_stream(bob) as stream:
            await trio.sleep(stream_settings.idle_timeout_s + stream_settings.ping_interval_s)
            await alice.send(bob.account, {1: b"still open"})
            message = await stream.receive()
    assert pings == pytest.approx([2.0, 4.0], abs=0.01)
    assert silent_for == pytest.approx(5.0, abs=0.01)
    assert closed.value.reason is not None
    assert (closed.value.reason.code, closed.value.reason.reason) == (4004, "idle_timeout")
    assert message.ciphertext == b"still open"


@pytest.mark.parametrize("http2", TRANSPORTS)
async def test_acks_open_the_window_and_a_consumer_too_slow_is_disconnected(
    settings: Settings, patient_clock: trio.testing.MockClock, http2: bool
) -> None:
    settings = settings.replace("stream.max_unacked", 2)
    ack_timeout_s = settings.stream.ack_timeout_s
    with trio.fail_after(600):
        async with running_server(settings) as server, Client(server.url) as client:
            alice, bob = await pair(client)
            for text in (b"1", b"2", b"3"):
                await alice.send(bob.account, {1: text})
            async with open_stream(bob, http2=http2) as stream:
                window = [await stream.receive(), await stream.receive()]
                held_from = trio.current_time()
                with pytest.raises(StreamClosed) as closed:
                    await stream.receive()  # "3" waits behind the window: no ack comes
                held_for = trio.current_time() - held_from
            async with open_stream(bob, http2=http2) as stream:
                again = [await stream.receive(), await stream.receive()]
                await stream.ack([again[0].id])
                third = await stream.receive()
    assert [m.ciphertext for m in window] == [b"1", b"2"]
    assert (closed.value.code, closed.value.reason) == (4003, "slow_consumer")
    assert held_for == pytest.approx(ack_timeout_s, abs=0.01)
    assert [m.id for m in again] == [m.id for m in window]
    assert third.ciphertext == b"3"


async def test_a_peer_that_stops_reading_gets_no_more_than_the_window(
    settings: Settings, patient_clock: trio.testing.MockClock
) -> None:
    settings = settings.replace("stream.max_unacked_bytes", 64 * 1024)
    texts = [bytes([i]) * 30_000 for i in range(6)]  # two fit the window
    with trio.fail_after(600):
        async with running_server(settings) as server, Client(server.url) as client:
            alice, bob = await pair(client)
            for text in texts:
                await alice.send(bob.account, {1: text})
            url, headers = httpx.URL(server.url), upgrade_headers(bob)
            async with open_h2_transport(url, headers, None) as ws:
                await trio.sleep(settings.stream.ack_timeout_s + 1)  # read nothing for a while
                frames = []
                with pytest.raises(StreamClosed) as closed:
                    while True:
                        frames.append(json.loads(await ws.receive()))
            queued = []
            async with open_stream(bob) as stream:
                for _ in texts:
                    queued.append(await stream.receive())
                    await stream.ack([queued[-1].id])
    messages = [f["ciphertext"] for f in frames if f["type"] == "message"]
    assert messages == [b64encode(t) for t in texts[:2]]
    assert (closed.value.code, closed.value.reason) == (4003, "slow_consumer")
    assert [m.ciphertext for m in queued] == texts


async def test_a_streaming_device_gets_no_push(
    server: RunningServer, client: Client, patient_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(600):
        alice, bob = await pair(client)
        await bob.set_push("fcm", "bob-phone")  # no provider is configured: push is off
        async with raw_stream(server, upgrade_headers(bob)) as ws:
            await alice.send(bob.account, {1: b"while streaming"})
            assert (await next_message(ws))["ciphertext"] == b64encode(b"while streaming")
            assert (await close_of(ws)).code == 4004  # it never answered a ping
        await alice.send(bob.account, {1: b"after the stream"})
        streaming = await metric(client, "pqmsg_push_skipped_total", reason="streaming")
        push_off = await metric(client, "pqmsg_push_skipped_total", reason="push_off")
    assert streaming == 1.0  # the first message: the stream delivered it
    assert push_off == 1.0  # the second: no stream, and push is not configured


@pytest.mark.parametrize("http2", TRANSPORTS)
async def test_the_drain_closes_streams_going_away_and_loses_no_message(
    tmp_path: Path, http2: bool
) -> None:
    settings = make_settings(tmp_path / "data")
    with trio.fail_after(60):
        async with running_server(settings) as server, Client(server.url) as client:
            alice, bob = await pair(client)
            await alice.send(bob.account, {1: b"acked"})
            await alice.send(bob.account, {1: b"not acked"})
            async with open_stream(bob, http2=http2) as stream:
                first, second = await stream.receive(), await stream.receive()
                await stream.ack([first.id])
                server.stop.set()
                with pytest.raises(StreamClosed) as closed:
                    await stream.receive()
        async with running_server(settings) as again, Client(again.url) as client:
            bob_again = Device(client, bob.account, bob.device, bob.device_key, bob.identity)
            left, _ = await bob_again.receive()
    assert (closed.value.code, closed.value.reason) == (1001, "going_away")
    assert [m.id for m in left] == [second.id]


async def test_open_streams_are_bounded(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", stream__max_streams=1)
    with trio.fail_after(30):
        async with running_server(settings) as server, Client(server.url) as client:
            alice, bob = await pair(client)
            async with open_stream(alice):
                with pytest.raises(ProblemResponse) as full:
                    async with open_stream(bob):
                        pass
            async with open_stream(bob):
                pass
    assert (full.value.status, full.value.reason) == (503, "overloaded")
    assert int(full.value.headers["retry-after"]) >= 1


@pytest.mark.parametrize("http2", TRANSPORTS)
async def test_streams_over_tls_negotiate_the_protocol_by_alpn(tmp_path: Path, http2: bool) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    settings = make_settings(tmp_path / "data", http__certfile=certfile, http__keyfile=keyfile)
    context, streams = ssl.create_default_context(), ssl.create_default_context()
    ca.configure_trust(context)
    ca.configure_trust(streams)
    streams.set_alpn_protocols(["h2" if http2 else "http/1.1"])  # httpx sets its own on context
    with trio.fail_after(30):
        async with running_server(settings) as server, Client(server.url, verify=context) as client:
            alice, bob = await pair(client)
            await alice.send(bob.account, {1: b"over TLS"})
            async with open_stream(bob, http2=http2, ssl_context=streams) as stream:
                message = await stream.receive()
            streams.set_alpn_protocols(["http/1.1" if http2 else "h2"])
            with pytest.raises(StreamUnsupported):
                async with open_stream(bob, http2=http2, ssl_context=streams):
                    pass
    assert server.url.startswith("https://")
    assert message.ciphertext == b"over TLS"


@pytest.fixture
def replica_env() -> Iterator[dict[str, str]]:
    url = create_throwaway_database()
    try:
        yield {
            "PQMSG_DATABASE_URL": url,
            "PQMSG_REDIS_URL": "redis://127.0.0.1:6379/0",
            "PQMSG_REDIS_PREFIX": f"pqmsg-test-{secrets.token_hex(4)}:",
        }
    finally:
        drop_throwaway_database(url)


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.slow
async def test_a_stream_on_one_replica_gets_sends_and_revocations_from_another(
    tmp_path: Path, replica_env: dict[str, str]
) -> None:
    with trio.fail_after(90):
        async with two_replicas(tmp_path, replica_env) as (_a, _b, on_a, on_b):
            alice = await on_b.register()
            primary = await on_b.register()
            laptop = await primary.link_new_device()
            laptop_on_a = Device(on_a, laptop.account, laptop.device, laptop.device_key, None)
            async with open_stream(laptop_on_a, http2=True) as stream:
                await alice.send(laptop.account, {1: b"for the phone", 2: b"via B"})
                with trio.fail_after(5):
                    message = await stream.receive()
                await primary.revoke(laptop.device)
                with trio.fail_after(5), pytest.raises(StreamClosed) as closed:
                    await stream.receive()
    assert message.ciphertext == b"via B"
    assert (closed.value.code, closed.value.reason) == (4001, "revoked")
