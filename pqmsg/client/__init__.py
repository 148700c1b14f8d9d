"""The pqmsg client SDK (what tests, ``bench/`` and client authors use)."""

from pqmsg.client.keys import Identity, PrekeyPair
from pqmsg.client.session import Client, Device, ProblemResponse, ReceivedMessage, sign_headers
from pqmsg.client.stream import MessageStream, StreamClosed, open_stream

__all__ = [
    "Client",
    "Device",
    "Identity",
    "MessageStream",
    "PrekeyPair",
    "ProblemResponse",
    "ReceivedMessage",
    "StreamClosed",
    "open_stream",
    "sign_headers",
]
