"""``s2s serve`` as a user runs it: a real process, default flags, clean shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

import aiohttp
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_serve_starts_with_defaults_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "s2s",
        "serve",
        "--port",
        str(port),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        said: list[bytes] = []
        async with asyncio.timeout(30):
            while b"listening on" not in (line := await proc.stderr.readline()):
                said.append(line)
                assert line, b"".join(said).decode(errors="replace")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/healthz") as r,
        ):
            assert r.status == 200
            assert (await r.json())["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sigterm_tells_callers_refuses_new_calls_and_exits_after_the_grace() -> None:
    from tests.peer import CallRefused, Peer

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "s2s", "serve", "--model", "echo", "--port", str(port),
        "--shutdown-grace", "2", stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    peer = Peer(f"http://127.0.0.1:{port}")
    try:
        async with asyncio.timeout(30):
            while b"listening on" not in await proc.stderr.readline():
                pass
        await peer.connect()
        await peer.next_event("session.created")
        proc.send_signal(signal.SIGTERM)
        notice = await peer.next_event("s2s.server.shutdown", timeout=5)
        assert notice["grace_s"] == 2
        late = Peer(f"http://127.0.0.1:{port}")
        with pytest.raises(CallRefused) as refused:
            await late.connect()
        assert refused.value.status == 503
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    finally:
        await peer.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_gpu_models_default_to_one_worker_cpu_models_to_one_per_core() -> None:
    import os

    from s2s.cli import default_workers

    cores = len(os.sched_getaffinity(0))
    assert default_workers("echo") == default_workers("local") == cores
    assert default_workers("moshi:kyutai/moshiko-pytorch-bf16") == 1
    assert default_workers("qwen-omni:/models/qwen") == 1
