"""The audit log a real server writes: every security event, no raw identifier."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio

from pqmsg.client import Client, ProblemResponse
from pqmsg.protocol.b64 import b64encode
from tests.support.server import make_settings, running_server


async def test_security_events_are_audited_without_raw_identifiers(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    with trio.fail_after(60):
        async with running_server(settings) as server, Client(server.url) as client:
            alice = await client.register()
            bob = await client.register()
            laptop = await alice.link_new_device()
            await bob.upload_prekeys(ec=1, pq=0)
            await alice.fetch_bundle(bob.account)
            await bob.set_push("fcm", "fcm-token-that-must-not-leak-0123456789")
            await alice.revoke(laptop.device)
            try:
                await laptop.list_devices()
            except ProblemResponse:
                pass
            await bob.delete_account()
    raw = b"".join(p.read_bytes() for p in sorted((tmp_path / "data" / "audit").glob("audit-*.jsonl")))
    events = [json.loads(line) for line in raw.splitlines()]
    names = [e["event"] for e in events]
    for expected in (
        "account.registered", "device.provisioning_started", "device.linked", "keys.uploaded",
        "push.token_set", "device.revoked", "auth.rejected", "account.deleted",
    ):
        assert expected in names, expected
    rejected = next(e for e in events if e["event"] == "auth.rejected")
    assert rejected["outcome"] == "rejected"
    secrets_used = [
        alice.account, bob.account, laptop.account,
        b64encode(alice.device_key.public_key), b64encode(bob.device_key.public_key),
        "fcm-token-that-must-not-leak-0123456789", "127.0.0.1",
    ]
    for secret in secrets_used:
        assert secret.encode() not in raw, secret
    assert b"127.0.0.0/24" in raw  # client addresses are truncated, not dropped


def test_audit_export_copies_closed_segments(tmp_path: Path) -> None:
    audit = tmp_path / "data" / "audit"
    audit.mkdir(parents=True)
    (audit / "audit-20261101T000000Z-000001.jsonl").write_text('{"event":"x"}\n')
    (audit / "audit-20261101T000000Z-000002.jsonl").write_text('{"event":"y"}\n')
    (audit / "audit-20261101T000000Z-000001.jsonl").chmod(0o440)  # sealed, as rotation leaves it
    (audit / "audit-20261101T000000Z-000002.jsonl").chmod(0o640)  # still being written
    out = tmp_path / "offhost"

    def export() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pqmsg", "audit", "export", "--data-dir", str(tmp_path / "data"),
             "--since", "1d", "--to", str(out)],
            capture_output=True, text=True, timeout=60,
        )

    first = export()
    assert first.returncode == 0, first.stderr
    assert [p.name for p in out.iterdir()] == ["audit-20261101T000000Z-000001.jsonl"]
    assert "exported 1 segment" in first.stderr
    again = export()
    assert "exported 0 segment" in again.stderr  # idempotent: nothing new to copy
