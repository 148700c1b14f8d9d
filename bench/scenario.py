"""What one operation of a scenario does, on pre-signed requests.

Operations: ``send`` (PUT /v1/messages/{next account}), ``bundle`` (GET
/v1/keys/{next account}/1), ``fetch`` (GET /v1/messages without waiting, then
an ack of what came back) and, in the mixed scenario, one long-poll loop per
account (GET /v1/messages?wait=..., then an ack). Each ciphertext starts
with an 8-byte tag, so the recipient can match a message to the moment its
send was accepted: that is the end-to-end delivery latency.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from bench import stats
from bench.h2client import MaybeProcessed, TransportError
from bench.options import Options
from bench.signer import RequestQueue, Signed, SignerPool, Spec
from bench.transport import Transport

if TYPE_CHECKING:
    from bench.streams import StreamReceiver
from pqmsg.client.session import encode_body
from pqmsg.protocol.b64 import b64encode

TAG_BYTES = 8
NO_TAG = 0  # messages queued by --prefill or --queue-depth carry no timing
SIGN_LOW_WATER_PER_PROCESS = 16
POLL_LOW_WATER = 4  # per poller: one device's polls, refilled a few at a time
POLL_REFILL = 16


@attrs.define
class Delivery:
    """Matches sends to receipts by tag, whichever is seen first."""

    accepted: dict[int, float] = attrs.field(factory=dict)
    received: dict[int, float] = attrs.field(factory=dict)

    def sent(self, tag: int, at: float) -> float | None:
        got = self.received.pop(tag, None)
        if got is None:
            self.accepted[tag] = at
            return None
        return max(0.0, got - at)  # the long poll answered before the send did

    def got(self, tag: int, at: float) -> float | None:
        sent = self.accepted.pop(tag, None)
        if sent is None:
            self.received[tag] = at
            return None
        return max(0.0, at - sent)


def tag_of(ciphertext_b64: str) -> int:
    raw = base64.urlsafe_b64decode(ciphertext_b64[:12])  # 12 chars: the first 9 bytes
    return int.from_bytes(raw[:TAG_BYTES], "big")


@attrs.frozen
class Peer:
    """One bench device, as the workload addresses it."""

    account: str
    device: int


class Workload:
    """The operations of one run, over ``clients`` (round robin) and the signer pool."""

    def __init__(
        self, opts: Options, peers: Sequence[Peer], pool: SignerPool, rec: stats.Recorder,
        clients: Sequence[Transport], poll_clients: Sequence[Transport],
    ) -> None:
        self.opts = opts
        self.peers = peers
        self.pool = pool
        self.rec = rec
        self.clients = clients
        self.poll_clients = poll_clients
        self.delivery = Delivery()
        self.receivers: Sequence[StreamReceiver] = []  # with --receive stream (set by the runner)
        self.goaway_retries = 0
        self._padding = os.urandom(max(0, opts.message_bytes - TAG_BYTES))
        self._tags = itertools.count(1)
        self._rr = itertools.count()
        self._client_rr = itertools.count()
        weights = opts.mix
        self._cycle = [kind for kind, w in weights.items() for _ in range(w)]
        low = 4 * SIGN_LOW_WATER_PER_PROCESS * pool.processes
        self.queues = {
            kind: RequestQueue(pool, self._maker(kind), low_water=low) for kind in set(self._cycle)
        }
        self.poll_queues = [
            RequestQueue(pool, self._poll_maker(j), low_water=POLL_LOW_WATER, refill=POLL_REFILL)
            for j in range(len(peers))
        ] if opts.polling else []

    # -- request specs ---------------------------------------------------------

    def _maker(self, kind: str) -> Callable[[], Spec]:
        n = len(self.peers)
        counter = itertools.count()

        def send() -> Spec:
            return self._send_spec(next(counter) % n, next(self._tags))

        def bundle() -> Spec:
            i = next(counter) % n
            to = self.peers[(i + 1) % n]
            return Spec("bundle", i, "GET", f"/v1/keys/{to.account}/{to.device}", "", b"")

        def fetch() -> Spec:
            i = next(counter) % n
            return Spec("fetch", i, "GET", "/v1/messages", f"limit={self.opts.fetch_limit}", b"")

        return {"send": send, "bundle": bundle, "fetch": fetch}[kind]

    def _send_spec(self, i: int, tag: int) -> Spec:
        ciphertext = tag.to_bytes(TAG_BYTES, "big") + self._padding
        body = {"id": str(uuid.uuid4()), "messages": [{"device": 1, "ciphertext": b64encode(ciphertext)}]}
        to = self.peers[(i + 1) % len(self.peers)]
        return Spec("send", i, "PUT", f"/v1/messages/{to.account}", "", encode_body(body), tag)

    def untimed_sends(self, count: int) -> list[Spec]:
        """Sends whose ciphertext carries no tag (queue filling, not measured)."""
        return [self._send_spec(i % len(self.peers), NO_TAG) for i in range(count)]

    async def send_untimed(self, http: Transport, signed: Signed) -> None:
        status, _ = await self._request(http, signed)
        if status != 200:
            raise RuntimeError(f"queueing a message failed with status {status}")

    def _poll_maker(self, j: int) -> Callable[[], Spec]:
        query = f"limit={self.opts.fetch_limit}&wait={self.opts.poll_wait_s}"
        return lambda: Spec("poll", j, "GET", "/v1/messages", query, b"")

    # -- operations --------------------------------------------------------------

    async def op(self, nursery: trio.Nursery, scheduled: float | None = None) -> None:
        """One operation of the mix; latency from ``scheduled`` (open loop) or its start."""
        kind = self._cycle[next(self._rr) % len(self._cycle)]
        started = trio.current_time() if scheduled is None else scheduled
        signed = await self.queues[kind].take(nursery)
        http = self.clients[next(self._client_rr) % len(self.clients)]
        status, data = await self._request(http, signed)
        done = trio.current_time()
        self.rec.add(kind, started, done - started, status)
        if kind == "send" and status == 200:
            e2e = self.delivery.sent(signed.spec.tag, done)
            if e2e is not None:
                self.rec.add(stats.E2E, done, e2e, 200)
        elif kind == "fetch" and status == 200:
            await self._ack(http, signed.spec.creds, data)

    async def poller(self, j: int, nursery: trio.Nursery) -> None:
        """Long-poll device ``j`` until cancelled, acking everything it receives."""
        http = self.poll_clients[j % len(self.poll_clients)]
        queue = self.poll_queues[j]
        while True:
            signed = await queue.take(nursery)
            started = trio.current_time()
            status, data = await self._request(http, signed)
            done = trio.current_time()
            self.rec.add(stats.POLL, started, done - started, status)
            if status != 200:
                await trio.sleep(0.1)
                continue
            for message in data.get("messages", ()):
                tag = tag_of(message["ciphertext"])
                e2e = self.delivery.got(tag, done) if tag != NO_TAG else None
                if e2e is not None:
                    self.rec.add(stats.E2E, done, e2e, 200)
            await self._ack(http, j, data)

    async def _ack(self, http: Transport, creds: int, data: dict[str, Any]) -> None:
        ids = [m["id"] for m in data.get("messages", ())]
        if not ids:
            return
        body = encode_body({"ids": ids})
        signed = await self.pool.sign_one(Spec("ack", creds, "POST", "/v1/messages/ack", "", body))
        started = trio.current_time()
        status, _ = await self._request(http, signed)
        self.rec.add(stats.ACK, started, trio.current_time() - started, status)

    async def _request(
        self, http: Transport, signed: Signed, *, retried: bool = False
    ) -> tuple[int, dict[str, Any]]:
        spec = signed.spec
        headers = list(signed.headers)
        if spec.body:
            headers.append(("content-type", "application/json"))
        try:
            status, data = await http.request(spec.method, signed.target, headers, spec.body)
        except MaybeProcessed:
            # Hypercorn closes an HTTP/2 connection with GOAWAY after
            # keep_alive_max_requests (1000) requests, and httpx fails the
            # stream it was waiting on even when the server handled it. Retry
            # once, signed afresh (the first nonce may be spent); a send is
            # idempotent by its id.
            if retried:
                return stats.TRANSPORT_ERROR, {}
            self.goaway_retries += 1
            return await self._request(http, await self.pool.sign_one(spec), retried=True)
        except TransportError:
            return stats.TRANSPORT_ERROR, {}
        if status != 200 or spec.kind not in ("fetch", "poll"):
            return status, {}
        return 200, json.loads(data)

