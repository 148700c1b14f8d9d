"""The floor: a bare Quart-Trio app on the server's own Hypercorn configuration.

``python -m bench.baseline_app --bind 127.0.0.1:PORT [--workers N]`` serves
``PUT /v1/messages/<account>`` shaped like a send (reads the body, parses
the JSON, answers 200 JSON with the id) and ``GET /health/live``; nothing
else: no authentication, no storage, no middleware. Hypercorn's config
comes from ``pqmsg.server.hypercorn_config`` (same protocols, stream
limits, keep-alive), the server's patches of Hypercorn are applied
(``--hypercorn stock`` keeps only the crash fix),
and ``--workers`` shares the listening sockets across spawned processes as
``pqmsg serve --workers`` does.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import signal
from collections.abc import Sequence
from typing import Any, cast

import trio
from hypercorn.config import Config, Sockets
from quart import Response, request
from quart_trio import QuartTrio

from pqmsg import hypercorn_patch
from pqmsg.server import apply_hypercorn_fixes, hypercorn_config
from pqmsg.settings import Settings


def create_app() -> QuartTrio:
    app = QuartTrio(__name__)

    @app.put("/v1/messages/<account>")
    async def send(account: str) -> Response:
        body = json.loads(await request.get_data(cache=False, as_text=False))
        answer = {"id": body["id"], "stored": len(body["messages"])}
        return Response(json.dumps(answer, separators=(",", ":")), content_type="application/json")

    @app.get("/health/live")
    async def live() -> Response:
        return Response("ok", content_type="text/plain")

    return app


def config_for(binds: Sequence[str]) -> Config:
    return hypercorn_config(Settings().replace("http.binds", tuple(binds)))


async def serve(config: Config, sockets: Sockets | None, hypercorn: str = "patched") -> None:
    from hypercorn.trio.run import worker_serve
    from hypercorn.utils import wrap_app

    if hypercorn == "patched":
        # The same Hypercorn as the server's: its fixes of Hypercorn 0.18.0
        # (and its fewer writes per h2 response) are part of the HTTP layer
        # the floor stands for.
        apply_hypercorn_fixes()
    else:
        # Hypercorn as released, but for the crash fix without which h2c
        # servers die under load (see pqmsg.hypercorn_patch).
        hypercorn_patch.apply()
    stop = trio.Event()

    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals)
        app = wrap_app(cast(Any, create_app()), config.wsgi_max_body_size, "asgi")
        await worker_serve(app, config, sockets=sockets, shutdown_trigger=stop.wait)
        nursery.cancel_scope.cancel()


def _worker(binds: list[str], sockets: Sockets, hypercorn: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    trio.run(serve, config_for(binds), sockets, hypercorn)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_app", description=__doc__.split("\n")[0])
    parser.add_argument("--bind", action="append", required=True, metavar="HOST:PORT")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--hypercorn",
        choices=("patched", "stock"),
        default="patched",
        help="the server's patched Hypercorn (default), or the release with only its crash fix",
    )
    args = parser.parse_args(argv)
    config = config_for(args.bind)
    if args.workers <= 1:
        trio.run(serve, config, None, args.hypercorn)
        return 0
    sockets = config.create_sockets()
    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
        sock.listen(config.backlog)
    ctx = multiprocessing.get_context("spawn")
    workers = [
        ctx.Process(target=_worker, args=(args.bind, sockets, args.hypercorn)) for _ in range(args.workers)
    ]
    stopping: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        for w in workers:
            if w.is_alive():
                w.terminate()  # SIGTERM: each worker drains like the server's do

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return 0 if stopping else 1


if __name__ == "__main__":
    raise SystemExit(main())
