"""The harness of the bad-input tests (``test_bad_input*.py``); it holds no tests itself.

Bad input of any kind must be a 4xx problem and change nothing stored
(PROTOCOL.md §4). pytest-trio gives every test its own event loop, so a
server cannot outlive a test: each test starts one server, builds a small
:class:`World` of accounts and walks a table of :class:`Case` rows inside
that one test (:func:`check_cases`). After every case it compares what is
stored with what was stored before the first case, two ways:

* through the API: each account's device list, each device's key counts and
  its queue of unacknowledged messages (fetched, never acknowledged);
* row by row in the server's SQLite database, for what no endpoint reads
  back (push targets, provisioning tokens, idempotency records, ratchet
  epochs). Only ``devices.last_seen_at`` is left out: authenticating a
  request records it, by design, whatever the request asks for next.

A failing test lists every case that misbehaved, not just the first.
"""

from __future__ import annotations

import base64
import copy
import json
import sqlite3
import uuid
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import h2.config
import h2.connection
import h2.events
import h11
import httpx
import pytest
import trio

from pqmsg.client import Client, Device, Identity, ProblemResponse, sign_headers
from pqmsg.client.keys import registration_body
from pqmsg.protocol import crypto
from pqmsg.protocol.b64 import b64encode
from pqmsg.settings import HttpSettings, RateLimit, Settings
from tests.support.server import RunningServer, make_settings

JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
PROBLEM_MEMBERS = ("type", "title", "status", "detail", "reason", "request_id")
MAX_BODY_BYTES = HttpSettings().max_body_bytes
# Rate limits must never answer before validation does.
UNLIMITED = RateLimit(per_s=1000.0, burst=100_000)
# Authentication records when a device was last seen, whatever the request does next.
VOLATILE_COLUMNS = frozenset({("devices", "last_seen_at")})
REMOVE = object()


def bad_input_settings(data_dir: Path) -> Settings:
    return make_settings(
        data_dir,
        limits__registration=UNLIMITED,
        limits__provisioning=UNLIMITED,
        limits__bundle=UNLIMITED,
        limits__send=UNLIMITED,
    )


# -- building bodies ------------------------------------------------------------


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def edit(obj: Any, dotted: str, value: Any = REMOVE) -> Any:
    """A deep copy of ``obj`` with the member at ``dotted`` ("a.0.b") set, or deleted."""
    out = copy.deepcopy(obj)
    *parents, last = dotted.split(".")
    target = out
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    key: Any = int(last) if last.isdigit() else last
    if value is REMOVE:
        del target[key]
    else:
        target[key] = value
    return out


def names_in(dotted: str, *, quote: bool = True) -> tuple[str, ...]:
    """How a problem detail names a member: ``messages.0.device`` -> ``messages[0]``, ``'device'``."""
    out: list[str] = []
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            out[-1] += f"[{part}]"
        else:
            out.append(f"{part!r}" if quote and i == len(parts) - 1 else part)
    return tuple(out)


