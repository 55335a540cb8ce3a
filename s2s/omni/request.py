"""What a call asks the Qwen3-Omni engine for (``Request``, ``Decoding``) and what a step gives
back for it (``RowStep``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from s2s.omni.media import MediaPlan
from s2s.omni.sampling import Sampling

#: Qwen's defaults in ``generate()``: talker and code predictor sample; text is greedy.
TALKER_SAMPLING = Sampling(temperature=0.9, top_k=50, top_p=1.0)
RESIDUAL_SAMPLING = Sampling(temperature=1.0, top_k=50, top_p=0.8)


@dataclass(frozen=True, slots=True)
class Decoding:
    """How each part picks its tokens; None is greedy (argmax)."""

    text: Sampling | None = None
    speech: Sampling | None = TALKER_SAMPLING  # the talker's first codebook
    residual: Sampling | None = RESIDUAL_SAMPLING  # the code predictor's other codebooks
    repetition_penalty: float = 1.05  # on the talker's earlier first codes


GREEDY = Decoding(speech=None, residual=None)
#: ``generate()``'s longest reply, unless a checkpoint's generation config says otherwise: text
#: tokens (``thinker_max_new_tokens``) and frames (``talker_max_new_tokens``).
MAX_TEXT_TOKENS, MAX_FRAMES = 1024, 4096
#: The talker's prompt is the user turns of the thinker's (each turn's positions) and nine of its
#: own, the three of the thinker's opening ``<|im_start|>assistant\n`` among them.
TALKER_OPENING = 9


def cache_positions(prompt_tokens: int, max_text_tokens: int, max_frames: int) -> tuple[int, int]:
    """The positions a slot of the thinker's and of the talker's cache needs for a prompt of
    ``prompt_tokens`` and the longest reply (its text tokens, its frames)."""
    thinker = prompt_tokens + max_text_tokens + 1
    talker = prompt_tokens - 3 + TALKER_OPENING + max_frames + 1
    return thinker, talker


@dataclass(frozen=True, slots=True)
class Request:
    """One reply to generate: ``inputs`` as ``s2s.omni.prompt.build_inputs`` makes them."""

    inputs: Mapping[str, Tensor]
    speaker: str = "ethan"
    speak: bool = True
    max_text_tokens: int = 1024
    max_frames: int = 4096  # first codes the talker may pick, as generate()'s max_new_tokens
    decoding: Decoding = Decoding()
    #: Where a sampled reply's noise comes from: the same request and seed give the same reply,
    #: whichever calls share the engine.
    seed: int = 0
    #: Never pick the text or codec end token, so the reply runs to both limits: for benchmarks,
    #: where random weights end a reply at once or never and runs must compare.
    fixed_length: bool = False
    #: The conversation this reply belongs to (the call), if its next turn should reuse this
    #: one's thinker cache: the slot is kept after the reply while no other call needs it, and
    #: the next request with the same key prefills only what follows the longest prefix the two
    #: prompts share (``OmniEngine.begin``).
    conversation: str | None = None
    #: The prompt's clips and pictures as its conversation's ``Media`` holds them (``latest``
    #: after building ``inputs`` with it): those an earlier prompt held are not encoded again.
    media: MediaPlan | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed {self.seed} is outside 0..2**63-1")


@dataclass(slots=True)
class RowStep:
    """What one call produced in one step (or in its prefill and first step)."""

    row: int
    text: list[int]  # text tokens made since the last step (the end token included)
    codes: Tensor | None  # (quantizers,) the frame finished in this step
    audio: Tensor | None  # that frame's samples, float32 in [-1, 1] at 24 kHz
    done: bool = False
    reason: str | None = None  # when done: "stop", "length" or "cancelled"
