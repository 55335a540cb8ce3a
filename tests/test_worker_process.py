"""A model worker's process and its server: it never outlives the server, nor a start given up.

The model here never finishes loading: it is a hub id, and the hub (``HF_ENDPOINT``) a local
socket that takes connections and never answers, as a black-holed network or a stuck mount
would leave a load."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from s2s.worker.process import WorkerOptions, WorkerProcess

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def hung_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with socket.socket() as hub:
        hub.bind(("127.0.0.1", 0))
        hub.listen(16)
        # The worker is spawned with this process's environment.
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "600")
        monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "600")
        yield "moshi:someone/never-answered"


async def test_a_start_given_up_kills_the_loading_worker(hung_model: str) -> None:
    """A server that stops while its worker loads (shutdown, a replacement no longer wanted)
    kills it: left loading, it would hold a second model on the device, and the thread waiting
    for its hello would keep the server from exiting."""
    loop = asyncio.get_running_loop()
    before = set(multiprocessing.active_children())
    starting = asyncio.create_task(WorkerProcess.start(WorkerOptions(hung_model)))
    async with asyncio.timeout(30):
        while not (children := set(multiprocessing.active_children()) - before):  # noqa: ASYNC110 - no event for a child's start
            await asyncio.sleep(0.05)
    (child,) = children
    assert child.pid is not None
    # In a session of its own (once it has started): Ctrl-C at the terminal reaches the
    # server, not the worker.
    async with asyncio.timeout(30):
        while os.getsid(child.pid) != child.pid:  # noqa: ASYNC110 - no event for it
            await asyncio.sleep(0.05)
    assert os.getsid(0) != child.pid
    starting.cancel()
    async with asyncio.timeout(10):
        with pytest.raises(asyncio.CancelledError):
            await starting
        while child.is_alive():  # noqa: ASYNC110 - joined by the start that was given up
            await asyncio.sleep(0.05)
        await loop.shutdown_default_executor()  # no thread still waits for its hello


async def test_a_loading_worker_ends_when_its_server_is_killed(hung_model: str) -> None:
    """A server killed outright (SIGKILL, out of memory) closes nothing while its worker loads;
    the worker sees it is gone and ends."""
    script = (
        "import asyncio, multiprocessing, sys\n"
        "from s2s.worker.process import WorkerOptions, WorkerProcess\n"
        "async def main():\n"
        f"    task = asyncio.create_task(WorkerProcess.start(WorkerOptions({hung_model!r})))\n"
        "    while not multiprocessing.active_children():\n"
        "        await asyncio.sleep(0.05)\n"
        "    print(multiprocessing.active_children()[0].pid, flush=True)\n"
        "    await task\n"
        "asyncio.run(main())\n"
    )
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    assert server.stdout is not None
    try:
        async with asyncio.timeout(60):
            pid = int(await server.stdout.readline())
    finally:
        server.kill()
        await server.wait()
    async with asyncio.timeout(10):
        while _running(pid):  # noqa: ASYNC110 - another's child: no way to wait on it
            await asyncio.sleep(0.1)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie no one reaps has)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "Z" not in state.split()[1]