def base64_variants(length: int) -> list[tuple[str, str, str]]:
    """``(label, value, detail fragment)``: each way a base64url value of ``length`` bytes is wrong."""
    # 0xfbefbe and 0xffffff encode to "----" and "____": "++++" and "////" in standard base64.
    data = (b"\xfb\xef\xbe\xff\xff\xff" * (length // 6 + 1))[:length]
    good = b64encode(data)
    padded = base64.urlsafe_b64encode(data if length % 3 else data[:-1]).decode()
    out = [
        ("padded with '='", padded, "unpadded"),
        ("standard alphabet '+/'", base64.b64encode(data).decode().rstrip("="), "alphabet"),
        (f"{length - 1} bytes", b64encode(data[:-1]), f"must decode to {length} bytes"),
        (f"{length + 1} bytes", b64encode(data + b"\0"), f"must decode to {length} bytes"),
        ("empty string", "", f"must decode to {length} bytes"),
        ("impossible length", "A" * (len(good) // 4 * 4 + 1), "length"),
        ("not ASCII", "é" + good[1:], "alphabet"),
        ("trailing newline", good + "\n", "alphabet"),
    ]
    if length % 3:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        last = alphabet[alphabet.index(good[-1]) | 1]  # set a bit the encoding leaves unused
        out.append(("non-canonical trailing bits", good[:-1] + last, "canonical"))
    return out


# -- cases ----------------------------------------------------------------------


@attrs.frozen
class Case:
    """One bad request and the problem it must get."""

    label: str
    method: str
    path: str
    body: bytes | None = None
    status: int = 400
    reason: str | None = None
    mentions: tuple[str, ...] = ()
    query: str = ""
    content_type: str | None = JSON
    signer: str | Device | None = "alice"  # a device of the world, or None: unsigned
    signed_path: str | None = None  # sign this path instead of the one sent
    problem: Mapping[str, Any] = attrs.field(factory=dict)  # further members it must carry
    http1: bool = False  # send over HTTP/1.1 instead of the SDK's HTTP/2


@attrs.frozen
class Endpoint:
    """Builds the cases of one endpoint from a valid body and its mutations."""

    method: str
    path: str
    signer: str | None = "alice"

    def case(self, label: str, body: Any, **kw: Any) -> Case:
        """A case with ``body`` (JSON-encoded unless bytes or None) and the ``Case`` fields in ``kw``."""
        raw = body if isinstance(body, bytes) or body is None else encode(body)
        kw.setdefault("signer", self.signer)
        return Case(label, self.method, self.path, raw, **kw)

    def missing(self, base: Any, dotted: str) -> Case:
        return self.case(
            f"{dotted} missing",
            edit(base, dotted),
            reason="missing_field",
            mentions=names_in(dotted),
        )

    def unknown_member(self, base: Any, parent: str = "") -> Case:
        """``base`` with a member ``surprise`` the endpoint does not know, in ``parent``."""
        dotted = f"{parent}.surprise" if parent else "surprise"
        return self.case(
            f"unknown member {dotted}",
            edit(base, dotted, 1),
            reason="unknown_field",
            mentions=(*names_in(parent, quote=False), "'surprise'"),
        )

    def wrong_types(
        self, base: Any, dotted: str, values: Sequence[Any], reason: str = "wrong_type"
    ) -> list[Case]:
        return [
            self.case(
                f"{dotted} = {value!r}",
                edit(base, dotted, value),
                reason=reason,
                mentions=names_in(dotted),
            )
            for value in values
        ]

    def out_of_range(self, base: Any, dotted: str, values: Sequence[Any]) -> list[Case]:
        return self.wrong_types(base, dotted, values, reason="out_of_range")

    def bad_base64(self, base: Any, dotted: str, length: int) -> list[Case]:
        return [
            self.case(
                f"{dotted} {label}",
                edit(base, dotted, value),
                reason="bad_base64",
                mentions=(*names_in(dotted), fragment),
            )
            for label, value, fragment in base64_variants(length)
        ]


# Path segments that are not a device id: 1 to 2**31-1 in ASCII decimal, no leading zero.
NOT_DEVICE_IDS = tuple(
    "0 -1 01 002 1.0 2.5 1e3 0x2 +2 abc self 2147483648 99999999999999999999"
    " %20 2%20 %202 2%0A %E2%91%A1 %EF%BC%92 %D9%A2".split()
)
NOT_STRINGS: tuple[Any, ...] = (None, 1, 1.5, True, [], {})
NOT_INTEGERS: tuple[Any, ...] = (None, "1", 1.5, True, [], {})
NOT_OBJECTS: tuple[Any, ...] = (None, 1, "x", True, [])
NOT_ARRAYS: tuple[Any, ...] = (None, 1, "x", True, {})


# -- the world ------------------------------------------------------------------


ACTIVE_DEVICES = ("alice", "alice2", "bob", "bob2")
# What the API shows of the world: each account's devices, each device's keys and queue.
ALL_VIEWS = (
    "alice devices",
    "bob devices",
    *(f"{name} keys" for name in ACTIVE_DEVICES),
    *(f"{name} queue" for name in ACTIVE_DEVICES),
)


@attrs.frozen
class Snapshot:
    api: Mapping[str, Any]
    rows: Mapping[str, tuple[tuple[Any, ...], ...]]

    def differences(self, later: Snapshot) -> list[str]:
        out = [
            f"API {key} changed: {self.api[key]!r:.300} -> {later.api[key]!r:.300}"
            for key in self.api
            if key in later.api and self.api[key] != later.api[key]
        ]
        for table in sorted(set(self.rows) | set(later.rows)):
            was, now = self.rows.get(table, ()), later.rows.get(table, ())
            if was != now:
                old = set(was)
                new = [row for row in now if row not in old]
                out.append(f"table {table}: {len(was)} -> {len(now)} rows, new {new!r:.300}")
        return out


def read_rows(database: Path) -> dict[str, tuple[tuple[Any, ...], ...]]:
    """Every row of every table, but the volatile columns; read-only, beside the server."""
    conn = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)
    try:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        rows = {}
        for table in tables:
            columns = [
                f'"{column}"'
                for (_, column, *_) in conn.execute(f'PRAGMA table_info("{table}")')
                if (table, column) not in VOLATILE_COLUMNS
            ]
            listed = ", ".join(columns)
            rows[table] = tuple(conn.execute(f'SELECT {listed} FROM "{table}" ORDER BY {listed}'))
        return rows
    finally:
        conn.close()


@attrs.define
class World:
    """Two accounts on one server, everything a bad request could disturb in place.

    Alice has devices 1 and 2 and a revoked device 3, a push target, and an
    unused provisioning token; Bob has devices 1 and 2. Every active device
    has prekeys and a queued message.
    """

    client: Client
    url: str
    database: Path
    devices: dict[str, Device]
    token: str
    # The same devices on an HTTP/1.1 client, to read state with: HPACK-coding
    # the 4.4 kB signature header in pure Python doubles an HTTP/2 request's cost.
    readers: dict[str, Device]

    def __getitem__(self, name: str) -> Device:
        return self.devices[name]

    async def send(self, case: Case) -> httpx.Response:
        raw = case.body or b""
        headers: dict[str, str] = {}
        if case.body is not None and case.content_type is not None:
            headers["Content-Type"] = case.content_type
        signer = self.devices[case.signer] if isinstance(case.signer, str) else case.signer
        if signer is not None:
            headers |= sign_headers(
                case.method,
                case.signed_path or case.path,
                case.query,
                raw,
                account=signer.account,
                device=signer.device,
                device_key=signer.device_key,
                now=self.client.clock(),
            )
        target = f"{case.path}?{case.query}" if case.query else case.path
        if case.http1:
            return await send_http1(self.url, case.method, target, headers, raw)
        return await self.client.http.request(case.method, target, content=raw, headers=headers)

    async def snapshot(self, views: Collection[str] = ALL_VIEWS) -> Snapshot:
        """What the API shows in ``views``, and every stored row."""
        api: dict[str, Any] = {}

        async def devices(device: Device) -> Any:
            return [(d["device"], d["name"], d["created_at"]) for d in await device.list_devices()]

        async def keys(device: Device) -> Any:
            status = await device.key_status()
            del status["signed_prekey_age_s"]  # grows with the wall clock
            return status

        async def queue(device: Device) -> Any:
            messages, more = await device.receive(limit=500)
            return [attrs.astuple(m) for m in messages], more

        readers = {"devices": devices, "keys": keys, "queue": queue}

        async def view(key: str) -> None:
            name, what = key.split(" ")
            try:
                api[key] = await readers[what](self.readers[name])
            except ProblemResponse as exc:  # a revoked or deleted device shows as such
                api[key] = f"{exc.status} {exc.reason}"

        async with trio.open_nursery() as nursery:
            for key in views:
                nursery.start_soon(view, key)
        rows = await trio.to_thread.run_sync(read_rows, self.database)
        return Snapshot(api=api, rows=rows)


async def open_world(client: Client, server: RunningServer, reader: Client) -> World:
    alice = await client.register(name="alice phone")
    alice2 = await alice.link_new_device(name="alice laptop")
    alice3 = await alice.link_new_device(name="alice old tablet")
    bob = await client.register(name="bob phone")
    bob2 = await bob.link_new_device(name="bob laptop")
    for device in (alice, alice2, bob, bob2):
        await device.upload_prekeys(ec=3, pq=3)
    await alice.revoke(alice3.device)
    await alice.set_push("fcm", "alice-phone-push-token")
    await bob.send(alice.account, {1: b"bob to alice 1", 2: b"bob to alice 2"}, pq_epochs={1: 5})
    await alice2.send(bob.account, {1: b"alice to bob 1", 2: b"alice to bob 2"}, pq_epochs={2: 7})
    token = await alice.provisioning_token()
    devices = {"alice": alice, "alice2": alice2, "alice3": alice3, "bob": bob, "bob2": bob2}
    readers = {
        name: Device(reader, d.account, d.device, d.device_key, d.identity)
        for name, d in devices.items()
    }
    return World(client, server.url, server.settings.sqlite_path, devices, token, readers)


def stranger(world: World, account: str | None = None, device: int = 1) -> Device:
    """A device the server has never seen, with a key of its own."""
    return Device(
        world.client, account or str(uuid.uuid4()), device, crypto.generate_signing_key(), None
    )


def link_body(
    world: World, *, identity: Identity | None = None, name: str | None = None
) -> dict[str, Any]:
    """A ``POST /v1/devices`` body for Alice's unused token (certified by ``identity``)."""
    identity = identity or world["alice"].identity
    assert identity is not None
    body = {
        "token": world.token,
        **registration_body(identity, crypto.generate_signing_key(), name),
    }
    del body["identity_key"]
    return body


# -- the wire -------------------------------------------------------------------


async def send_http1(
    url: str, method: str, target: str, headers: Mapping[str, str], body: bytes
) -> httpx.Response:
    """One request over a fresh HTTP/1.1 connection, written whole even if answered early.

    httpx leaves its body generator unfinished when the server answers before
    reading the whole body, and warns about it when it is collected.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method=method,
        target=target,
        headers=[("Host", host), ("Content-Length", str(len(body))), *headers.items()],
    )
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        try:
            await stream.send_all(
                conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            )
        except trio.BrokenResourceError:
            pass  # it answered and closed before reading everything: read the answer
        response, content = None, bytearray()
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                content += event.data
    assert response is not None
    return httpx.Response(
        response.status_code,
        headers=[(name.decode(), value.decode()) for name, value in response.headers],
        content=bytes(content),
    )


async def request_http2(
    url: str, method: str, path: bytes, headers: Mapping[str, str], body: bytes = b""
) -> tuple[int | None, bytes]:
    """One request over a fresh HTTP/2 connection: the status (None: stream reset) and body.

    ``path`` goes out as given, even bytes no client library would send, and
    the body as flow control allows; sending stops once the server answers.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    conn = h2.connection.H2Connection(config)
    status, content, sent, done = None, bytearray(), 0, False
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        pseudo = [(b":method", method.encode()), (b":scheme", b"http"), (b":path", path)]
        fields = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
        length = [(b"content-length", str(len(body)).encode())] if body else []
        authority = [(b":authority", f"{host}:{port}".encode())]
        conn.send_headers(sid, pseudo + authority + fields + length, end_stream=not body)
        while not done:
            while sent < len(body) and status is None:
                size = min(
                    conn.local_flow_control_window(sid),
                    conn.max_outbound_frame_size,
                    len(body) - sent,
                )
                if size <= 0:
                    break
                conn.send_data(sid, body[sent : sent + size], end_stream=sent + size == len(body))
                sent += size
            await stream.send_all(conn.data_to_send())
            data = await stream.receive_some(65_536)
            if not data:
                raise EOFError("the server closed the connection without an answer")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    content += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    done = True
        conn.close_connection()
        await stream.send_all(conn.data_to_send())
    return status, bytes(content)


# -- checking -------------------------------------------------------------------


def problem_errors(response: httpx.Response, case: Case) -> list[str]:
    """What is wrong with ``response`` as the answer to ``case`` (nothing: an empty list)."""
    if response.status_code >= 500:
        return [
            f"status {response.status_code}, expected {case.status}: a server error, see the log"
        ]
    errors = []
    if response.status_code != case.status:
        errors.append(f"status {response.status_code}, expected {case.status}")
    media_type = response.headers.get("content-type", "").split(";")[0].strip()
    if media_type != PROBLEM_JSON:
        return [*errors, f"content-type {media_type!r}, body {response.text[:120]!r}"]
    try:
        problem = response.json()
    except ValueError:
        return [*errors, f"body is not JSON: {response.text[:200]!r}"]
    if not isinstance(problem, dict):
        return [*errors, f"body is not an object: {problem!r:.200}"]
    if missing := [m for m in PROBLEM_MEMBERS if m not in problem]:
        errors.append(f"problem lacks {missing}")
    if problem.get("status") != response.status_code:
        errors.append(f"problem status {problem.get('status')!r}")
    if not str(problem.get("type", "")).startswith("https://pqmsg.dev/problems/"):
        errors.append(f"problem type {problem.get('type')!r}")
    if problem.get("request_id") != response.headers.get("x-request-id"):
        errors.append("request_id differs from X-Request-Id")
    detail = problem.get("detail")
    if not isinstance(detail, str) or not detail.strip():
        errors.append(f"empty detail {detail!r}")
        detail = ""
    if case.reason is not None and problem.get("reason") != case.reason:
        errors.append(f"reason {problem.get('reason')!r}, expected {case.reason!r}")
    errors += [
        f"detail {detail!r:.200} does not name {word!r}"
        for word in case.mentions
        if word not in detail
    ]
    errors += [
        f"problem {name} = {problem.get(name)!r}, expected {value!r}"
        for name, value in case.problem.items()
        if problem.get(name) != value
    ]
    return errors


async def misbehaving(
    world: World, cases: Sequence[Case], views: Collection[str] = ALL_VIEWS
) -> list[str]:
    """Send every case; what went wrong, one line per case (nothing: an empty list).

    Each case must get its problem and leave what is stored as it was. After
    each case the API is read only for ``views`` (those the cases aim at) and
    the database in full; after the last case, every view again.
    """
    labels = [(c.method, c.path, c.query, c.label) for c in cases]
    assert len(set(labels)) == len(labels), "case labels must be unique"
    before = await world.snapshot()
    failures = []
    for case in cases:
        response = await world.send(case)
        after = await world.snapshot(views)
        errors = problem_errors(response, case) + before.differences(after)
        if errors:
            target = f"{case.path}?{case.query}" if case.query else case.path
            failures.append(f"{case.method} {target} [{case.label}]: " + "; ".join(errors))
            before = Snapshot({**before.api, **after.api}, after.rows)  # report each change once
    if changed := before.differences(await world.snapshot()):
        failures.append("after the last case: " + "; ".join(changed))
    return failures


def report(failures: Sequence[str], cases: int) -> None:
    if failures:
        pytest.fail(
            f"{len(failures)} of {cases} bad requests misbehaved:\n" + "\n".join(failures),
            pytrace=False,
        )


async def check_cases(
    world: World, cases: Sequence[Case], views: Collection[str] = ALL_VIEWS
) -> None:
    """Fail, listing every case that misbehaved (see :func:`misbehaving`)."""
    report(await misbehaving(world, cases, views), len(cases))
