"""Edges and model workers on a Ray cluster (``s2s[ray]``): a real local cluster of a head and two
worker nodes (``ray.cluster_utils.Cluster``), tiny Moshi workers on the CPU, the real server as
the edge and real aiortc callers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

from s2s.cli import parse_settings
from s2s.signaling.state import BACKEND
from s2s.worker.cluster import (
    NAMESPACE,
    WORKER_RESOURCE,
    connect,
    registry,
    start_worker,
    stop_worker,
)
from s2s.worker.edge import ClusterBackend
from s2s.worker.handle import ClusterUnavailable
from s2s.worker.messages import Hello, encoder
from s2s.worker.process import WorkerOptions
from s2s.worker.registry import WorkerRegistry, WorkerState
from tests.conftest import StartServer
from tests.peer import CallRefused, MicTrack, Peer
from tests.signals import rms, tone

pytestmark = pytest.mark.timeout(300)

_LISTENING = re.compile(rb"s2s listening on (http://\S+)/")
_WORKER_UP = re.compile(rb"model worker shared: .* 2 slots")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    # One CPU a node: this machine has two cores, and the workers ask for the custom resource.
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={WORKER_RESOURCE: 1})
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


Started = tuple[str, Any]


@pytest.fixture
async def workers(ray_cluster: Cluster, tiny_models: Path) -> AsyncIterator[list[Started]]:
    """Workers a test starts (with ``start``), stopped for good after it."""
    started: list[Started] = []
    yield started
    for name, actor in started:
        async with asyncio.timeout(60):
            await asyncio.to_thread(stop_worker, name, actor)


async def start(
    started: list[Started], spec: str, name: str, max_calls: int, **options: Any
) -> Any:
    worker = WorkerOptions(spec, max_calls=max_calls)
    name, actor, _ = await asyncio.to_thread(start_worker, worker, name=name, **options)
    started.append((name, actor))
    return actor


async def answer(ref: Any, timeout: float = 15.0) -> Any:
    """What a Ray call returns, waited for at most ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        return await ref


async def states() -> dict[str, WorkerState]:
    return {s.name: s for s in await answer(registry().workers.remote())}


def call_id(peer: Peer) -> str:
    return peer.call_id


async def test_calls_spread_move_off_a_dead_worker_and_a_restarted_one_takes_calls(
    ray_cluster: Cluster, workers: list[Started], start_server: StartServer, tiny_models: Path
) -> None:
    spec = f"moshi:{tiny_models / 'tiny-moshi'}"
    loop = asyncio.get_running_loop()
    a, b = await asyncio.gather(
        start(workers, spec, "a", max_calls=4, evict_after_s=5, max_restarts=0),
        start(workers, spec, "b", max_calls=4, evict_after_s=5, max_restarts=1),
    )
    server = await start_server(model=spec, ray_address=ray_cluster.address)
    backend = server.app[BACKEND]
    assert isinstance(backend, ClusterBackend)
    peers = [Peer(server.url, MicTrack(tone(300 + 200 * i, 60))) for i in range(2)]
    try:
        for peer in peers:
            await peer.connect()
        # The second call goes where more slots are free: the other worker.
        assert sorted(str(backend.where(call_id(p))) for p in peers) == ["a", "b"]
        since = loop.time()
        await asyncio.gather(*(p.wait_audio(1.0, since=since, timeout=20) for p in peers))
        assert all(rms(p.audio(since=since)) > 0.001 for p in peers)

        # Worker a's process dies: its call hears why and goes on on b, its WebRTC leg up.
        on_a = next(p for p in peers if backend.where(call_id(p)) == "a")
        killed = loop.time()
        os.kill(await answer(a.pid.remote()), signal.SIGKILL)
        error = await on_a.next_event("error", timeout=20)
        assert error["error"]["code"] == "model_unavailable"  # said at once, before the move
        async with asyncio.timeout(20):
            while backend.where(call_id(on_a)) != "b":  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.05)
        moved_after = loop.time() - killed
        assert moved_after < 2.0, f"the call moved {moved_after:.2f} s after its worker died"
        assert on_a.pc.connectionState == "connected"
        since = loop.time()
        await on_a.wait_audio(1.0, since=since, timeout=20)
        assert rms(on_a.audio(since=since)) > 0.001
        assert not (await states())["a"].up

        # A new call goes to the survivor.
        third = Peer(server.url, MicTrack(tone(900, 60)))
        peers.append(third)
        await third.connect()
        assert backend.where(call_id(third)) == "b"
        metrics = await _get(server.url + "/metrics")
        assert 's2s_model_worker_calls{worker="b"} 3.0' in metrics
    finally:
        for peer in peers:
            await peer.close()

    # Worker b dies with no call on it; Ray restarts it, it registers anew and takes calls.
    async with asyncio.timeout(30):
        while (await states())["b"].calls:  # noqa: ASYNC110 - the registry has no event to wait on
            await asyncio.sleep(0.2)
    dead = await answer(b.pid.remote())
    os.kill(dead, signal.SIGKILL)
    async with asyncio.timeout(90):
        while await _pid(b) in (dead, None):  # noqa: ASYNC110 - a restart has no event to wait on
            await asyncio.sleep(0.5)
    peer = Peer(server.url, MicTrack(tone(500, 30)))
    try:
        await peer.connect()
        assert backend.where(call_id(peer)) == "b"
        since = loop.time()
        await peer.wait_audio(1.0, since=since, timeout=20)
        assert rms(peer.audio(since=since)) > 0.001
    finally:
        await peer.close()


