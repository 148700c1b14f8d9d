"""observability/mailsink.py receives real SMTP and lists mail like Mailpit."""

from __future__ import annotations

import smtplib
from datetime import datetime
from email.message import EmailMessage
from typing import Any

import httpx

from tests.observability.conftest import MailSink


def _send(sink: MailSink, subject: str, to: str) -> None:
    message = EmailMessage()
    message["From"] = "Alertmanager <alertmanager@pqmsg.test>"
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = f"<{subject.replace(' ', '.')}@pqmsg.test>"
    message.set_content("<p>Alert <b>body</b></p>", subtype="html")
    with smtplib.SMTP("127.0.0.1", sink.smtp_port, timeout=10) as smtp:
        smtp.send_message(message)


def _listing(sink: MailSink) -> dict[str, Any]:
    response = httpx.get(f"{sink.api_url}/api/v1/messages", timeout=10)
    response.raise_for_status()
    listing: dict[str, Any] = response.json()
    return listing


def test_lists_received_mail_in_mailpit_shape_newest_first(mailsink: MailSink) -> None:
    httpx.delete(f"{mailsink.api_url}/api/v1/messages", timeout=10).raise_for_status()
    _send(mailsink, "first mail", "a@pqmsg.test")
    _send(mailsink, "second mail", "On Call <b@pqmsg.test>, c@pqmsg.test")

    listing = _listing(mailsink)

    assert listing["total"] == 2
    newest = listing["messages"][0]
    assert newest["Subject"] == "second mail"
    assert newest["MessageID"] == "second.mail@pqmsg.test"
    assert newest["From"] == {"Name": "Alertmanager", "Address": "alertmanager@pqmsg.test"}
    assert [to["Address"] for to in newest["To"]] == ["b@pqmsg.test", "c@pqmsg.test"]
    assert newest["Snippet"] == "Alert body"
    assert datetime.fromisoformat(newest["Created"].replace("Z", "+00:00")).tzinfo is not None
    assert newest["ID"] != listing["messages"][1]["ID"]


def test_delete_forgets_every_message(mailsink: MailSink) -> None:
    _send(mailsink, "doomed", "a@pqmsg.test")

    httpx.delete(f"{mailsink.api_url}/api/v1/messages", timeout=10).raise_for_status()

    assert _listing(mailsink) == {**_listing(mailsink), "total": 0, "messages": []}


def test_limit_pages_the_listing(mailsink: MailSink) -> None:
    for n in range(3):
        _send(mailsink, f"page {n}", "a@pqmsg.test")

    response = httpx.get(f"{mailsink.api_url}/api/v1/messages", params={"limit": 1}, timeout=10)

    body = response.json()
    assert body["count"] == 1
    assert body["messages"][0]["Subject"] == "page 2"
