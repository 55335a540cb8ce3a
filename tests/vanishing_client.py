"""A client that connects, reports its call, then waits to be killed without hanging up."""

from __future__ import annotations

import asyncio
import sys

from tests.peer import Peer


async def main(url: str) -> None:
    peer = Peer(url)
    await peer.connect()
    await peer.wait_open()
    print(peer.call_url, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
