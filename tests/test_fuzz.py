"""Bounded fuzzing of the signaling endpoint: nothing a client posts crashes the server."""

from __future__ import annotations

import asyncio
import random

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s2s.rtc import new_peer_connection
from tests.conftest import StartServer

_offer: str | None = None


async def real_offer() -> str:
    global _offer
    if _offer is None:
        pc = new_peer_connection()
        pc.addTransceiver("audio")
        pc.createDataChannel("oai-events")
        await pc.setLocalDescription(await pc.createOffer())
        _offer = pc.localDescription.sdp
        await pc.close()
    return _offer


def mutate(sdp: str, rng: random.Random) -> str:
    lines = sdp.split("\r\n")
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(lines))
        match rng.randrange(4):
            case 0:
                del lines[i]
            case 1:
                lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
            case 2:
                lines.insert(
                    i, rng.choice(["m=video 9 X 0", "a=fingerprint:x", "c=IN IP9 ?", "a="])
                )
            case _:
                lines[i] = "".join(rng.sample(lines[i], len(lines[i])))
    return "\r\n".join(lines)


async def test_random_and_mutated_offers_get_answers_and_the_server_stays_up(
    start_server: StartServer,
) -> None:
    server = await start_server()
    offer = await real_offer()
    statuses: list[int] = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.text(max_size=300), st.integers(0, 2**32).map(str)), st.randoms())
    def cases(text: str, rng: random.Random) -> None:
        bodies.append(text if rng.random() < 0.3 else mutate(offer, rng))

    bodies: list[str] = []
    cases()
    async with aiohttp.ClientSession() as http:
        for body in bodies:
            async with asyncio.timeout(10):
                async with http.post(
                    server.url + "/v1/realtime/calls", data=body.encode(),
                    headers={"Content-Type": "application/sdp"},
                ) as resp:  # fmt: skip
                    statuses.append(resp.status)
                    if resp.status == 201:
                        async with http.post(server.url + resp.headers["Location"] + "/hangup"):
                            pass
                    else:
                        assert (await resp.json())["error"]["message"]
        async with http.get(server.url + "/healthz") as resp:
            assert resp.status == 200
    assert set(statuses) <= {201, 400}, statuses
