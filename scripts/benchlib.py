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
from typing import Any

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


def profile_step(step: Any, device: str) -> tuple[int, int, int]:
    """Operators, host syncs and allocations in one call of ``step`` (torch's profiler).

    Operators are the top-level ``aten`` ops the host dispatches (about one kernel launch
    each on a GPU); host syncs are the ops that read a device value back
    (``_local_scalar_dense``) and, on CUDA, explicit synchronisations and blocking copies; on a
    CPU only the first kind shows (``s2s.hosttraffic`` counts the rest on any device)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    # No synchronisation inside: it would be counted as the step's. Only host-side events
    # are counted, and those are all recorded by the time ``step`` returns.
    with profile(activities=activities, profile_memory=True) as prof:
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    events = prof.events()
    ops = sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)
    syncs = sum(
        1 for e in events
        if (e.name == "aten::_local_scalar_dense" and not _in_grouped_mm(e))
        or e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize")
        or (e.name.startswith("cudaMemcpy") and "Async" not in e.name)
    )  # fmt: skip
    allocations = sum(1 for e in events if e.name == "[memory]" and e.cpu_memory_usage > 0)
    if device.startswith("cuda"):
        allocations = sum(1 for e in events if e.name == "[memory]" and e.device_memory_usage > 0)
    return ops, syncs, allocations


def host_traffic(step: Any) -> tuple[int, int]:
    """Host reads (each a host sync on a GPU) and uploads (tensors of host values) in one
    call of ``step``, counted on any device (``s2s.hosttraffic``)."""
    from s2s.hosttraffic import HostTraffic

    with HostTraffic() as traffic:
        step()
    return traffic.reads.total(), traffic.uploads.total()


def _in_grouped_mm(event: Any) -> bool:
    """Whether a profiler event runs inside ``grouped_mm``, whose CPU kernel reads each group's
    offset on the host (CUDA's reads them on the device): not a host sync on a GPU."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == "aten::_grouped_mm":
            return True
        parent = parent.cpu_parent
    return False
