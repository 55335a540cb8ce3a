"""One Qwen3-Omni response on its way to the caller: its text handed over with its speech, and
a ``<tool_call>`` in it held back, so a call is made, never read out.

The thinker writes a text token a step, far ahead of the talker that says it, so a token's text
goes with the audio at about ``FRAMES_PER_TOKEN`` codec frames a token, the rest when the reply
ends: transcript deltas come about when their words are heard, and a barge-in keeps about what
the caller heard, not the whole sentence already written. An estimate: the model does not say
which frame says which token.

A reply may call a tool at its start or after some words ("Let me look that up."). From where a
``<tool_call>`` may begin in the text (the tag, or the start of one at the text's end), nothing
more of the reply leaves: its words before that point go, with the speech that comes until they
are handed over (that speech says them); the speech after says the call. When the reply ends,
the calls in that held part are made and its speech is dropped; a malformed call, or text that
turned out not to be one, is handed over as it was.
"""

from __future__ import annotations

import numpy as np

from s2s.backends.base import ModelEvent, ResponseFinished, StepResult, ToolCalled
from s2s.protocol.session_config import FunctionTool
from s2s.tools import split_tool_calls

#: Codec frames (80 ms each) a text token takes to say, about: 12.5 frames a second over the
#: 3-4 tokens a second of conversational English (a little fewer frames than that, so the text
#: errs early, not late: a word heard is in the transcript).
FRAMES_PER_TOKEN = 3.0
_CALL_TAG = "<tool_call>"


class Reply:
    """The output of one response, ``response_id``, as the worker sends it, turned into the
    steps the call hands over."""

    def __init__(
        self, response_id: str, tools: list[FunctionTool], speaks: bool, frame_samples: int
    ) -> None:
        self.response_id = response_id
        self._tools = tools
        self._speaks = speaks
        self._frame = frame_samples  # samples of one codec frame at the output rate
        self._said = ""  # all the text written
        self._handed = 0  # how much of it has left
        self._unsaid: list[str] = []  # text written, not yet paced out with its audio
        self._credit = 0.0  # tokens the audio handed over so far has room for
        self._held: list[StepResult] = []  # steps that may say a tool call, in order

    def take(self, text: str, audio: np.ndarray) -> list[StepResult]:
        """What to hand over now of one tick's ``text`` and ``audio``."""
        self._said += text
        paced = self._paced(text, audio.size)
        if not (audio.size or paced):
            return []
        return self._pass(StepResult(audio=audio, text=paced, response_id=self.response_id))

    def finish(self) -> list[StepResult]:
        """The rest, once the reply is done: text written ahead of its speech, tool calls, and
        the step that says the response finished."""
        rid = self.response_id
        out: list[StepResult] = []
        rest, self._unsaid = "".join(self._unsaid), []
        if rest:
            out += self._pass(StepResult(text=rest, response_id=rid))
        events: list[ModelEvent] = []
        if self._held:
            spoken, calls = split_tool_calls(self._said[self._handed :], self._tools)
            if calls:
                events = [ToolCalled(rid, call.name, call.arguments) for call in calls]
                if spoken:  # words after a call: their speech was the call's, so text alone
                    out.append(StepResult(text=spoken, response_id=rid))
            else:
                out += self._held
            self._held = []
        out.append(StepResult(response_id=rid, events=[*events, ResponseFinished(rid)]))
        return out

    def _paced(self, text: str, samples: int) -> str:
        """What of the text written so far goes with ``samples`` of speech: a token per
        ``FRAMES_PER_TOKEN`` frames (all of it at once for a reply that does not speak)."""
        if text:
            self._unsaid.append(text)
        if not self._speaks:
            out, self._unsaid = "".join(self._unsaid), []
            return out
        self._credit += samples / self._frame / FRAMES_PER_TOKEN
        count = min(len(self._unsaid), int(self._credit))
        # Room the speech made while no text was waiting is not kept for later text, which
        # would then run ahead of its audio again: at most one token's worth.
        self._credit = min(self._credit - count, 1.0)
        out = "".join(self._unsaid[:count])
        del self._unsaid[:count]
        return out

    def _pass(self, step: StepResult) -> list[StepResult]:
        """``step`` and any held before it, as far as they come before a possible tool call;
        the rest stays held. Held steps are looked at again each time, as the text may have
        turned out not to be a call (or its start moved on)."""
        start = _call_start(self._said) if self._tools else None
        steps, self._held, out = [*self._held, step], [], []
        for s in steps:
            if self._held or (start is not None and self._handed >= start):
                self._held.append(s)  # the words before the call are all said
                continue
            end = len(s.text) if start is None else start - self._handed
            if end < len(s.text):  # this step's text runs into the call: split it there
                rid = self.response_id
                self._held.append(StepResult(text=s.text[end:], response_id=rid))
                s = StepResult(audio=s.audio, text=s.text[:end], response_id=rid)
            self._handed += len(s.text)
            if s.audio.size or s.text:
                out.append(s)
        return out


def _call_start(text: str) -> int | None:
    """Where a ``<tool_call>`` may begin in ``text``: the first tag, or a start of one that
    ends the text so far; None if neither."""
    found = text.find(_CALL_TAG)
    if found >= 0:
        return found
    last = text.rfind("<")
    if last >= 0 and _CALL_TAG.startswith(text[last:]):
        return last
    return None
