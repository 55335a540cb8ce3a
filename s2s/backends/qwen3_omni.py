"""``qwen3-omni:PATH_OR_HUB_ID``: Qwen3-Omni, streamed, every answering call in one step.

Qwen3-Omni hears speech, sees pictures and answers in speech. Its model worker (a process of its
own that owns the device, ``s2s.worker.omni``) runs ``s2s.omni.engine.OmniEngine``: a response
starts with a prefill of the conversation (the committed turn's audio, the latest picture, the
earlier turns' text), then every step makes one text token and one 80 ms frame of speech for
every call that is answering, so the first audio leaves after the prefill and one step instead
of after the whole reply.

This side keeps each call's turns (its committed audio by item id) and sends a ``respond``
change with the conversation; the scheduler ticks the worker back to back while any call is
answering (each tick one step for all of them) and hands each call the frames of its response.
Each response's text goes with the speech that says it, and a tool call in it is made, not
read out (``s2s.backends.qwen3_reply``).
A reset (barge-in, ``response.cancel``) cancels the call's response in the worker at its next
tick; whatever of it is still on the way is dropped here by its response id. If the worker dies,
another starts and every call rejoins it; a response in progress ends, and its call hears
``model_unavailable``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging

import msgspec
import numpy as np

from s2s.backends.base import (
    EMPTY_PCM,
    ModelEvent,
    ModelUnavailable,
    ResponseFailed,
    ResponseRequest,
    Steering,
    StepResult,
    keep_latest,
)
from s2s.backends.qwen3_reply import Reply
from s2s.log import CallLogger
from s2s.protocol.items import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputText,
    MessageItem,
    OutputAudio,
    OutputText,
)
from s2s.protocol.session_config import RetentionRatio
from s2s.tools import tools_prompt
from s2s.worker.handle import RESTART_BACKOFF_S, WorkerHandle
from s2s.worker.messages import CallOutput, Change, Respond, Tick, Turn
from s2s.worker.process import WorkerError, WorkerOptions, WorkerProcess

log = logging.getLogger(__name__)

_MAX_TURN_FRAMES = 1500  # 30 s of uncommitted audio, in 20 ms frames
#: Qwen3-Omni's audio encoder gives 13 tokens per second of speech (a little more for short
#: clips); 12 is below it, so turns whose audio is let go (``Qwen3OmniStream.commit``) never fit
#: in a prompt anyway.
_AUDIO_TOKENS_PER_S = 12
_KEPT_PICTURES = 16  # pictures shown with earlier turns that stay there
#: Committed turns' audio kept at most, however short (a conversation holds 500 items).
_COMMITTED_TURNS = 500
KEEPALIVE_S = 1.0


class Qwen3OmniBackend:
    name = "qwen3-omni"
    turn_based = True
    steers = False  # the prompt is fixed once prefilled

    def __init__(
        self, worker: WorkerHandle, prompt_tokens: int = 8192, prefill_tokens: int = 0
    ) -> None:
        self.worker = worker
        self.prompt_tokens = prompt_tokens
        self.prefill_tokens = prefill_tokens
        hello = worker.hello
        self.input_rate, self.output_rate = hello.input_rate, hello.output_rate
        self.frame_samples = hello.frame_samples
        self._streams: dict[str, Qwen3OmniStream] = {}
        self._changes: list[Change] = []
        self._wake = asyncio.Event()
        self._scheduler = asyncio.create_task(self._schedule(), name="qwen3-omni/scheduler")

    @classmethod
    async def load(
        cls, location: str, device: str | None = None, *, max_calls: int = 8,
        prompt_tokens: int = 8192, prefill_tokens: int = 0, cuda_graphs: str = "auto",
    ) -> Qwen3OmniBackend:  # fmt: skip
        spec = f"qwen3-omni:{location}"
        options = WorkerOptions(spec, device, max_calls, cuda_graphs, prompt_tokens)
        worker = await WorkerProcess.start(options)
        return cls(worker, prompt_tokens, prefill_tokens)

    async def open_stream(self, call_id: str) -> Qwen3OmniStream:
        stream = Qwen3OmniStream(self, call_id)
        self._streams[call_id] = stream
        self.change(Change("join", call_id))
        return stream

    async def close(self) -> None:
        self._scheduler.cancel()
        await asyncio.gather(self._scheduler, return_exceptions=True)
        await self.worker.close()

    def change(self, change: Change) -> None:
        self._changes.append(change)
        self._wake.set()

    async def _schedule(self) -> None:
        """Tick whenever there are changes, back to back while any call is answering, and at
        least every ``KEEPALIVE_S`` while calls are open.

        Every tick names each open call with an empty frame: a shared worker (on a cluster)
        hands a tick back the outputs of the calls it names, and frees the slots of calls no
        tick has named for a while (their edge is gone).
        """
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KEEPALIVE_S if self._streams else None):
                    await self._wake.wait()
            self._wake.clear()
            changes, self._changes = self._changes, []
            named = dict.fromkeys(self._streams, b"")
            # The responses this tick is for: one asked for while it runs is not its to fail.
            asked = {call: s.answering for call, s in self._streams.items() if s.answering}
            try:
                result = await self.worker.tick(Tick(changes, named))
            except WorkerError as exc:
                await self._replace_worker(exc)
                continue
            if result.error:
                log.error("qwen3-omni step failed: %s", result.error)
                for call, response in asked.items():
                    stream = self._streams.get(call)
                    if stream is not None and stream.answering == response:
                        stream.end_response("failed: the model's step failed")
            for call, output in result.outputs.items():
                if (receiver := self._streams.get(call)) is None:
                    continue
                try:
                    receiver.receive(output)
                except Exception as exc:  # a fault in one call's output fails its response alone
                    log.exception("call %s: its output failed", call)
                    receiver.end_response(f"failed: {exc}")
            if self._changes or any(s.answering for s in self._streams.values()):
                self._wake.set()

    async def _replace_worker(self, died: WorkerError) -> None:
        """The worker died: every response under way or asked for fails now (not once another
        worker has loaded), and each call hears ``model_unavailable``; then another worker
        starts and every call joins it. Responses asked for while it loads go to it, with all of
        their call's audio and pictures (``worker_lost``)."""
        log.error("%s; starting another", died)
        self._changes = [c for c in self._changes if c.kind not in ("join", "respond")]
        message = "the model's worker restarted: this call's response ended"
        for stream in self._streams.values():
            stream.worker_lost()
            stream.notices.append(ModelUnavailable(message))
            stream.end_response("failed: the worker died")
        try:
            self.worker = await self.worker.replacement(list(self._streams))
        except Exception as exc:
            log.error("no model worker: %s", exc)
            for stream in self._streams.values():
                stream.end_response(f"failed: {exc}")
            self._changes = [c for c in self._changes if c.kind != "respond"]
            await asyncio.sleep(RESTART_BACKOFF_S)  # before the next tick tries again
            return
        pending = [c for c in self._changes if c.kind != "join"]
        self._changes = [Change("join", call) for call in self._streams] + pending
        self._wake.set()


