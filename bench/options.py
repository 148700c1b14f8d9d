"""The command line of ``python -m bench``, parsed into one frozen :class:`Options`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import attrs

SCENARIOS = ("mixed", "send", "bundle", "receive", "backlog")
# What one worker operation is, by scenario: weights of send, bundle and fetch.
# "fetch" is a fetch without waiting plus an ack of what it returned.
SCENARIO_MIX: dict[str, dict[str, int]] = {
    "mixed": {"send": 8, "bundle": 1, "fetch": 0},
    "send": {"send": 1, "bundle": 0, "fetch": 0},
    "bundle": {"send": 0, "bundle": 1, "fetch": 0},
    "receive": {"send": 0, "bundle": 0, "fetch": 1},
    "backlog": {"send": 1, "bundle": 0, "fetch": 1},
}
# Scenarios whose recipients receive their messages as they come (and ack them):
# by long poll (``--receive poll``) or on a WebSocket stream (``--receive stream``).
RECEIVING_SCENARIOS = frozenset({"mixed"})
RECEIVE_MODES = ("poll", "stream")


@attrs.frozen
class Options:
    url: str | None
    spawn: bool
    scenario: str
    accounts: int
    duration_s: float
    requests: int | None
    concurrency: int
    connections: int
    rate: float | None
    message_bytes: int
    poll_wait_s: int
    receive: str
    fetch_limit: int
    queue_depth: int
    prefill: int
    idle_polls: int
    idle_streams: int
    baseline: bool
    floor_hypercorn: str
    workers: int
    database_url: str | None
    redis_url: str | None
    server_pid: int | None
    signers: int
    json_path: Path | None
    plot_path: Path | None
    out_dir: Path
    progress: bool
    http1: bool
    client: str
    huffman: bool
    insecure: bool
    warmup_s: float

    @property
    def mix(self) -> dict[str, int]:
        return SCENARIO_MIX[self.scenario]

    @property
    def polling(self) -> bool:
        return self.scenario in RECEIVING_SCENARIOS and self.receive == "poll"

    @property
    def streaming(self) -> bool:
        return self.scenario in RECEIVING_SCENARIOS and self.receive == "stream"

    @property
    def open_loop(self) -> bool:
        return self.rate is not None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Load-test pqmsg-server with the SDK: set up accounts, run a scenario for a duration "
            "or a request count, print per-endpoint figures, write JSON and a latency plot."
        ),
    )
    target = p.add_argument_group("target")
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8080 (h2c) or https://...")
    target.add_argument("--spawn", action="store_true", help="start 'python -m pqmsg serve' on a free port")
    target.add_argument("--workers", type=int, default=1, help="server workers with --spawn, and the baseline's")
    target.add_argument("--database-url", help="PQMSG_DATABASE_URL for --spawn (and --prefill)")
    target.add_argument("--redis-url", help="PQMSG_REDIS_URL for --spawn")
    target.add_argument("--server-pid", type=int, help="pid of a running server, for its CPU and memory")
    target.add_argument("--http1", action="store_true", help="HTTP/1.1 instead of HTTP/2")
    target.add_argument(
        "--client", choices=("h2", "httpx"), default="h2",
        help="HTTP/2 transport: the lean bench client (default) or httpx, the SDK's",
    )
    target.add_argument("--huffman", action="store_true", help="Huffman-code HTTP/2 headers (what stock h2/httpx clients send; the SDK sends raw literals)")
    target.add_argument("--insecure", action="store_true", help="do not verify the TLS certificate")

    load = p.add_argument_group("load")
    load.add_argument("--scenario", choices=SCENARIOS, default="mixed")
    load.add_argument("--accounts", type=int, default=20, help="accounts (one device each)")
    load.add_argument("--duration", type=float, default=10.0, dest="duration_s", help="seconds")
    load.add_argument("--requests", type=int, help="stop after this many operations instead")
    load.add_argument("--concurrency", type=int, default=32, help="closed-loop workers; open-loop cap")
    load.add_argument("--connections", type=int, default=2, help="HTTP connections for the workers")
    load.add_argument("--rate", type=float, help="open loop: operations per second (fixed arrival rate)")
    load.add_argument("--message-size", type=int, default=256, dest="message_bytes", help="ciphertext bytes")
    load.add_argument(
        "--receive", choices=RECEIVE_MODES, default="poll",
        help="mixed scenario: recipients long-poll (default) or hold a WebSocket stream (RFC 8441 over h2)",
    )
    load.add_argument("--poll-wait", type=int, default=5, dest="poll_wait_s", help="long-poll wait seconds")
    load.add_argument("--fetch-limit", type=int, default=100, help="messages per fetch")
    load.add_argument("--queue-depth", type=int, default=0, help="messages queued per account before the run")
    load.add_argument("--warmup", type=float, default=1.0, dest="warmup_s", help="unmeasured seconds first")
    load.add_argument("--signers", type=int, default=os.cpu_count() or 1, help="signer processes")

    modes = p.add_argument_group("modes")
    modes.add_argument("--baseline", action="store_true", help="also run against the bare Quart-Trio app")
    modes.add_argument(
        "--floor-hypercorn",
        choices=("patched", "stock"),
        default="patched",
        help="the floor on the server's patched Hypercorn (default) or on the release (crash fix only)",
    )
    modes.add_argument("--prefill", type=int, default=0, help="queue this many messages in the database first")
    modes.add_argument("--idle-polls", type=int, default=0, help="measure server memory with N idle long polls")
    modes.add_argument(
        "--idle-streams", type=int, default=0,
        help="measure server memory with N idle WebSocket streams (N accounts, one stream each)",
    )

    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, dest="json_path", help="write the results as JSON here")
    out.add_argument("--plot", type=Path, dest="plot_path", help="latency-over-time PNG (default beside --json)")
    out.add_argument("--out-dir", type=Path, default=Path("bench/out"), help="logs and data of spawned servers")
    out.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar")
    return p


def parse(argv: Sequence[str] | None = None) -> Options:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if (ns.url is None) == (not ns.spawn):
        parser.error("give exactly one of --url and --spawn")
    if ns.accounts < 2:
        parser.error("--accounts must be at least 2 (every account sends to the next)")
    if ns.prefill and not (ns.spawn or ns.database_url):
        parser.error("--prefill needs --spawn or --database-url (where to write)")
    if ns.receive == "stream" and ns.scenario not in RECEIVING_SCENARIOS:
        parser.error("--receive stream applies to the mixed scenario (its recipients receive as messages come)")
    if ns.idle_polls and ns.idle_streams:
        parser.error("give --idle-polls or --idle-streams, not both")
    if ns.concurrency < 1 or ns.connections < 1 or ns.signers < 1:
        parser.error("--concurrency, --connections and --signers must be positive")
    plot = ns.plot_path
    if plot is None and ns.json_path is not None:
        plot = ns.json_path.with_suffix(".png")
    fields = {f.name for f in attrs.fields(Options)}
    values = {k: v for k, v in vars(ns).items() if k in fields}
    values["plot_path"] = plot
    return Options(**values)
