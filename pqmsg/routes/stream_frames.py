"""The wire format of ``GET /v1/stream`` (PROTOCOL.md §5): frames and close codes.

Frames are JSON text frames::

    server -> client                       client -> server
    {"type": "message", <GET /v1/messages fields>}
                                           {"type": "ack", "ids": [...]}  (<= 500)
    {"type": "acked", "acked": n}          (one per ack frame, in order, once durable)
    {"type": "ping"}                       {"type": "pong"}

Close codes (the close reason is the token, sometimes with a detail)::

    1001 going_away      the server is draining (SIGTERM); reconnect
    1003 unsupported     a binary frame
    1008 bad_frame       a text frame that is none of the client frames above
    1009 too_big         a frame longer than MAX_FRAME_CHARS
    1011 internal_error  an unexpected server error (details only in the log)
    1013 unavailable     storage is unavailable; reconnect later
    4001 revoked         the device was revoked or its account deleted
    4002 replaced        a newer stream of the same device opened on this replica
    4003 slow_consumer   messages waited behind a full window for stream.ack_timeout_s,
                         or a frame could not be written within stream.send_timeout_s
    4004 idle_timeout    nothing from the client for stream.idle_timeout_s
"""

from __future__ import annotations

import json
from typing import Any

from pqmsg.nurseries.notify import CloseReason
from pqmsg.protocol.validate import UUID_RE
from pqmsg.routes.messages import MAX_ACK, message_json
from pqmsg.storage.base import QueuedMessage

Close = tuple[int, str]
GOING_AWAY: Close = (1001, "going_away")
UNSUPPORTED: Close = (1003, "unsupported: binary frames are not part of the protocol")
TOO_BIG: Close = (1009, "too_big")
INTERNAL_ERROR: Close = (1011, "internal_error")
UNAVAILABLE: Close = (1013, "unavailable")
REVOKED: Close = (4001, "revoked")
REPLACED: Close = (4002, "replaced")
SLOW_CONSUMER: Close = (4003, "slow_consumer")
IDLE_TIMEOUT: Close = (4004, "idle_timeout")
BAD_FRAME_CODE = 1008
CLOSE_FOR: dict[CloseReason, Close] = {
    "revoked": REVOKED,
    "replaced": REPLACED,
    "shutdown": GOING_AWAY,
}
# An ack of 500 UUIDs is about 20,000 characters.
MAX_FRAME_CHARS = 64 * 1024
MAX_CLOSE_REASON_BYTES = 123  # RFC 6455 5.5: control frame payload 125, minus the code
PING_FRAME = '{"type":"ping"}'


class BadFrame(Exception):
    """A client frame that breaks the protocol; the stream closes with 1008."""


def bad_frame_close(exc: BadFrame) -> Close:
    """The close for a client frame that broke the protocol, with what was wrong."""
    return (BAD_FRAME_CODE, f"bad_frame: {exc}")


def message_frame(message: QueuedMessage) -> str:
    return json.dumps({"type": "message", **message_json(message)})


def acked_frame(acked: int) -> str:
    return json.dumps({"type": "acked", "acked": acked})


def close_reason(reason: str) -> str:
    """The reason cut to fit a close frame, on a character boundary."""
    data = reason.encode()[:MAX_CLOSE_REASON_BYTES]
    return data.decode("utf-8", errors="ignore")


def parse_frame(data: str) -> dict[str, Any]:
    """A client text frame: a pong, or an ack of valid ids; BadFrame otherwise."""
    try:
        frame = json.loads(data)
    except ValueError:
        raise BadFrame("not JSON") from None
    if not isinstance(frame, dict):
        raise BadFrame("a frame must be a JSON object")
    kind = frame.get("type")
    if kind == "pong" and frame.keys() == {"type"}:
        return frame
    if kind != "ack":
        raise BadFrame(f"unknown frame type {str(kind)[:32]!r}")
    if frame.keys() != {"type", "ids"}:
        raise BadFrame("an ack frame has exactly the fields 'type' and 'ids'")
    ids = frame["ids"]
    if not isinstance(ids, list) or len(ids) > MAX_ACK or not all(map(_is_uuid, ids)):
        raise BadFrame(f"'ids' must be a list of at most {MAX_ACK} message ids")
    return frame


def _is_uuid(value: object) -> bool:
    return isinstance(value, str) and UUID_RE.fullmatch(value) is not None