async def test_two_edges_share_a_worker_503_when_full_and_a_killed_edge_frees_its_slot(
    ray_cluster: Cluster, start_server: StartServer, tiny_models: Path
) -> None:
    spec = f"moshi:{tiny_models / 'tiny-moshi'}"
    loop = asyncio.get_running_loop()
    # The worker as an operator starts one: `s2s worker`, in the foreground.
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "s2s", "worker", "--ray-address", ray_cluster.address,
        "--model", spec, "--name", "shared", "--max-calls", "2", "--peer-timeout", "2",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert worker.stderr is not None
    edge: asyncio.subprocess.Process | None = None
    drains: list[asyncio.Task[bytes]] = []
    peers: list[Peer] = []
    try:
        await _wait_line(worker, _WORKER_UP)
        # What they say from now on is read, so that a full pipe never blocks them.
        drains.append(asyncio.create_task(worker.stderr.read()))
        edge = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "s2s", "serve", "--port", "0", "--model", spec,
            "--ray-address", ray_cluster.address, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert edge.stderr is not None
        here = await start_server(model=spec, ray_address=ray_cluster.address)
        url = (await _wait_line(edge, _LISTENING))[1].decode()
        drains.append(asyncio.create_task(edge.stderr.read()))
        # An offer refused once it had its place (its audio cannot come back) frees it at once,
        # not when the place would lapse (the worker's eviction time and two reports: 4 s).
        edge_backend = here.app[BACKEND]
        assert isinstance(edge_backend, ClusterBackend)
        place, placed = edge_backend.place, []

        async def recorded(call: str) -> None:  # the offer was placed before it was refused
            placed.append(call)
            await place(call)

        edge_backend.place = recorded  # type: ignore[method-assign]
        refused = await _post_offer(here.url, await _sendonly_offer())
        assert refused.startswith("400"), refused
        assert len(placed) == 1
        async with asyncio.timeout(1.0):
            while (await states())["shared"].free != 2:  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.05)
        # One call from each edge, both on the one worker.
        peers += [Peer(url, MicTrack(tone(440, 60))), Peer(here.url, MicTrack(tone(660, 60)))]
        for peer in peers:
            await peer.connect()
        since = loop.time()
        await asyncio.gather(*(p.wait_audio(1.0, since=since, timeout=20) for p in peers))
        assert all(rms(p.audio(since=since)) > 0.001 for p in peers)
        assert (await states())["shared"].free == 0
        for base in (url, here.url):
            peers.append(Peer(base, MicTrack(tone(440, 60))))
            with pytest.raises(CallRefused) as refused:
                await peers[-1].connect()
            assert refused.value.status == 503 and "server_full" in refused.value.body

        edge.kill()
        await edge.wait()
        killed = time.monotonic()
        # The worker evicts the call no edge ticks any more and says so to the registry; the
        # other edge's call goes on.
        async with asyncio.timeout(15):
            while (await states())["shared"].free != 1:  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.2)
        assert time.monotonic() - killed < 2 + 2 * 1.0 + 2  # evict_after_s + reports + slack
        since = loop.time()
        await peers[1].wait_audio(1.0, since=since, timeout=20)
        assert rms(peers[1].audio(since=since)) > 0.001
        assert not any(e["type"] == "error" for e in peers[1].events)
        await peers[1].close()
        # SIGTERM to `s2s worker` takes its worker off the cluster.
        worker.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await worker.wait() == 0
        assert "shared" not in await states()
    finally:
        for peer in peers:
            await peer.close()
        for proc in (edge, worker):
            if proc is not None and proc.returncode is None:
                # SIGTERM: `s2s worker` takes its actor off the cluster, which outlives it
                # (and would hold a slot in the next test's registry) if it were killed.
                proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(30):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        async with asyncio.timeout(30):
            await asyncio.gather(*drains)


def _hello(model: str, slots: int) -> bytes:
    return encoder.encode(Hello(model, "cpu", 24000, 24000, 1920, slots))


