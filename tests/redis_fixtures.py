"""Redis fixtures the shared-tier test modules share (import them into the module: `from redis_fixtures import
server, url`): one real redis-server per module, emptied before each test."""

from __future__ import annotations

import pytest

from kvbm.mechanism.remote.local_server import RedisServer


@pytest.fixture(scope="module")
def server():
    with RedisServer() as s:
        yield s


@pytest.fixture
def url(server):
    server.cli("flushall")
    return server.url
