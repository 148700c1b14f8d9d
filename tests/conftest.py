"""Shared fixtures: a real server on loopback and SDK clients talking HTTP/2 to it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pqmsg.settings import Settings

if TYPE_CHECKING:
    from pqmsg.client import Client
    from tests.support.server import RunningServer


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    from tests.support.server import make_settings

    return make_settings(tmp_path / "data")


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[RunningServer]:
    from tests.support.server import running_server

    async with running_server(settings) as running:
        yield running


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[Client]:
    from pqmsg.client import Client

    async with Client(server.url) as c:
        yield c