async def test_a_qwen3_omni_worker_on_the_cluster_answers_an_edges_call(
    ray_cluster: Cluster, workers: list[Started], start_server: StartServer, tiny_models: Path
) -> None:
    """The same worker actor serves a turn-based streamed model; a Moshi worker beside it (the
    edge did not ask for that model) takes none of the calls."""
    spec = f"qwen3-omni:{tiny_models / 'tiny-qwen3-omni'}"
    await asyncio.gather(
        start(workers, spec, "omni", max_calls=2, evict_after_s=5, max_restarts=0),
        start(workers, f"moshi:{tiny_models / 'tiny-moshi'}", "other", max_calls=4),
    )
    server = await start_server(model=spec, ray_address=ray_cluster.address)
    backend = server.app[BACKEND]
    assert isinstance(backend, ClusterBackend) and backend.turn_based
    off = {"audio": {"input": {"turn_detection": None}}}
    peers = [Peer(server.url, MicTrack(), session=off) for _ in range(2)]
    try:
        for peer in peers:
            await peer.connect()
            await peer.next_event("session.created", timeout=10)
            assert backend.where(call_id(peer)) == "omni"
            item = {"type": "message", "role": "user",
                    "content": [{"type": "input_text", "text": "hello"}]}  # fmt: skip
            peer.send({"type": "conversation.item.create", "item": item})
            peer.send({"type": "response.create"})
        for peer in peers:
            done = await peer.next_event("response.done", timeout=60)
            assert done["response"]["status"] == "completed"
            await peer.next_event("output_audio_buffer.started", timeout=10)
        assert (await states())["other"].calls == ()
    finally:
        for peer in peers:
            await peer.close()


def test_the_registry_places_calls_on_the_worker_of_their_model_with_most_room() -> None:
    now = [100.0]
    reg = WorkerRegistry(clock=lambda: now[0])
    reg.register("small", "1", _hello("moshi:a", 2), None, 15.0)
    reg.register("big", "1", _hello("moshi:a", 3), None, 15.0)
    reg.register("other", "1", _hello("moshi:b", 8), None, 15.0)
    placed = [reg.place("moshi:a", [f"c{i}"]) for i in range(5)]
    names = [p.name if p is not None else None for p in placed]
    # Never the worker of another model, however free; most free slots first; then full.
    assert names == ["big", "small", "big", "small", "big"]
    assert reg.place("moshi:a", ["c5"]) is None
    # Reports say which placed calls a worker holds, and then which it no longer holds; an
    # edge's release frees a place at once.
    reg.report("big", "1", ["c0", "c2"], 12.0)
    assert {s.name: s.free for s in reg.workers()}["big"] == 0  # c4 is on its way
    reg.report("big", "1", ["c0"], 12.0)
    assert {s.name: s.free for s in reg.workers()}["big"] == 1
    reg.release("small", ["c1"])
    assert reg.place("moshi:a", ["c6", "c7"], exclude="big") is None
    assert reg.place("moshi:a", ["c6"], exclude="big") is not None
    # News of a dead incarnation does not touch the restarted one.
    reg.down("big", "1")
    assert reg.place("moshi:a", ["c8"]) is None
    reg.register("big", "2", _hello("moshi:a", 3), None, 15.0)
    reg.down("big", "1")
    placed_again = reg.place("moshi:a", ["c8"])
    assert placed_again is not None and placed_again.incarnation == "2"
    # An edge that gave up waiting for a place (the registry was slow) lets it go.
    free = {s.name: s.free for s in reg.workers()}
    assert reg.place("moshi:a", ["late"]) is not None
    reg.forget(["late"])
    assert {s.name: s.free for s in reg.workers()} == free


def test_a_worker_found_gone_takes_calls_again_once_it_reports_past_its_eviction_time() -> None:
    """An edge that missed a tick's deadline marks the worker down; one that was only slow
    reports on and takes calls again once the calls moved off it were evicted; one that died
    stops reporting and stays out."""
    now = [100.0]
    reg = WorkerRegistry(clock=lambda: now[0])
    for name in ("slow", "dead"):
        reg.register(name, "1", _hello("moshi:a", 2), None, 5.0)
        reg.down(name, "1")
    assert reg.place("moshi:a", ["c0"]) is None
    now[0] += 6.5
    reg.report("slow", "1", [], 1.0)
    assert reg.place("moshi:a", ["c0"]) is None  # not yet: eviction time and two reports
    now[0] += 1.0
    reg.report("slow", "1", [], 1.0)
    placed = reg.place("moshi:a", ["c0"])
    assert placed is not None and placed.name == "slow"
    assert reg.place("moshi:a", ["c1", "c2"]) is None  # "dead" never reported again


