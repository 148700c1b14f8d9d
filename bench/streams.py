"""Receiving by WebSocket stream (``--receive stream``): one ``GET /v1/stream`` per account.

Each bench device opens its stream before the run's clock starts: RFC 8441
over HTTP/2 by default, an HTTP/1.1 upgrade with ``--http1``, each on a
connection of its own (as the SDK's :func:`pqmsg.client.stream.open_stream`
does), the upgrade signed like a ``GET`` by the signer pool. A message that
arrives is matched to its send by its tag (end-to-end delivery, as for long
polls) and acknowledged on the stream. One ``ack`` frame is in flight per
stream at a time; it carries every id received since the previous one, so
a busy stream acks in batches, as a long poll's ack does. Its latency, from
sending the frame to the server's ``acked`` (which comes once the removal
is durable), is the ``stream_ack`` endpoint.

A stream the server closes (draining, ``slow_consumer``...) is counted as a
``stream_closed`` error with the close code as its status and opened again,
signed afresh. A stream that cannot open before the run starts fails the
run: the target does not carry streams, so there is nothing to measure.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager

import attrs
import httpx
import trio

from bench import stats
from bench.options import Options
from bench.scenario import NO_TAG, Delivery, tag_of
from bench.signer import SignerPool, Spec
from pqmsg.client.session import ProblemResponse
from pqmsg.client.ws_h1 import open_h1_transport
from pqmsg.client.ws_h2 import open_h2_transport
from pqmsg.client.ws_transport import STREAM_PATH, StreamClosed, StreamUnsupported, Transport

#: The most ids one ack frame may carry (PROTOCOL §5).
MAX_ACK_IDS = 500
#: Pause before opening a closed stream again.
REOPEN_DELAY_S = 0.1
PONG_FRAME = '{"type":"pong"}'
#: What a stream that failed to open or broke raises, besides a close.
OPEN_ERRORS = (StreamClosed, StreamUnsupported, ProblemResponse, OSError, httpx.HTTPError)


def ssl_context_for(url: str, *, insecure: bool) -> ssl.SSLContext | None:
    """The TLS context for an ``https://`` target (None for h2c / plain HTTP)."""
    if not url.startswith("https://"):
        return None
    ctx = ssl.create_default_context()
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@attrs.define
class StreamReceiver:
    """The stream of one bench device (``creds`` indexes the signer pool's credentials)."""

    creds: int
    url: str
    opts: Options
    pool: SignerPool
    rec: stats.Recorder
    delivery: Delivery
    reopened: int = 0
    _pending: list[str] = attrs.field(factory=list)
    _ack_sent: float | None = None

    def _open(self, headers: dict[str, str]) -> AbstractAsyncContextManager[Transport]:
        opener = open_h1_transport if self.opts.http1 else open_h2_transport
        return opener(httpx.URL(self.url), headers, ssl_context_for(self.url, insecure=self.opts.insecure))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the stream (``started`` once it is open), then receive and ack until cancelled."""
        opened = False
        while True:
            signed = await self.pool.sign_one(Spec("stream", self.creds, "GET", STREAM_PATH, "", b""))
            try:
                async with self._open(dict(signed.headers)) as transport:
                    if not opened:
                        opened = True
                        task_status.started()
                    else:
                        self.reopened += 1
                    await self._receive(transport)
            except OPEN_ERRORS as exc:
                if not opened:
                    raise RuntimeError(f"stream of bench device {self.creds} did not open: {exc}") from exc
                code = exc.code if isinstance(exc, StreamClosed) else stats.TRANSPORT_ERROR
                self.rec.add(stats.STREAM_CLOSED, trio.current_time(), 0.0, code)
            # Ids received on a closed stream were not acked there: they come again.
            self._pending.clear()
            self._ack_sent = None
            await trio.sleep(REOPEN_DELAY_S)

    async def _receive(self, transport: Transport) -> None:
        while True:
            frame = json.loads(await transport.receive())
            now = trio.current_time()
            kind = frame.get("type")
            if kind == "message":
                tag = tag_of(frame["ciphertext"])
                e2e = self.delivery.got(tag, now) if tag != NO_TAG else None
                if e2e is not None:
                    self.rec.add(stats.E2E, now, e2e, 200)
                self._pending.append(frame["id"])
            elif kind == "acked" and self._ack_sent is not None:
                self.rec.add(stats.STREAM_ACK, self._ack_sent, now - self._ack_sent, 200)
                self._ack_sent = None
            elif kind == "ping":
                await transport.send(PONG_FRAME)
            if self._pending and self._ack_sent is None:
                ids, self._pending = self._pending[:MAX_ACK_IDS], self._pending[MAX_ACK_IDS:]
                self._ack_sent = trio.current_time()
                await transport.send(json.dumps({"type": "ack", "ids": ids}))


def receivers(
    opts: Options, url: str, pool: SignerPool, rec: stats.Recorder, delivery: Delivery, count: int,
) -> Sequence[StreamReceiver]:
    """One receiver per bench device."""
    return [StreamReceiver(j, url, opts, pool, rec, delivery) for j in range(count)]
