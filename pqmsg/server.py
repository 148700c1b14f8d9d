"""The composition root: open every service, then serve; drain in reverse.

::

    serve(settings)
    └── signature verifier           checks in helper processes (auto: on PostgreSQL, one if a CPU is spare)
        └── trio-asyncio loop        (only with PostgreSQL or Redis)
            └── redis client         (only with PQMSG_REDIS_URL)
                └── storage          database pool / SQLite thread, cleanup loops
                    └── audit writer bounded queue -> append-only JSONL
                        └── rate limiter + replay cache (+ admission: both in one step)
                            └── notifier (wake-ups, cross-replica bus)
                                └── push dispatcher (breakers, bounded queue)
                                    └── Hypercorn (HTTP/1.1, h2c, h2 over TLS)

Services are opened as async context managers before Hypercorn starts and
closed after its graceful drain, so every request that was admitted finishes
with its services alive (hypercorn's own ``worker_serve`` order). A crash in
any service's nursery cancels everything above it: the server stops with one
log line and a non-zero exit.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, cast

import trio
from hypercorn.config import Config, Sockets

from pqmsg import (
    h2_headers,
    h2_responses,
    hypercorn_drain,
    hypercorn_h2_errors,
    hypercorn_leaks,
    hypercorn_patch,
    werkzeug_headers,
)
from pqmsg.aioloop import open_aio_loop
from pqmsg.app import create_app
from pqmsg.clock import WallClock, system_clock
from pqmsg.http.inflight import InFlight
from pqmsg.loopwatch import StepTimer
from pqmsg.metrics import Metrics, ScrapeView
from pqmsg.nurseries.admission import Admission
from pqmsg.nurseries.audit import open_audit_writer
from pqmsg.nurseries.limiter import open_rate_limiter
from pqmsg.nurseries.notify import Bus, open_notifier
from pqmsg.nurseries.push import open_push_dispatcher
from pqmsg.nurseries.replay import open_replay_cache
from pqmsg.nurseries.storage import open_storage
from pqmsg.nurseries.verifier import helper_count, open_signature_verifier
from pqmsg.services import Services
from pqmsg.settings import Settings

log = logging.getLogger("pqmsg.server")

MAX_REQUESTS_PER_CONNECTION = 2**62
ReadyCallback = Callable[[list[str]], Awaitable[None] | None]


def apply_hypercorn_fixes() -> None:
    """Fixes of Hypercorn 0.18.0, and header checks of h2 and Werkzeug made fast.

    Each in its own module with its reasoning and tests; the bench's floor
    applies the same set.
    """
    hypercorn_patch.apply()  # send_eof racing send_all ends serve() on client disconnects
    hypercorn_drain.apply()  # idle connections and in-flight h2 responses at drain
    hypercorn_h2_errors.apply()  # request input that ended serve() instead of one stream
    hypercorn_leaks.apply()  # reset or refused h2 streams that held their connection
    h2_headers.apply()  # h2's per-byte header check, 0.2 ms per signed request, at C speed
    h2_responses.apply()  # response header blocks as raw literals (no pure-Python Huffman coding)
    werkzeug_headers.apply()  # Werkzeug's regex newline check of each header value, as memchr


def hypercorn_config(settings: Settings) -> Config:
    http = settings.http
    config = Config()
    config.bind = list(http.binds)
    config.graceful_timeout = http.grace_period_s
    config.keep_alive_timeout = http.keep_alive_s
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.h2_max_concurrent_streams = 128
    # Hypercorn ends an HTTP/2 connection with GOAWAY after this many requests
    # (default 1,000) and loses responses still in flight when it does; our
    # clients keep one connection for a long time, so do not recycle them.
    config.keep_alive_max_requests = MAX_REQUESTS_PER_CONNECTION
    config.websocket_ping_interval = None
    if http.certfile is not None and http.keyfile is not None:
        config.certfile = str(http.certfile)
        config.keyfile = str(http.keyfile)
        config.alpn_protocols = ["h2", "http/1.1"]
    return config


@asynccontextmanager
async def open_services(settings: Settings, *, clock: WallClock = system_clock) -> AsyncIterator[Services]:
    """Open every supervised service, in dependency order."""
    async with AsyncExitStack() as stack:
        # First in, last out: requests still draining keep their checks.
        verifier = await stack.enter_async_context(
            open_signature_verifier(
                helper_count(settings.auth.verify_processes, settings.http.workers, postgres=settings.uses_postgres)
            )
        )
        redis = None
        if settings.uses_postgres or settings.limits.redis_url:
            await stack.enter_async_context(open_aio_loop())
        if settings.limits.redis_url:
            from pqmsg.redisconn import open_redis

            redis = await stack.enter_async_context(
                open_redis(settings.limits.redis_url, timeout_s=settings.limits.redis_timeout_s)
            )
        storage = await stack.enter_async_context(open_storage(settings, clock=clock))
        audit = await stack.enter_async_context(
            open_audit_writer(
                settings.audit, settings.audit_dir, clock=clock, grace_period_s=settings.http.grace_period_s
            )
        )
        limiter = await stack.enter_async_context(open_rate_limiter(settings.limits, redis=redis))
        replay = await stack.enter_async_context(open_replay_cache(settings, redis=redis))
        admission = Admission(replay, limiter, redis=redis)
        bus: Bus | None = None
        if redis is not None:
            from pqmsg.nurseries.bus import RedisBus

            bus = RedisBus(redis, prefix=settings.limits.key_prefix)
        elif settings.uses_postgres and settings.storage.database_url:
            from pqmsg.storage.pgbus import open_pg_bus

            bus = await stack.enter_async_context(open_pg_bus(settings.storage.database_url))
        notifier = await stack.enter_async_context(open_notifier(bus=bus))
        push = await stack.enter_async_context(
            open_push_dispatcher(
                settings.push, storage=storage.db, has_stream=notifier.has_stream, clock=clock,
                grace_s=settings.http.grace_period_s,
            )
        )
        in_flight = InFlight(settings.http.max_in_flight, parked_limit=settings.http.max_long_polls)
        metrics = Metrics()
        loop = StepTimer()
        trio.lowlevel.add_instrument(loop)
        stack.callback(trio.lowlevel.remove_instrument, loop)
        services = Services(
            settings=settings,
            clock=clock,
            storage=storage,
            limiter=limiter,
            replay=replay,
            admission=admission,
            audit=audit,
            push=push,
            notifier=notifier,
            in_flight=in_flight,
            metrics=metrics,
            loop=loop,
            verifier=verifier,
        )
        metrics.bind(lambda: scrape_view(services))
        yield services


def scrape_view(services: Services) -> ScrapeView:
    stats = services.in_flight.statistics()
    return ScrapeView(
        services=services.component_statistics(),
        in_flight=stats.in_flight,
        in_flight_limit=stats.limit,
        long_polls=stats.parked,
        loop=services.loop.statistics(),
    )


async def serve(
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
    sockets: Sockets | None = None,
    clock: WallClock = system_clock,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until SIGTERM/SIGINT (or ``shutdown_trigger``) and drain.

    ``sockets`` are listening sockets bound by a parent process
    (``--workers``); without them Hypercorn binds ``settings.http.binds``.
    """
    from hypercorn.trio.run import worker_serve
    from hypercorn.utils import wrap_app

    settings.validate()
    apply_hypercorn_fixes()
    async with open_services(settings, clock=clock) as services:
        app = create_app(services)
        stop = trio.Event()

        async def hypercorn_shutdown() -> None:
            await stop.wait()
            # Long polls would hold the drain for up to their wait: end them now.
            services.notifier.shutdown()

        async with trio.open_nursery() as watchers:
            watchers.start_soon(_watch_signals, stop)
            if shutdown_trigger is not None:
                watchers.start_soon(_trigger_when, shutdown_trigger, stop)
            config = hypercorn_config(settings)
            await worker_serve(
                wrap_app(cast(Any, app), config.wsgi_max_body_size, "asgi"),
                config,
                sockets=sockets,
                shutdown_trigger=hypercorn_shutdown,
                task_status=task_status,
            )
            watchers.cancel_scope.cancel()
        log.info("HTTP drained; closing services")
    log.info("pqmsg-server stopped")


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: draining", signal.Signals(signum).name)
            stop.set()
            return


async def _trigger_when(trigger: Callable[[], Awaitable[Any]], stop: trio.Event) -> None:
    await trigger()
    stop.set()
