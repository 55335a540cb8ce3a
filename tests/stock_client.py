"""Every OpenAI event a test's calls get, parsed with the stock ``@openai/agents-realtime``
client's own schemas (``tests/browser/stock_parse.cjs``, on node): an event it knows by type
but cannot parse it drops, however right the event may look to us.

A module turns the check on with ``pytestmark = pytest.mark.usefixtures(
"stock_client_parses_every_event")`` (the fixture imported) and hands its calls to ``watch``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.peer import Peer

STOCK_PARSE = Path(__file__).resolve().parent / "browser" / "stock_parse.cjs"
_WATCHED: list[Peer] = []


def watch(peer: Peer) -> Peer:
    """Check ``peer``'s events after the test."""
    _WATCHED.append(peer)
    return peer


@pytest.fixture
async def stock_client_parses_every_event() -> AsyncIterator[None]:
    _WATCHED.clear()
    yield
    events = [e for peer in _WATCHED for e in peer.events if not e["type"].startswith("s2s.")]
    assert events or not _WATCHED
    node = await asyncio.create_subprocess_exec(
        "node", str(STOCK_PARSE), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, _ = await node.communicate(json.dumps(events).encode())
    assert node.returncode == 0
    assert json.loads(out) == []
