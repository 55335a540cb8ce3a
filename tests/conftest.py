from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from s2s.app import create_app
from s2s.config import Settings
from s2s.registry import SessionRegistry
from s2s.signaling import REGISTRY


class Server:
    """A real s2s app on a loopback port."""

    def __init__(self, app: web.Application, runner: web.AppRunner, url: str) -> None:
        self.app = app
        self.runner = runner
        self.url = url

    @property
    def registry(self) -> SessionRegistry:
        return self.app[REGISTRY]


StartServer = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    runners: list[web.AppRunner] = []

    async def start(**overrides: Any) -> Server:
        settings = replace(Settings(host="127.0.0.1", port=0, model="echo"), **overrides)
        app = create_app(settings)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return Server(app, runner, f"http://{host}:{port}")

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def server(start_server: StartServer) -> Server:
    return await start_server()


@pytest.fixture(autouse=True)
def _quiet_aioice() -> None:
    logging.getLogger("aioice").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tiny random Moshi/Mimi/Qwen2.5-Omni checkpoints from scripts/make_tiny_models.py, offline."""
    out = tmp_path_factory.mktemp("models")
    script = Path(__file__).resolve().parent.parent / "scripts" / "make_tiny_models.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(script), str(out)], check=True, env=env, timeout=300)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield out
