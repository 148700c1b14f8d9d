#!/usr/bin/env python3
"""A loopback mail sink that answers like Mailpit, for escalation drills without Docker.

It receives real SMTP (aiosmtpd) and lists what it received over HTTP in
the shape of Mailpit's message-list API, so ``scripts/security/alert_drill.sh``
works against it unchanged:

    GET /api/v1/messages[?start=N&limit=N]
      {"total": n, "count": n, "start": n,
       "messages": [{"ID", "MessageID", "From": {"Name", "Address"},
                     "To": [{"Name", "Address"}], "Subject", "Created",
                     "Size", "Snippet"}]}          newest first
    DELETE /api/v1/messages                    forget every message
    GET /readyz                                200 once both servers listen

Run it as ``python observability/mailsink.py --smtp 127.0.0.1:1025
--http 127.0.0.1:8025`` (or ``python -m observability.mailsink``); it needs
aiosmtpd and stops on SIGTERM or SIGINT. Mail is kept in memory only.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import getaddresses, parseaddr
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

SNIPPET_CHARS: Final = 250
DEFAULT_LIMIT: Final = 50


@dataclass(frozen=True)
class StoredMessage:
    """One received mail, reduced to what the message list shows."""

    id: str
    message_id: str
    sender: tuple[str, str]
    to: tuple[tuple[str, str], ...]
    subject: str
    created: str
    size: int
    snippet: str

    def summary(self) -> dict[str, Any]:
        """This message as an entry of Mailpit's message list."""
        return {
            "ID": self.id,
            "MessageID": self.message_id,
            "From": {"Name": self.sender[0], "Address": self.sender[1]},
            "To": [{"Name": name, "Address": address} for name, address in self.to],
            "Subject": self.subject,
            "Created": self.created,
            "Size": self.size,
            "Snippet": self.snippet,
        }


class MessageStore:
    """Thread-safe in-memory list of received messages."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: list[StoredMessage] = []

    def add(self, message: StoredMessage) -> None:
        with self._lock:
            self._messages.append(message)

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()

    def listing(self, start: int, limit: int) -> dict[str, Any]:
        """A page of the message list, newest first, as Mailpit returns it."""
        with self._lock:
            newest_first = list(reversed(self._messages))
        page = newest_first[start : start + limit]
        return {
            "total": len(newest_first),
            "unread": len(newest_first),
            "count": len(page),
            "messages_count": len(newest_first),
            "start": start,
            "tags": [],
            "messages": [m.summary() for m in page],
        }


class _TextOfHtml(HTMLParser):
    """Collects the visible text of an HTML body (Alertmanager mails are HTML only)."""

    HIDDEN: Final = frozenset({"head", "style", "script", "title"})

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._hidden_depth += tag in self.HIDDEN

    def handle_endtag(self, tag: str) -> None:
        self._hidden_depth -= tag in self.HIDDEN and self._hidden_depth > 0

    def handle_data(self, data: str) -> None:
        if not self._hidden_depth:
            self.parts.append(data)


def _snippet(message: EmailMessage) -> str:
    """The start of the body's visible text, whitespace collapsed, as Mailpit shows it."""
    body = message.get_body(preferencelist=("plain", "html"))
    if body is None:
        return ""
    text = str(body.get_content())
    if body.get_content_subtype() == "html":
        parser = _TextOfHtml()
        parser.feed(text)
        text = " ".join(parser.parts)
    return " ".join(text.split())[:SNIPPET_CHARS]


def _utc_now() -> str:
    """The current time in RFC 3339 with milliseconds, as Mailpit writes ``Created``."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    return now.replace("+00:00", "Z")


def parse_message(raw: bytes, envelope_to: Sequence[str]) -> StoredMessage:
    """Reduce one raw RFC 5322 message; ``To`` falls back to the envelope recipients."""
    message = message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    to_headers = [str(v) for v in message.get_all("To", [])]
    to = getaddresses(to_headers) or [("", address) for address in envelope_to]
    return StoredMessage(
        id=str(uuid.uuid4()),
        message_id=str(message.get("Message-Id", "")).strip("<>"),
        sender=parseaddr(str(message.get("From", ""))),
        to=tuple(to),
        subject=str(message.get("Subject", "")),
        created=_utc_now(),
        size=len(raw),
        snippet=_snippet(message),
    )


class SinkHandler:
    """aiosmtpd handler: accepts every message and stores it."""

    def __init__(self, store: MessageStore) -> None:
        self._store = store

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        self._store.add(parse_message(raw, envelope.rcpt_tos))
        return "250 Message accepted for delivery"


def _handler_class(store: MessageStore) -> type[BaseHTTPRequestHandler]:
    """An HTTP handler class bound to ``store``."""

    class ApiHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/readyz":
                self._send(200, {"status": "ok"})
            elif url.path == "/api/v1/messages":
                query = parse_qs(url.query)
                start = int(query.get("start", ["0"])[0])
                limit = int(query.get("limit", [str(DEFAULT_LIMIT)])[0])
                self._send(200, store.listing(max(start, 0), max(limit, 0)))
            else:
                self._send(404, {"error": "not found"})

        def do_DELETE(self) -> None:
            if urlsplit(self.path).path == "/api/v1/messages":
                store.clear()
                self._send(200, {"status": "ok"})
            else:
                self._send(404, {"error": "not found"})

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the drill prints its own evidence."""

    return ApiHandler


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Loopback SMTP sink with Mailpit's list API.")
    parser.add_argument("--smtp", type=_hostport, default=("127.0.0.1", 1025), help="HOST:PORT")
    parser.add_argument("--http", type=_hostport, default=("127.0.0.1", 8025), help="HOST:PORT")
    return parser.parse_args(argv)


def _wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Serve SMTP and the message API until told to stop."""
    args = _parse_args(argv)
    store = MessageStore()
    smtp = Controller(SinkHandler(store), hostname=args.smtp[0], port=args.smtp[1])
    http = ThreadingHTTPServer(args.http, _handler_class(store))
    smtp.start()
    thread = threading.Thread(target=http.serve_forever, name="mailsink-http", daemon=True)
    thread.start()
    print(f"mailsink: smtp {args.smtp[0]}:{args.smtp[1]}, api http://{args.http[0]}:{args.http[1]}")
    sys.stdout.flush()
    try:
        _wait_for_signal()
    finally:
        http.shutdown()
        http.server_close()
        smtp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
