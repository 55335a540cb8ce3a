"""One call's ``oai-events`` data channel: server events out, client events in.

Server events sent before the channel opens are kept (up to a bound) and go out when it does;
every one is also copied to the call's sideband listeners. Client events are rate-limited
(``EventRate``), queued (bounded; refused with an ``error`` when full) and decoded one at a time.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from aiortc import RTCDataChannel

from s2s.config import Settings
from s2s.eventrate import FLOOD_S, EventRate, Verdict, event_rate
from s2s.log import CallLogger
from s2s.protocol.client_events import AnyClientEvent
from s2s.protocol.codec import EventError, decode_client_event, encode_event, utf8_size
from s2s.protocol.server_events import Error, ErrorDetail, ServerEvent

EVENTS_LABEL = "oai-events"
# Client events waiting to be handled (the caller's, and app backends' apart); past this, new
# ones are refused with an error event.
_INBOX_SIZE = 256
# Server events sent before the data channel opened, kept until it does.
_PENDING_EVENTS = 256
# ... and at most this many characters of them (4 MiB of memory at most).
_PENDING_CHARS = 1 << 20
# Server events sent but not yet out on SCTP past which the call ends (``slow_consumer``).
_MAX_BUFFERED_BYTES = 16 * 1024 * 1024
# How long a flooding call lives on after it is cut off, for its last errors to leave.
_CUT_OFF_GRACE_S = 0.2


class EventChannel:
    """The events of one call; ``end`` ends the call (a client that keeps flooding is cut off)."""

    def __init__(self, settings: Settings, log: CallLogger, end: Callable[[str], None]) -> None:
        self.log = log
        #: Sideband watchers: each gets every server event's JSON, as the data channel does.
        self.listeners: set[Callable[[str], None]] = set()
        self._end = end
        self._max_event_bytes = settings.max_event_bytes
        self._channel: RTCDataChannel | None = None
        self._pending: deque[str] = deque()
        self._pending_chars = 0
        # The caller's events and app backends' (sidebands'), each bounded; a backend's are
        # handled first, so its steering (a cancel, a tool's output) never waits behind the
        # caller's backlog of, say, pictures to decode.
        self._inbox: deque[bytes | str] = deque()
        self._backend_inbox: deque[bytes | str] = deque()
        self._arrived = asyncio.Event()
        self._rate = event_rate(settings)
        self._cut_off = False
        self._slow = False

    @property
    def attached(self) -> bool:
        """Whether the call's data channel has been taken (a second one is refused)."""
        return self._channel is not None

    def attach(self, channel: RTCDataChannel, first: ServerEvent) -> None:
        """Take the call's data channel: send ``first``, then every event kept until now."""
        self._channel = channel
        channel.on("message", self.receive)
        self.send(first)
        while self._pending and channel.readyState == "open":
            text = self._pending.popleft()
            self._pending_chars -= len(text)
            channel.send(text)

    def send(self, event: ServerEvent, *, keep: bool = True) -> None:
        """Send a server event to the client, or keep it until the data channel opens.

        An event that is stale by then (``keep=False``) is not kept, only sent to listeners.
        """
        text = encode_event(event)
        if (size := utf8_size(text)) > self._max_event_bytes:
            # Our own bug if it happens; the call must survive it, and the client hear of it.
            self.log.error("dropped a %d-byte %s event", size, type(event).__name__)
            detail = ErrorDetail(
                type="server_error", code="event_too_large",
                message=f"a server event of {size} bytes was too large to send",
            )  # fmt: skip
            text = encode_event(Error(error=detail))
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            if channel.bufferedAmount > _MAX_BUFFERED_BYTES:
                # aiortc queues what SCTP has not sent without bound: a client that asks for
                # more than it reads (or keeps its window shut) would fill the server's memory.
                if not self._slow:
                    self._slow = True
                    self.log.warning("%d bytes of events unsent: ending the call",
                                     channel.bufferedAmount)  # fmt: skip
                    self._end("slow_consumer")
            else:
                channel.send(text)
        elif keep:
            self._pending.append(text)
            self._pending_chars += len(text)
            # The oldest go past either bound (an app backend's sideband can make events of
            # 256 KiB each before the caller's channel opens).
            while len(self._pending) > _PENDING_EVENTS or self._pending_chars > _PENDING_CHARS:
                self._pending_chars -= len(self._pending.popleft())
        for listener in list(self.listeners):
            listener(text)

    async def next_event(self) -> AnyClientEvent:
        """The next client event that decodes; each that does not is answered with an error."""
        while True:
            while not (self._backend_inbox or self._inbox):
                self._arrived.clear()
                await self._arrived.wait()
            raw = (self._backend_inbox or self._inbox).popleft()
            try:
                return decode_client_event(raw, max_bytes=self._max_event_bytes)
            except EventError as exc:
                self.log.debug("bad client event: %s", exc)
                self.send(Error(error=exc.detail))

    def receive(self, message: bytes | str, rate: EventRate | None = None) -> bool:
        """A client event from the data channel, or from an app backend's sideband connection
        with its own ``rate`` (so its bursts neither cost the caller's events nor end the call).
        False once that sender floods: it is to be cut off."""
        if self._cut_off:
            return False
        if isinstance(message, str) and not message.isascii():
            # Limits count bytes, not characters; encoded once here, the decoder's size check
            # then costs nothing.
            message = message.encode()
        match (rate or self._rate).take(len(message)):
            case Verdict.ACCEPT:
                pass
            case Verdict.REFUSE:
                self.send(Error(error=ErrorDetail(
                    code="rate_limited", type="limit_error",
                    message="too many client events or bytes per second; events are being "
                    "dropped",
                )))  # fmt: skip
                return True
            case Verdict.REFUSE_QUIETLY:
                return True
            case Verdict.FLOOD if rate is not None:
                return False
            case Verdict.FLOOD:
                # The call ends a moment later, so the errors already queued reach the client.
                self._cut_off = True
                self.send(Error(error=ErrorDetail(
                    code="rate_limited", type="limit_error",
                    message=f"over {FLOOD_S:.0f} s worth of events or bytes past the limit; "
                    "the call is ended",
                )))  # fmt: skip
                loop = asyncio.get_running_loop()
                loop.call_later(_CUT_OFF_GRACE_S, self._end, "rate_limited")
                return False
        inbox = self._inbox if rate is None else self._backend_inbox
        if len(inbox) >= _INBOX_SIZE:
            self.send(Error(error=ErrorDetail(
                code="event_queue_full",
                message=f"more than {_INBOX_SIZE} events are waiting; this one was dropped",
            )))  # fmt: skip
            return True
        inbox.append(message)
        self._arrived.set()
        return True
