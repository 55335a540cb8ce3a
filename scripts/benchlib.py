"""What the benchmark scripts share: a server of their own on a free port, and percentiles."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(*args: str, cpus: set[int] | None = None) -> Iterator[tuple[str, int]]:
    """Run ``s2s serve ARGS`` on a free port (pinned to ``cpus``); yields its URL and pid.

    One server process (``--workers 1``) unless ARGS say otherwise: the benchmarks measure the
    pid they are given (CPU, memory), which with several workers would be the supervisor's.
    """
    port = free_port()
    command = [sys.executable, "-m", "s2s", "serve", "--port", str(port), "--log-level",
               "WARNING", "--workers", "1", *args]  # fmt: skip
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    server = subprocess.Popen(command, cwd=ROOT, preexec_fn=pin)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", server.pid
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