def test_a_stopped_worker_stays_gone_and_a_long_silent_one_is_forgotten() -> None:
    """A worker being stopped may report once more after it left: that report does not bring
    it back (it registered again, taking calls for seconds and listed for good). One silent
    for five minutes (dead for good: a lost node, its restarts used up) is forgotten; if it
    reports after all, it registers again."""
    now = [100.0]  # (incarnations are unique: a uuid each start)
    reg = WorkerRegistry(clock=lambda: now[0])
    reg.register("stopping", "1", _hello("moshi:a", 2), None, 5.0)
    reg.register("lost", "l1", _hello("moshi:a", 2), None, 5.0)
    reg.leave("stopping")
    assert reg.report("stopping", "1", [], 1.0)  # no "register again"
    reg.register("stopping", "1", _hello("moshi:a", 2), None, 5.0)
    assert [s.name for s in reg.workers()] == ["lost"]
    reg.register("stopping", "2", _hello("moshi:a", 2), None, 5.0)  # started anew: welcome
    now[0] += 299.0
    reg.report("stopping", "2", [], 1.0)
    assert {s.name for s in reg.workers()} == {"stopping", "lost"}
    now[0] += 2.0
    assert [s.name for s in reg.workers()] == ["stopping"]
    assert not reg.report("lost", "l1", [], 1.0)  # so it registers again


def test_a_bad_or_unreachable_ray_address_is_a_clear_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["serve", "--ray-address", "auto", "--model", "echo"])
    assert "--ray-address serves moshi:PATH_OR_HUB_ID and qwen3-omni:" in capsys.readouterr().err
    # The model's device is each worker's own: an edge's would be ignored.
    for ignored in (["--device", "cuda"], ["--cuda-graphs", "off"]):
        with pytest.raises(SystemExit):
            parse_settings(["serve", "--ray-address", "auto", "--model", "moshi:m", *ignored])
        assert "are the workers' with --ray-address" in capsys.readouterr().err
    with pytest.raises(ClusterUnavailable, match="neither HOST:PORT nor auto"):
        connect("localhost")
    with pytest.raises(ClusterUnavailable, match=r"no Ray cluster answers at 127\.0\.0\.1:1"):
        connect("127.0.0.1:1")


async def test_serve_reports_an_unreachable_cluster_and_never_imports_ray_without_one() -> None:
    edge = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "s2s", "serve", "--port", "0", "--model", "moshi:nowhere",
        "--ray-address", "127.0.0.1:1", stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        _, err = await edge.communicate()
    assert edge.returncode == 2
    assert b"no Ray cluster answers at 127.0.0.1:1" in err
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "s2s", "worker", "--model", "moshi:nowhere",
        "--ray-address", "nowhere", stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        _, err = await worker.communicate()
    assert worker.returncode == 2
    assert b"--ray-address 'nowhere' is neither HOST:PORT nor auto" in err
    # Ray shows a worker the one GPU it gives it, as cuda:0: cuda:1 would fail to load.
    gpu = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "s2s", "worker", "--model", "moshi:nowhere", "--device", "cuda:1",
        "--ray-address", "nowhere", stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        _, err = await gpu.communicate()
    assert gpu.returncode == 2 and b"sees only the GPU Ray gives it" in err
    probe = (
        "import sys, asyncio\n"
        "from s2s.cli import parse_settings\n"
        "from s2s.app import create_app\n"
        "create_app(parse_settings(['serve', '--model', 'echo'])[0])\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    plain = await asyncio.create_subprocess_exec(
        sys.executable, "-c", probe, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        _, err = await plain.communicate()
    assert plain.returncode == 0, err.decode()


async def _wait_line(
    proc: asyncio.subprocess.Process, pattern: re.Pattern[bytes]
) -> re.Match[bytes]:
    """The first line ``proc`` writes to stderr that matches ``pattern``."""
    assert proc.stderr is not None
    said = []
    async with asyncio.timeout(90):
        while not (match := pattern.search(line := await proc.stderr.readline())):
            said.append(line)
            assert line, b"".join(said).decode(errors="replace")
    return match


async def _pid(actor: Any) -> int | None:
    """The actor's process id; None while it is down or restarting."""
    try:
        pid: int = await answer(actor.pid.remote())
    except ray.exceptions.RayActorError:  # ActorUnavailableError too
        return None
    return pid


async def _get(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return await resp.text()


async def _sendonly_offer() -> str:
    """An aiortc offer whose audio only goes out: the server refuses it after placing it."""
    from s2s.rtc import new_peer_connection

    pc = new_peer_connection()
    pc.addTransceiver("audio", direction="sendonly")
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    await pc.close()
    return str(pc.localDescription.sdp)


async def _post_offer(base: str, sdp: str) -> str:
    """``"STATUS body"`` of an offer posted to the server at ``base``."""
    import aiohttp

    url, headers = base + "/v1/realtime/calls", {"Content-Type": "application/sdp"}
    async with aiohttp.ClientSession() as http, http.post(url, data=sdp, headers=headers) as resp:
        return f"{resp.status} {await resp.text()}"