class Qwen3OmniStream:
    """One call's turns on this side, and the frames of its response on their way out."""

    def __init__(self, backend: Qwen3OmniBackend, call_id: str) -> None:
        self._b = backend
        self.call_id = call_id
        self._log = CallLogger(log, call_id)
        self._turn: collections.deque[np.ndarray] = collections.deque(maxlen=_MAX_TURN_FRAMES)
        self._committed: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        #: The pictures shown with each user turn (by item id), the turns whose audio the
        #: worker has been sent and how many of each turn's pictures (it keeps them by item
        #: id; a new worker has none: ``worker_lost``).
        self._shown: collections.OrderedDict[str, list[bytes]] = collections.OrderedDict()
        self._uploads: set[bytes] = set()  # of those shown, the uploaded ones (not camera)
        self._sent: set[str] = set()
        self._sent_pictures: dict[str, list[bytes]] = {}
        self._out: collections.deque[StepResult] = collections.deque()
        #: The response the worker is making for this call, or None.
        self._reply: Reply | None = None
        self.closed = False
        #: Events from outside the model (its worker was replaced) for the next step.
        self.notices: list[ModelEvent] = []

    @property
    def answering(self) -> str | None:
        """The id of the response the worker is making for this call, or None."""
        return self._reply.response_id if self._reply is not None else None

    async def step(self, pcm: np.ndarray) -> StepResult:
        self._turn.append(pcm)
        result = self._out.popleft() if self._out else StepResult()
        if self.notices:
            result.events[:0], self.notices = self.notices, []
        return result

    async def speech_started(self, item_id: str, since_ms: int) -> None:
        """The turn's audio starts here: what the caller's mic sent before it (while the model
        spoke, a pause) stays out of the prompt, as it stays out of OpenAI's turns."""
        keep_latest(self._turn, since_ms * self._b.input_rate // 1000)

    async def commit(self, item_id: str) -> None:
        """Keep the turn's audio for the prompts that follow: the newest turns' audio, as long as
        all of it could fit in a prompt (no prompt of the budget holds a turn older than the
        newest turns' audio alone would fill), so letting the oldest go never changes a prompt
        the model would read."""
        frames = list(self._turn)
        self._committed[item_id] = np.concatenate(frames) if frames else EMPTY_PCM
        limit = self._b.prompt_tokens / _AUDIO_TOKENS_PER_S * self._b.input_rate
        total = sum(len(audio) for audio in self._committed.values())
        while len(self._committed) > _COMMITTED_TURNS or (
            len(self._committed) > 1 and total - len(next(iter(self._committed.values()))) >= limit
        ):
            total -= len(self._committed.popitem(last=False)[1])
        self._turn.clear()

    async def clear_input(self) -> None:
        self._turn.clear()

    async def respond(self, request: ResponseRequest) -> None:
        turns = [self._by_reference(turn) for turn in self.turns_for(request)]
        cut = request.truncation
        ratio = cut if isinstance(cut, RetentionRatio) else None
        limits = ratio.token_limits if ratio is not None else None
        respond = Respond(
            response_id=request.response_id, turns=turns,
            voice=request.voice, speak="audio" in request.modalities,
            prompt_tokens=self._b.prompt_tokens, prefill_tokens=self._b.prefill_tokens,
            truncate=cut != "disabled", retain=ratio.retention_ratio if ratio else None,
            post_instructions=(limits.post_instructions or 0) if limits else 0,
        )  # fmt: skip
        # Answering only once the request is built: one that failed to build (the caller
        # hears it failed) would have kept the scheduler ticking for a response never sent.
        speaks, frame = "audio" in request.modalities, self._b.output_rate * 2 // 25  # 80 ms
        self._reply = Reply(request.response_id, request.tools, speaks, frame)
        self._b.change(Change("respond", self.call_id, respond=respond))

    def _by_reference(self, turn: Turn) -> Turn:
        """``turn`` without what the worker was sent for its item before: its audio, and the
        pictures it has had from the start."""
        if not turn.item:
            return turn
        if turn.audio and turn.item in self._sent:
            turn = msgspec.structs.replace(turn, audio=b"", heard=True)
        elif turn.audio:
            self._sent.add(turn.item)
        sent = self._sent_pictures.get(turn.item, [])
        # Sent before, and still its first pictures: name them; anything else (one left with
        # its deleted item): send them all again.
        seen = len(sent) if turn.pictures[: len(sent)] == sent else 0
        self._sent_pictures[turn.item] = list(turn.pictures)
        if seen:
            turn = msgspec.structs.replace(turn, pictures=turn.pictures[seen:], seen=seen)
        return turn

    def worker_lost(self) -> None:
        """The worker may have lost what it was sent (it failed, or is another): send it all
        with the next respond."""
        self._sent.clear()
        self._sent_pictures.clear()

    async def steer(self, steering: Steering) -> None:
        # The prompt is fixed once the response is prefilled; new instructions reach the next
        # response (the session keeps them).
        return None

    async def reset(self) -> None:
        if self._reply is not None:
            self._reply = None
            self._b.change(Change("reset", self.call_id))
        self._out.clear()

    async def close(self) -> None:
        self._reply, self.closed = None, True
        self._b._streams.pop(self.call_id, None)
        self._b.change(Change("leave", self.call_id))

    def turns_for(self, request: ResponseRequest) -> list[Turn]:
        """The conversation as the model reads it: the instructions, then every turn with its
        text (and a user turn's committed audio). A picture goes with the last user turn when
        it is first shown, and stays with that turn after, so the prompts of a call's turns
        share their start (its kept cache) and the model can tell an earlier view from the
        latest. The worker drops the oldest turns to fit its prompt budget."""
        system = request.instructions + tools_prompt(request.tools, request.tool_required)
        present = {picture.jpeg for picture in request.pictures}
        turns = [Turn("system", system.strip())] if system.strip() else []
        for item in request.conversation:
            if isinstance(item, FunctionCallItem):
                call = json.dumps({"name": item.name, "arguments": _json(item.arguments)})
                text = f"<tool_call>\n{call}\n</tool_call>"
                turns.append(Turn("assistant", text, item=item.id or ""))
            elif isinstance(item, FunctionCallOutputItem):
                text = f"<tool_response>\n{item.output}\n</tool_response>"
                turns.append(Turn("user", text, item=item.id or ""))
            elif not isinstance(item, MessageItem):
                continue
            elif item.role == "user":
                text = " ".join(p.text for p in item.content if isinstance(p, InputText))
                audio = self._committed.get(item.id) if item.id is not None else None
                # An uploaded picture leaves with its item (deleted, or past the image history);
                # camera frames stay with the turn they were seen in.
                shown = [
                    p for p in self._shown.get(item.id or "", [])
                    if p not in self._uploads or p in present
                ]  # fmt: skip
                heard = b"" if audio is None else audio.tobytes()
                turns.append(Turn("user", text, heard, list(shown), item=item.id or ""))
            elif item.role == "system":  # instructions added mid-conversation, in their place
                text = " ".join(p.text for p in item.content if isinstance(p, InputText))
                if text.strip():
                    turns.append(Turn("system", text.strip(), item=item.id or ""))
            elif item.role == "assistant":
                # The response being made has its (empty, in progress) message here already.
                said = " ".join(s for s in (_said(part) for part in item.content) if s)
                if said and item.status != "in_progress":
                    turns.append(Turn("assistant", said, item=item.id or ""))
        # What was sent for items no longer in the conversation is not needed again.
        items = {turn.item for turn in turns}
        self._sent &= items
        for stale in [item for item in self._sent_pictures if item not in items]:
            del self._sent_pictures[stale]
        # A committed turn's item is in the conversation before any response reads it, so audio
        # no item holds was deleted with its item: the model does not hear it.
        users = [i for i, turn in enumerate(turns) if turn.role == "user"]
        latest = request.pictures[-1].jpeg if request.pictures else None
        # Shown already if a turn of the conversation has it (not one since deleted).
        if latest is not None and users and not any(latest in t.pictures for t in turns):
            last = turns[users[-1]]
            turns[users[-1]] = msgspec.structs.replace(last, pictures=[*last.pictures, latest])
            self._shown.setdefault(last.item, []).append(latest)
            if not request.camera:
                self._uploads.add(latest)
            while sum(len(p) for p in self._shown.values()) > _KEPT_PICTURES:
                evicted = self._shown.popitem(last=False)[1]
                still = {p for pictures in self._shown.values() for p in pictures}
                self._uploads.difference_update(p for p in evicted if p not in still)
        return turns

    def receive(self, output: CallOutput) -> None:
        """One tick's output for this call from the worker."""
        reply = self._reply
        if reply is None or not output.response_id or output.response_id != reply.response_id:
            return  # a response this call has since reset or replaced
        audio = np.frombuffer(output.audio, np.int16) if output.audio else EMPTY_PCM
        self._out.extend(reply.take(output.text, audio))
        if output.done:
            self.end_response(output.done)

    def end_response(self, how: str) -> None:
        """The response in progress is over (``how``: the worker's reason)."""
        reply, self._reply = self._reply, None
        if reply is None:
            return
        if how.startswith("failed"):
            rid = reply.response_id
            self._log.warning("response %s %s", rid, how)
            self.worker_lost()
            # The worker may still be generating it (a step failed for the batch, or its output
            # could not be read here): free its slot there now. Or it may no longer hold the
            # call at all (a shared worker let it go, one restarted): joining again is harmless
            # where it does, and where it does not, the call's next response is answered.
            self._b.change(Change("join", self.call_id))
            self._b.change(Change("reset", self.call_id))
            reason = how.removeprefix("failed: ")
            failed = ResponseFailed(rid, f"the model could not answer: {reason}")
            self._out.append(StepResult(response_id=rid, events=[failed]))
            return
        self._out.extend(reply.finish())


def _said(part: object) -> str:
    """What the assistant said in one part of its message."""
    if isinstance(part, OutputText):
        return part.text
    return part.transcript if isinstance(part, OutputAudio) else ""


def _json(arguments: str) -> object:
    try:
        return json.loads(arguments) if arguments else {}
    except ValueError:
        return arguments
