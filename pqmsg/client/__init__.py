"""The pqmsg client SDK (what tests, ``bench/`` and client authors use)."""

from pqmsg.client.keys import Identity, PrekeyPair
from pqmsg.client.session import Client, Device, ProblemResponse, ReceivedMessage, sign_headers

__all__ = ["Client", "Device", "Identity", "PrekeyPair", "ProblemResponse", "ReceivedMessage", "sign_headers"]
