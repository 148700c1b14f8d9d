"""``python -m bench``: run a scenario against a server, optionally against the floor too.

::

    python -m bench --spawn --scenario send --duration 15 --baseline --json bench/out/send.json
    python -m bench --url http://127.0.0.1:8080 --scenario mixed --rate 300 --duration 20

With ``--spawn`` the bench starts ``python -m pqmsg serve`` itself (generous
rate limits, raised open-file limit, ``--workers``, ``--database-url``,
``--redis-url``) and knows its pid for CPU and memory figures; with
``--url`` give ``--server-pid`` for those. Exit status: 0, or 1 when the
run saw errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import attrs
import trio

from bench import idle_polls, idle_streams, prefill, report, run, spawn
from bench.options import Options, parse
from bench.signer import Credentials


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    spawn.raise_nofile()
    result = trio.run(_main, opts)
    return 1 if _had_errors(result) else 0


def _had_errors(result: dict[str, Any]) -> bool:
    return any(s["errors"] for s in result.get("endpoints", {}).values())


async def _main(opts: Options) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        pids: list[int] = [opts.server_pid] if opts.server_pid else []
        url = opts.url or ""
        sqlite_path = None
        if opts.spawn:
            server = await stack.enter_async_context(
                spawn.spawned(
                    spawn.server_argv(opts.workers), out_dir=opts.out_dir, name="pqmsg",
                    env=spawn.server_env(opts.database_url, opts.redis_url),
                )
            )
            url, pids = server.url, [server.pid]
            sqlite_path = server.data_dir / "pqmsg.sqlite3"
        if opts.idle_polls:
            result = await idle_polls.run(opts, url, pids)
        elif opts.idle_streams:
            result = await idle_streams.run(opts, url, pids)
        else:
            before = None
            if opts.prefill:
                target_db = opts.database_url or f"sqlite:///{sqlite_path}"

                async def before(creds: list[Credentials]) -> None:
                    await prefill.fill(target_db, creds, opts.prefill, opts.message_bytes)

            result = await run.run(opts, url, server_pids=pids, target="pqmsg", before=before)
            report.print_result(result)
            if opts.baseline:
                result["baseline"], result["ratio"] = await _baseline(opts, result)
                print(f"ratio: {result['ratio']}")
    if opts.json_path is not None:
        report.write_json(opts.json_path, result)
    if opts.plot_path is not None and "timeline" in result and report.write_plot(opts.plot_path, result):
        print(f"plot: {opts.plot_path}")
    return result


async def _baseline(opts: Options, main_result: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """The same harness on the send scenario against the bare app; the send ratio."""
    floor_opts = attrs.evolve(opts, scenario="send", queue_depth=0, prefill=0)
    async with spawn.spawned(spawn.baseline_argv(opts.workers, opts.floor_hypercorn), out_dir=opts.out_dir, name="baseline") as app:
        floor = await run.run(floor_opts, app.url, server_pids=[app.pid], target="baseline", fake_auth=True)
    report.print_result(floor)
    floor.pop("timeline", None)
    floor["hypercorn"] = opts.floor_hypercorn
    server_send = main_result["endpoints"].get("send", {}).get("throughput_rps")
    floor_send = floor["endpoints"].get("send", {}).get("throughput_rps")
    ratio = round(server_send / floor_send, 3) if server_send and floor_send else None
    return floor, ratio
