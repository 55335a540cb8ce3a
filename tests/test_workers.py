"""``s2s serve --workers 2`` as a real process tree: calls spread, and every request finds its call.

Each test starts the real server with two workers. A test reaches one worker in particular
through its private unix socket in the run directory: without ``S2S-Forwarded`` that worker
treats the request as if the kernel had handed it the connection (so requests about another
worker's call are relayed there); with it, the worker handles the request itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from typing import Any

import aiohttp
import numpy as np
import pytest

from s2s.forwarding import FORWARDED_HEADER
from tests.conftest import StartWorkers, Workers
from tests.peer import FRAME, RATE, CallRefused, MicTrack, Peer
from tests.signals import dominant_frequency, loud_spans, silence, tone

KEY = "sk-workers-0123456789"


class WorkerPeer(Peer):
    """A peer that posts its offer to one worker's socket, or (``worker=None``) the public port."""

    def __init__(
        self,
        workers: Workers,
        worker: int | None = None,
        *,
        token: str | None = None,
        pinned: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(workers.url, **kwargs)
        self.workers = workers
        self.worker = worker
        self.token = token
        self.pinned = pinned  # send the marker: the worker takes the call itself

    @property
    def owner(self) -> int:
        return int(self.call_id[4:6], 16)

    async def _post_offer(self, sdp: str) -> tuple[int, str, dict[str, str]]:
        headers = {"Content-Type": "application/sdp"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.worker is None:
            http, base = aiohttp.ClientSession(), self.workers.url
        else:
            http, base = self.workers.http(self.worker), "http://w"
            if self.pinned:
                headers[FORWARDED_HEADER] = "test"
        async with http, http.post(base + "/v1/realtime/calls", data=sdp, headers=headers) as r:
            return r.status, await r.text(), dict(r.headers)


async def hangup_via(workers: Workers, worker: int, peer: WorkerPeer, key: str | None) -> int:
    """Hang ``peer`` up through ``worker``'s socket, as if the kernel had handed it there."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    path = f"http://w/v1/realtime/calls/{peer.call_id}/hangup"
    async with workers.http(worker) as http, http.post(path, headers=headers) as r:
        return r.status


async def assert_echoes(peer: WorkerPeer, freq: float) -> None:
    await peer.wait_audio(0.2, timeout=15)
    start = peer.mic.play(np.concatenate([tone(freq, 1.0), silence(0.8)]))
    await peer.wait_audio(1.6, since=peer.frames[-1][0], timeout=15)
    sent_at = peer.mic.frame_times[start // FRAME]
    received = peer.audio(since=sent_at)
    spans = loud_spans(received)
    assert spans, f"call {peer.call_id}: no tone came back"
    # Six calls, and this one test process is every caller. On a starved machine the server
    # falls behind, and the echo backend cuts lag that lasts (that is its design: live audio is
    # only worth hearing now), so a CI run once got back 0.34 s of a 0.6 s tone. What this test
    # is about is that the call reached its worker and is echoed there: most of a one-second
    # tone, at its own pitch (the exact timing is tests/test_echo_call.py's, on one call).
    assert sum(end - begin for begin, end in spans) > 0.4 * RATE, (peer.call_id, spans)
    begin, end = max(spans, key=lambda s: s[1] - s[0])
    assert abs(dominant_frequency(received[begin + 480 : end - 480]) - freq) < 5


async def test_calls_spread_over_both_workers_echo_and_hang_up_from_anywhere(
    start_workers: StartWorkers,
) -> None:
    workers = await start_workers()
    # Four offers land on worker 0 (as the kernel's hashing may well do), two wherever the
    # kernel puts them; each is passed on to the least loaded worker, so three and three.
    peers = [WorkerPeer(workers, 0, pinned=False, mic=MicTrack()) for _ in range(4)]
    peers += [WorkerPeer(workers, mic=MicTrack()) for _ in range(2)]
    try:
        for peer in peers:  # one after another: each offer sees the counts the last one left
            await peer.connect(timeout=20)
        assert Counter(p.owner for p in peers) == {0: 3, 1: 3}
        assert len({p.call_id for p in peers}) == 6
        for worker in (0, 1):
            health = await workers.health(worker)
            assert health["calls"] == 3 and health["worker_calls"] == [3, 3]
        await asyncio.gather(*(assert_echoes(p, 300 + 110 * i) for i, p in enumerate(peers)))
        for i, peer in enumerate(peers):
            if i % 2:  # through the worker that does not own the call: relayed to its owner
                assert await hangup_via(workers, 1 - peer.owner, peer, None) == 200
            else:  # a fresh public connection, wherever the kernel puts it
                assert await peer.hangup() == 200
            assert await hangup_via(workers, 1 - peer.owner, peer, None) == 404
        for worker in (0, 1):
            health = await workers.health(worker)
            assert health["calls"] == 0 and health["worker_calls"] == [0, 0]
    finally:
        await asyncio.gather(*(p.close() for p in peers))


async def test_sideband_reaches_a_call_on_the_other_worker(start_workers: StartWorkers) -> None:
    workers = await start_workers("--api-key", KEY, "--api-key", "sk-other")
    peer = WorkerPeer(workers, 0, token=KEY)
    try:
        await peer.connect(timeout=20)
        await peer.next_event("session.created", timeout=10)
        assert peer.owner == 0
        url = f"http://w/v1/realtime?call_id={peer.call_id}"
        async with workers.http(1) as http:
            for key, status in (("sk-other", 403), ("sk-nope", 401)):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(url, headers={"Authorization": f"Bearer {key}"})
                assert refused.value.status == status, key
            async with http.ws_connect(url, headers={"Authorization": f"Bearer {KEY}"}) as ws:
                update = {"type": "session.update", "session": {"instructions": "Relayed."}}
                await ws.send_str(json.dumps(update))
                async with asyncio.timeout(10):
                    async for message in ws:
                        event = json.loads(message.data)
                        if event["type"] == "session.updated":
                            break
                assert event["session"]["instructions"] == "Relayed."
                caller = await peer.next_event("session.updated", timeout=10)
                assert caller["session"]["instructions"] == "Relayed."
                # A GET that is no WebSocket is a clear 400 (it was a 500).
                headers = {"Authorization": f"Bearer {KEY}"}
                async with http.get(url, headers=headers) as plain:
                    assert plain.status == 400, await plain.text()
                # The call ending (hung up through the other worker) closes the relayed socket.
                assert await hangup_via(workers, 1, peer, KEY) == 200
                async with asyncio.timeout(10):
                    while (message := await ws.receive()).type is aiohttp.WSMsgType.TEXT:
                        pass
                # The owner's close frame, passed on: code and reason.
                assert message.type is aiohttp.WSMsgType.CLOSE
                assert (message.data, message.extra) == (1000, "call ended")
    finally:
        await peer.close()


async def test_a_client_secret_minted_in_one_worker_works_in_the_other(
    start_workers: StartWorkers,
) -> None:
    workers = await start_workers("--api-key", KEY, "--single-use-client-secrets")

    async def mint(worker: int) -> str:
        body = {"session": {"instructions": f"Minted by {worker}."}}
        headers = {"Authorization": f"Bearer {KEY}"}
        async with workers.http(worker) as http, http.post(
            "http://w/v1/realtime/client_secrets", json=body, headers=headers
        ) as r:  # fmt: skip
            assert r.status == 200
            value: str = (await r.json())["value"]
            return value

    peers: list[WorkerPeer] = []
    try:
        for minter, user in ((0, 1), (1, 0)):
            secret = await mint(minter)
            peer = WorkerPeer(workers, user, token=secret)
            peers.append(peer)
            await peer.connect(timeout=20)
            assert peer.owner == user
            created = await peer.next_event("session.created", timeout=10)
            assert created["session"]["instructions"] == f"Minted by {minter}."
            # Single-use: used up everywhere, the minting worker included.
            for again in (0, 1):
                with pytest.raises(CallRefused) as refused:
                    await WorkerPeer(workers, again, token=secret).connect(timeout=20)
                assert refused.value.status == 401
    finally:
        await asyncio.gather(*(p.close() for p in peers))


async def test_max_sessions_and_calls_per_key_count_every_worker(
    start_workers: StartWorkers,
) -> None:
    other, third = "sk-other-0123", "sk-third-0123"
    workers = await start_workers(
        "--max-sessions", "2", "--max-calls-per-key", "1",
        "--api-key", KEY, "--api-key", other, "--api-key", third,
    )  # fmt: skip

    async def refused(worker: int | None, token: str) -> CallRefused:
        with pytest.raises(CallRefused) as refusal:
            await WorkerPeer(workers, worker, token=token).connect(timeout=20)
        return refusal.value

    peers = [WorkerPeer(workers, 0, token=KEY)]
    try:
        await peers[0].connect(timeout=20)
        # KEY's one call is on worker 0; worker 1 holds none of KEY's, yet KEY is at its limit.
        too_many = await refused(1, KEY)
        assert too_many.status == 429 and "too_many_calls" in too_many.body
        peers.append(WorkerPeer(workers, 1, token=other))
        await peers[1].connect(timeout=20)
        # Each worker holds one call, under the cap, yet the server is full.
        for worker in (0, 1, None):
            full = await refused(worker, third)
            assert full.status == 503 and "server_full" in full.body, worker
            assert "Retry-After" in full.headers
        assert await hangup_via(workers, 1, peers[0], KEY) == 200
        peers.append(WorkerPeer(workers, 1, token=third))
        await peers[-1].connect(timeout=20)
        assert (await workers.health(0))["worker_calls"] == [0, 2]
    finally:
        await asyncio.gather(*(p.close() for p in peers))


async def test_a_dead_worker_is_replaced_and_sigterm_stops_them_all(
    start_workers: StartWorkers,
) -> None:
    workers = await start_workers("--shutdown-grace", "1")
    pids = [(await workers.health(w))["pid"] for w in (0, 1)]
    os.kill(pids[1], signal.SIGKILL)
    await workers.wait_line(r"worker 1 \(pid \d+\) died", timeout=10)
    await workers.wait_line(r"worker 1 ready", timeout=30)
    replacement = (await workers.health(1))["pid"]
    assert replacement != pids[1]
    peer = WorkerPeer(workers, 1)
    try:
        await peer.connect(timeout=20)
        await peer.next_event("session.created", timeout=10)
        workers.proc.send_signal(signal.SIGTERM)
        notice = await peer.next_event("s2s.server.shutdown", timeout=10)
        assert notice["grace_s"] == 1
        async with asyncio.timeout(15):
            assert await workers.proc.wait() == 0
    finally:
        await peer.close()
    for pid in (pids[0], replacement):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not workers.run_dir.exists()


async def test_calls_of_a_killed_worker_get_their_ended_webhook_from_the_supervisor(
    start_workers: StartWorkers,
) -> None:
    from aiohttp import web

    from s2s.client import verify_webhook

    hooks: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def receive(request: web.Request) -> web.Response:
        hooks.put_nowait(verify_webhook("whsec-w", request.headers, await request.read()))
        return web.Response(status=204)

    async def next_hook() -> dict[str, Any]:
        async with asyncio.timeout(15):
            return await hooks.get()

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    workers = await start_workers("--webhook", url, "--webhook-secret", "whsec-w")
    peers = [WorkerPeer(workers, w) for w in (0, 1)]
    try:
        for peer in peers:
            await peer.connect(timeout=20)
            started = await next_hook()
            assert started["type"] == "realtime.call.started"
            assert started["data"]["call_id"] == peer.call_id
        os.kill((await workers.health(1))["pid"], signal.SIGKILL)
        ended = await next_hook()
        assert ended["type"] == "realtime.call.ended"
        assert ended["data"]["call_id"] == peers[1].call_id
        assert ended["data"]["reason"] == "worker_died" and ended["data"]["duration_s"] > 0
        # Worker 0's call lives on, and ends with its own webhook when it is hung up.
        await workers.wait_line(r"worker 1 ready", timeout=30)
        assert await peers[0].hangup() == 200
        ended = await next_hook()
        assert (ended["data"]["call_id"], ended["data"]["reason"]) == (peers[0].call_id, "hangup")
        assert hooks.empty() and not any((workers.run_dir / "live").iterdir())
    finally:
        await asyncio.gather(*(p.close() for p in peers))
        await runner.cleanup()


async def test_metrics_from_any_worker_cover_every_worker(start_workers: StartWorkers) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    workers = await start_workers("--stats-interval", "0.5")
    peers = [WorkerPeer(workers, w, mic=MicTrack()) for w in (0, 1, 1)]
    try:
        for peer in peers:
            await peer.connect(timeout=20)
        calls = {peer.call_id: worker for peer, worker in zip(peers, (0, 1, 1), strict=True)}
        for worker in (0, 1):
            async with asyncio.timeout(20):
                while True:  # per-call series appear with a call's first stats sample
                    async with workers.http(worker) as http, http.get("http://w/metrics") as r:
                        assert r.status == 200
                        text = await r.text()
                    families = {f.name: f for f in text_string_to_metric_families(text)}
                    per_call = [
                        sample
                        for family in families.values()
                        for sample in family.samples
                        if "call_id" in sample.labels
                    ]
                    if {s.labels["call_id"] for s in per_call} == set(calls):
                        break
                    await asyncio.sleep(0.2)
            active = {s.labels["worker"]: s.value for s in families["s2s_active_calls"].samples}
            assert active == {"0": 1.0, "1": 2.0}
            # Each call's series is labelled with the worker that holds it.
            assert all(s.labels["worker"] == str(calls[s.labels["call_id"]]) for s in per_call)
    finally:
        await asyncio.gather(*(p.close() for p in peers))
