"""``pqmsg serve --workers N``: N worker processes sharing the listening sockets.

The parent binds the sockets once and starts N spawned workers; each runs
the whole composition root (its own services, pool and nurseries) on the
inherited sockets, so the kernel spreads connections across them. Workers
on one host share state the way replicas do: through PostgreSQL and Redis.
With the embedded SQLite default they share the database file (WAL mode),
but rate limits, replay protection and wake-ups stay per process, so
several workers want PostgreSQL and Redis (the parent warns otherwise).

SIGTERM or SIGINT to the parent is forwarded to every worker, which drains
as a single server would. If a worker dies, the parent stops the others and
exits non-zero: a half-dead server is worse than a restarted one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from typing import Any

import trio
from hypercorn.config import Sockets

from pqmsg.settings import Settings

log = logging.getLogger("pqmsg.workers")

POLL_S = 0.2
EXIT_WORKER_FAILED = 1


def run_workers(settings: Settings) -> int:
    """Bind, start the workers, supervise them; the process exit code."""
    from pqmsg.server import hypercorn_config

    if not (settings.uses_postgres and settings.limits.redis_url):
        log.warning(
            "%d workers without PostgreSQL and Redis: rate limits, replay protection and "
            "long-poll wake-ups are per worker; set PQMSG_DATABASE_URL and PQMSG_REDIS_URL",
            settings.http.workers,
        )
    config = hypercorn_config(settings)
    sockets = config.create_sockets()
    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
        sock.listen(config.backlog)
    ctx = multiprocessing.get_context("spawn")
    workers = [
        ctx.Process(target=_worker_main, args=(settings, sockets), name=f"pqmsg-worker-{i}")
        for i in range(settings.http.workers)
    ]
    stopping = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        log.info("received %s: stopping %d workers", signal.Signals(signum).name, len(workers))
        _signal_all(workers, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for worker in workers:
            worker.start()
        return _supervise(workers, lambda: stopping)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            sock.close()


def _supervise(workers: Sequence[BaseProcess], stopping: Callable[[], bool]) -> int:
    failed = False
    while any(w.is_alive() for w in workers):
        for worker in workers:
            if not worker.is_alive() and worker.exitcode not in (0, None) and not failed and not stopping():
                failed = True
                log.critical("%s exited with %s: stopping the others", worker.name, worker.exitcode)
                _signal_all(workers, signal.SIGTERM)
        time.sleep(POLL_S)
    codes = [w.exitcode for w in workers]
    return EXIT_WORKER_FAILED if failed or any(code != 0 for code in codes) else 0


def _signal_all(workers: Sequence[BaseProcess], signum: int) -> None:
    for worker in workers:
        if worker.is_alive() and worker.pid is not None:
            try:
                os.kill(worker.pid, signum)
            except ProcessLookupError:
                pass


def _worker_main(settings: Settings, sockets: Sockets) -> None:
    """A worker process: the whole server on inherited sockets."""
    import sys

    from pqmsg.cli import describe_crash
    from pqmsg.gctune import tune_for_serving
    from pqmsg.server import serve

    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s %(levelname)s [{multiprocessing.current_process().name}] %(name)s: %(message)s",
    )
    tune_for_serving()
    try:
        trio.run(lambda: serve(settings, sockets=sockets))
    except KeyboardInterrupt:
        return
    except BaseException as exc:  # the process boundary: one line, non-zero exit
        log.critical("worker stopped: %s", describe_crash(exc), exc_info=exc)
        sys.exit(EXIT_WORKER_FAILED)
