"""How the harness sends a request: the lean HTTP/2 client, or httpx (the SDK's client).

Both take ``(method, target, headers, body)`` and return ``(status, body)``
or raise :class:`~bench.h2client.TransportError`. HTTP/2 (h2c or TLS) uses
:mod:`bench.h2client` unless ``--client httpx``; HTTP/1.1 always uses
httpx. A stream that a GOAWAY overtook (the server may have handled it) raises
:class:`MaybeProcessed`, which the caller retries signed afresh.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import h2.exceptions
import httpx

from bench.h2client import H2Client, MaybeProcessed, TransportError
from bench.options import Options
from pqmsg.client import Client


class Transport(Protocol):
    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, bytes]: ...


class HttpxTransport:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, bytes]:
        try:
            response = await self._http.request(method, target, content=body, headers=headers)
        except (httpx.RemoteProtocolError, h2.exceptions.ProtocolError) as exc:
            raise MaybeProcessed(str(exc)) from exc
        except httpx.HTTPError as exc:
            raise TransportError(str(exc)) from exc
        return response.status_code, response.content


@asynccontextmanager
async def open_transport(opts: Options, url: str) -> AsyncIterator[Transport]:
    if opts.http1 or opts.client == "httpx":
        async with Client(url, http2=not opts.http1, verify=not opts.insecure, huffman=opts.huffman).http as http:
            yield HttpxTransport(http)
    else:
        async with H2Client(url, verify=not opts.insecure) as client:
            yield client
