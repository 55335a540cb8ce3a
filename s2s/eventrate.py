"""How much a call may send on its data channel, and what happens past that.

Each call has two token buckets, events a second and bytes a second, each with a burst of two
seconds' worth, the bytes' at least one largest picture in base64, so a picture upload can go
at full speed (an 8 MB photo is 10.7 MB of chunks: a 2 MB burst refused its end and, a few
chunks later, ended the call as a flood). Past them an event is dropped; the
client hears so at most once a second, not once per event. A client that keeps pushing runs up
an overdraft (seconds of its allowance refused and not yet forgiven); past ``FLOOD_S`` of it the
call is cut off: aiortc decrypts and reassembles every message before s2s can refuse it, so a
flood would slow every call on the server.
"""

from __future__ import annotations

import enum
import math
import time

from s2s.config import Settings

#: Seconds of allowance a call may push past its limit before it is cut off.
FLOOD_S = 1.0


class Verdict(enum.Enum):
    ACCEPT = enum.auto()
    #: Dropped, and the client should hear so.
    REFUSE = enum.auto()
    #: Dropped; the client heard why less than a second ago.
    REFUSE_QUIETLY = enum.auto()
    #: Dropped, and the call should end.
    FLOOD = enum.auto()


class EventRate:
    """A call's client-event allowance (see the module's docstring)."""

    def __init__(self, events_per_s: float, bytes_per_s: float, burst_bytes: float = 0) -> None:
        self._rates = (events_per_s, bytes_per_s)
        self._bursts = (2 * events_per_s, max(2 * bytes_per_s, burst_bytes))
        self._tokens = list(self._bursts)
        self._at = time.monotonic()
        self._overdraft_s = 0.0
        self._told_at = -math.inf

    def take(self, size: int) -> Verdict:
        now = time.monotonic()
        elapsed, self._at = now - self._at, now
        for i, rate in enumerate(self._rates):
            self._tokens[i] = min(self._bursts[i], self._tokens[i] + elapsed * rate)
        self._overdraft_s = max(0.0, self._overdraft_s - elapsed)
        if self._tokens[0] >= 1 and self._tokens[1] >= size:
            self._tokens[0] -= 1
            self._tokens[1] -= size
            return Verdict.ACCEPT
        self._overdraft_s += max(1 / self._rates[0], size / self._rates[1])
        if self._overdraft_s > FLOOD_S:
            return Verdict.FLOOD
        if now - self._told_at < 1.0:
            return Verdict.REFUSE_QUIETLY
        self._told_at = now
        return Verdict.REFUSE


def event_rate(settings: Settings) -> EventRate:
    """A call's (or a sideband's) allowance under ``settings``: its byte burst holds the largest
    picture's chunks (base64, a message's framing on each)."""
    picture = settings.image_max_bytes * 4 / 3 + settings.max_event_bytes
    return EventRate(settings.max_events_per_s, settings.max_event_bytes_per_s, picture)
