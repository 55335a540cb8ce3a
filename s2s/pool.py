"""The worker processes of one server, as one worker sees them.

``s2s serve --workers N`` runs N processes (see ``s2s.supervisor``) that share a run directory:
one unix socket per worker (calls are forwarded to their owner over it) and a table of live-call
counts (``calls``), one 8-byte slot per worker, that every worker maps and only its owner writes.
The table's file lock makes "is the server full? then count this call" atomic across workers.
Pure bookkeeping over files: the HTTP side is in ``signaling`` and ``forwarding``.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MAX_WORKERS = 256  # the owner is one byte of the call id
_SLOT = 8
_COUNTS_FILE = "calls"


def new_call_id(worker: int | None = None) -> str:
    """A call id; with ``worker``, its first byte names the worker that owns the call."""
    if worker is None:
        return f"rtc_{secrets.token_hex(12)}"
    return f"rtc_{worker:02x}{secrets.token_hex(11)}"


def create_run_dir(run_dir: Path, size: int) -> None:
    """Lay out a fresh run directory for ``size`` workers (the supervisor does this once)."""
    (run_dir / "secrets").mkdir(mode=0o700)
    (run_dir / _COUNTS_FILE).write_bytes(bytes(_SLOT * size))


def forget_worker(run_dir: Path, worker: int) -> None:
    """After worker ``worker`` died: its calls are gone, and so is its socket until it is back."""
    _socket_path(run_dir, worker).unlink(missing_ok=True)
    fd = os.open(run_dir / _COUNTS_FILE, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(_SLOT), _SLOT * worker)
    finally:
        os.close(fd)


def _socket_path(run_dir: Path, worker: int) -> Path:
    return run_dir / f"worker-{worker}.sock"


class Pool:
    """Worker ``index`` of ``size``: where the others listen and how many calls each holds."""

    def __init__(self, index: int, size: int, run_dir: Path) -> None:
        if not 0 <= index < size <= MAX_WORKERS:
            raise ValueError(f"worker {index} of {size} (at most {MAX_WORKERS} workers)")
        self.index = index
        self.size = size
        self.run_dir = run_dir
        self._fd = os.open(run_dir / _COUNTS_FILE, os.O_RDWR)
        self._map = mmap.mmap(self._fd, _SLOT * size)
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
        return list(self._slots)

    def publish(self, calls: int) -> None:
        """Record this worker's live calls (negotiating ones included)."""
        self._slots[self.index] = calls

    def least_loaded(self) -> int:
        """The worker with the fewest calls; this one on a tie, so a call moves only if it helps.

        Workers without a socket (starting, or restarting after a crash) are left out.
        """
        counts = self.counts()
        up = [w for w in range(self.size) if w == self.index or self.socket_path(w).exists()]
        return min(up, key=lambda w: (counts[w], w != self.index))

    @contextmanager
    def admission(self) -> Iterator[list[int]]:
        """Hold every worker's admissions off while the caller checks and updates the counts."""
        # A file lock held for microseconds: the check and the count it guards stay atomic
        # across processes, so --max-sessions is exact for the whole server.
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield self.counts()
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
