"""The worker processes of one server, as one worker sees them.

``s2s serve --workers N`` runs N processes (see ``s2s.supervisor``) that share a run directory:
one unix socket per worker (calls are forwarded to their owner over it) and a table of live-call
counts (``calls``) that every worker maps: one row per worker, written only by that worker, of
its calls and then its calls per server key. The table's file lock makes "is the server (or this
key) at its limit? if not, count this call" atomic across workers. With webhooks, each started
call also has a file in ``live`` (its start time), so that the calls of a worker that dies get
their ``realtime.call.ended`` from the supervisor.
Pure bookkeeping over files: the HTTP side is in ``signaling`` and ``forwarding``.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import time
from array import array
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MAX_WORKERS = 256  # the owner is one byte of the call id
_SLOT = 8
_COUNTS_FILE = "calls"
_LIVE_DIR = "live"


def new_call_id(worker: int | None = None) -> str:
    """A call id; with ``worker``, its first byte names the worker that owns the call."""
    if worker is None:
        return f"rtc_{secrets.token_hex(12)}"
    return f"rtc_{worker:02x}{secrets.token_hex(11)}"


def create_run_dir(run_dir: Path, size: int, keys: int) -> None:
    """Lay out a fresh run directory for ``size`` workers and ``keys`` server keys."""
    (run_dir / "secrets").mkdir(mode=0o700)
    (run_dir / _LIVE_DIR).mkdir(mode=0o700)
    (run_dir / _COUNTS_FILE).write_bytes(bytes(_SLOT * (1 + keys) * size))


def forget_worker(run_dir: Path, worker: int, keys: int) -> None:
    """After worker ``worker`` died: its calls are gone, and so is its socket until it is back."""
    _socket_path(run_dir, worker).unlink(missing_ok=True)
    fd = os.open(run_dir / _COUNTS_FILE, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(_SLOT * (1 + keys)), _SLOT * (1 + keys) * worker)
    finally:
        os.close(fd)


def take_live_calls(run_dir: Path, worker: int) -> list[tuple[str, float]]:
    """After worker ``worker`` is gone: the calls it had started and not ended, each with its
    start (``time.monotonic()``, one clock for every process of the machine); forgotten here."""
    taken = []
    for path in (run_dir / _LIVE_DIR).glob(f"rtc_{worker:02x}*"):
        try:
            started = float(path.read_text())
        except ValueError:  # the worker died while writing it
            started = path.stat().st_mtime - time.time() + time.monotonic()
        path.unlink()
        taken.append((path.name, started))
    return taken


def _socket_path(run_dir: Path, worker: int) -> Path:
    return run_dir / f"worker-{worker}.sock"


@dataclass(frozen=True, slots=True)
class Load:
    """Every worker's calls, read under the admission lock."""

    calls: list[int]  # per worker
    _per_key: dict[str, int]  # over all workers

    @property
    def total(self) -> int:
        return sum(self.calls)

    def held_by(self, key: str) -> int:
        return self._per_key.get(key, 0)


class Pool:
    """Worker ``index`` of ``size``: where the others listen and how many calls each holds.

    ``keys`` are the server's API keys, in order: each has a column of calls in the table.
    """

    def __init__(self, index: int, size: int, run_dir: Path, keys: tuple[str, ...] = ()) -> None:
        if not 0 <= index < size <= MAX_WORKERS:
            raise ValueError(f"worker {index} of {size} (at most {MAX_WORKERS} workers)")
        self.index = index
        self.size = size
        self.run_dir = run_dir
        self._keys = keys
        self._width = 1 + len(keys)
        self._fd = os.open(run_dir / _COUNTS_FILE, os.O_RDWR)
        self._map = mmap.mmap(self._fd, _SLOT * self._width * size)
        self._slots = memoryview(self._map).cast("q")

    def close(self) -> None:
        self._slots.release()
        self._map.close()
        os.close(self._fd)

    @property
    def secrets_dir(self) -> Path:
        return self.run_dir / "secrets"

    def socket_path(self, worker: int) -> Path:
        """Worker ``worker``'s private socket; it exists while that worker is up."""
        return _socket_path(self.run_dir, worker)

    def owner(self, call_id: str) -> int | None:
        """The worker that owns ``call_id``, or None if the id names no worker of this server."""
        if not call_id.startswith("rtc_"):
            return None
        try:
            worker = int(call_id[4:6], 16)
        except ValueError:
            return None
        return worker if worker < self.size else None

    def counts(self) -> list[int]:
        """Live calls per worker (a snapshot; other workers may change theirs at any time)."""
        return list(self._slots[:: self._width])

    def publish(self, calls: int, per_key: Mapping[str, int]) -> None:
        """Record this worker's live calls (negotiating ones included), in all and per key."""
        row = array("q", [calls, *(per_key.get(key, 0) for key in self._keys)])
        start = self.index * self._width
        self._slots[start : start + self._width] = memoryview(row)

    def call_started(self, call_id: str, started: float) -> None:
        """Note a started call (its ``time.monotonic()`` start) until ``call_ended``."""
        (self.run_dir / _LIVE_DIR / call_id).write_text(repr(started))

    def call_ended(self, call_id: str) -> None:
        (self.run_dir / _LIVE_DIR / call_id).unlink(missing_ok=True)

    def least_loaded(self) -> int:
        """The worker with the fewest calls; this one on a tie, so a call moves only if it helps.

        Workers without a socket (starting, or restarting after a crash) are left out.
        """
        counts = self.counts()
        up = [w for w in range(self.size) if w == self.index or self.socket_path(w).exists()]
        return min(up, key=lambda w: (counts[w], w != self.index))

    @contextmanager
    def admission(self) -> Iterator[Load]:
        """Hold every worker's admissions off while the caller checks the load and publishes."""
        # A file lock held for microseconds: the check and the count it guards stay atomic
        # across processes, so --max-sessions and --max-calls-per-key hold for the whole server.
        # Calls only ever end outside it, which can make a check stricter, never looser.
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            slots = list(self._slots)
            per_key = {key: sum(slots[1 + k :: self._width]) for k, key in enumerate(self._keys)}
            yield Load(slots[:: self._width], per_key)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
