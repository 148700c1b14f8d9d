"""Fixtures shared by every backend's run of the storage contract.

Each backend's test module provides the ``storage`` fixture (a
:class:`pqmsg.storage.base.Backend`, freshly migrated and empty).
"""

from __future__ import annotations

import pytest

# A fixed wall-clock instant: backends never read the clock, callers pass it.
NOW = 1_700_000_000.0


@pytest.fixture
def now() -> float:
    return NOW
