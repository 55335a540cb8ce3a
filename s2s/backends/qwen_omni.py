"""``qwen-omni:PATH_OR_HUB_ID``: Qwen2.5-Omni through transformers, one turn at a time.

Qwen2.5-Omni hears audio, sees images and answers with text and speech, but its ``generate``
runs the whole pipeline (thinker text model, then the talker's speech codes, then the token2wav
vocoder) before returning anything, and transformers offers no streaming hook for the talker or
the vocoder. So a response is generated whole on the device's single thread and then handed out
in 200 ms chunks, all its text with the first chunk. The caller waits for the whole generation
before hearing anything; streaming the vocoder would need a chunked token2wav of our own.

The caller's audio since the last commit is kept (at most 30 s); a commit freezes it as that
turn. A response uses the instructions as system prompt, the conversation's last user turn (its
committed audio and any text) and the latest picture; tools are offered in the system prompt and
a ``<tool_call>`` in the reply becomes a tool call (``s2s.tools``). A reset bumps a generation
counter, so a generation still running on the device is left to finish and its result is thrown
away.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from s2s.backends.base import (
    ModelEvent,
    ResponseFinished,
    ResponseRequest,
    Steering,
    StepResult,
    ToolCalled,
    keep_latest,
)
from s2s.log import CallLogger
from s2s.protocol.items import InputText, Item, MessageItem
from s2s.tools import split_tool_calls, tool_response, tools_prompt
from s2s.worker.process import pick_device_and_dtype

log = logging.getLogger(__name__)

INPUT_RATE = 16_000  # Whisper features
OUTPUT_RATE = 24_000  # token2wav's BigVGAN: 240 samples per 100 Hz mel frame
_FRAME = INPUT_RATE // 50  # 20 ms
_MAX_TURN_FRAMES = 1500  # 30 s of uncommitted audio
_CHUNK = OUTPUT_RATE // 5  # 200 ms of output per step
# Qwen2.5-Omni only speaks when its system prompt starts with this sentence (model card).
QWEN_SYSTEM = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
    "perceiving auditory and visual inputs, as well as generating text and speech."
)


@dataclass(frozen=True, slots=True)
class Turn:
    """What one response is generated from."""

    system: str
    text: str = ""
    audio: np.ndarray | None = None  # int16 mono at INPUT_RATE
    jpeg: bytes | None = None


def build_inputs(tokenizer: Any, features: Any, images: Any, turn: Turn) -> dict[str, Any]:
    """The ``generate`` keyword arguments for ``turn``, as Qwen's processor would build them.

    Qwen's processor classes need torchvision, so this does their work with the tokenizer, the
    Whisper feature extractor and the PIL image processor: one ``<|AUDIO|>`` per audio-encoder
    output frame and one ``<|IMAGE|>`` per merged vision patch, in Qwen's chat template.
    """
    kwargs: dict[str, Any] = {}
    user = ""
    if turn.audio is not None and turn.audio.size:
        audio = turn.audio.astype(np.float32) / 32768.0
        feats = features(
            audio, sampling_rate=INPUT_RATE, return_attention_mask=True, padding="max_length",
            return_tensors="pt",
        )  # fmt: skip
        mask = feats["attention_mask"]
        frames = int(mask.sum())
        # Whisper-style conv stride 2, then the encoder's 2x average pool.
        tokens = ((frames - 1) // 2 + 1 - 2) // 2 + 1
        kwargs["input_features"] = feats["input_features"]
        kwargs["feature_attention_mask"] = mask
        user += "<|audio_bos|>" + "<|AUDIO|>" * tokens + "<|audio_eos|>"
    if turn.jpeg is not None:
        from PIL import Image

        with Image.open(io.BytesIO(turn.jpeg)) as picture:
            rgb = picture.convert("RGB")
        pixels = images(images=[rgb], return_tensors="pt")
        grid = pixels["image_grid_thw"]
        tokens = int(grid.prod()) // images.merge_size**2
        # thinker_ goes to the thinker alone; generate() masks image positions for the talker.
        kwargs["thinker_pixel_values"] = pixels["pixel_values"]
        kwargs["image_grid_thw"] = grid
        user += "<|vision_bos|>" + "<|IMAGE|>" * tokens + "<|vision_eos|>"
    user += turn.text
    prompt = (
        f"<|im_start|>system\n{turn.system}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer(prompt, return_tensors="pt")
    kwargs["input_ids"] = ids["input_ids"]
    kwargs["attention_mask"] = ids["attention_mask"]
    return kwargs


class QwenOmniBackend:
    name = "qwen-omni"
    turn_based = True
    steers = False  # the response is generated whole before it plays
    input_rate = INPUT_RATE
    output_rate = OUTPUT_RATE
    frame_samples = _FRAME

    def __init__(
        self, model: Any, tokenizer: Any, features: Any, images: Any, device: str,
        limits: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        limits = limits or {}
        self.model = model
        self.tokenizer = tokenizer
        self.features = features
        self.images = images
        self.device = device
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qwen-omni")
        # generate()'s own defaults unless the checkpoint's generation_config.json says otherwise
        # (the tiny test checkpoint does: its random model never stops by itself).
        self.thinker_max_new_tokens = int(limits.get("thinker_max_new_tokens", 1024))
        self.talker_max_new_tokens = int(limits.get("talker_max_new_tokens", 4096))
        self.talker_min_new_tokens = int(limits.get("talker_min_new_tokens", 0))
        self.speaker = next(iter(model.speaker_map), "Chelsie")

    @classmethod
    async def load(cls, location: str, device: str | None = None) -> QwenOmniBackend:
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(1) as loader:
            return await loop.run_in_executor(loader, cls._load, location, device)

    @classmethod
    def _load(cls, location: str, device: str | None) -> QwenOmniBackend:
        from transformers import (
            AutoTokenizer,
            Qwen2_5OmniForConditionalGeneration,
            Qwen2VLImageProcessorPil,
            WhisperFeatureExtractor,
        )
        from transformers.utils.hub import cached_file

        chosen, dtype = pick_device_and_dtype(device)
        local = Path(location).is_dir()
        omni: Any = Qwen2_5OmniForConditionalGeneration  # its from_pretrained is untyped
        model = omni.from_pretrained(location, dtype=dtype, local_files_only=local).to(chosen)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local)
        features = WhisperFeatureExtractor.from_pretrained(location, local_files_only=local)
        images = Qwen2VLImageProcessorPil.from_pretrained(location, local_files_only=local)
        # Read the file itself: GenerationConfig drops keys it does not know from a file marked
        # "_from_model_config", as save_pretrained marks it.
        path = cached_file(
            location, "generation_config.json", local_files_only=local,
            _raise_exceptions_for_missing_entries=False,
        )  # fmt: skip
        limits = json.loads(Path(path).read_text()) if path else {}
        log.info("loaded %s on %s (%s)", location, chosen, dtype)
        return cls(model, tokenizer, features, images, chosen, limits)

    def generate(self, turn: Turn, speak: bool, voice: str = "") -> tuple[str, np.ndarray]:
        """Text and int16 speech for ``turn``; runs on ``executor``.

        ``voice`` picks one of the checkpoint's speakers (``Chelsie``, ``Ethan``) by name, any
        case; OpenAI voice names fall back to the checkpoint's first speaker.
        """
        import torch

        kwargs = build_inputs(self.tokenizer, self.features, self.images, turn)
        dtype = self.model.dtype
        for key, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                kwargs[key] = value.to(dtype) if value.is_floating_point() else value
        codec = self.model.config.talker_config
        with torch.inference_mode():
            out = self.model.generate(
                **kwargs,
                speaker=self._speaker(voice),
                generation_mode="audio" if speak else "text",
                thinker_max_new_tokens=self.thinker_max_new_tokens,
                talker_max_new_tokens=self.talker_max_new_tokens,
                # A reply whose talker stops at once has no speech: transformers' vocoder then
                # fails on zero codes (the tiny random test checkpoint does this on some input).
                talker_min_new_tokens=self.talker_min_new_tokens,
                talker_eos_token_id=[codec.tts_codec_pad_token_id, codec.tts_codec_end_token_id],
            )
        if speak:
            sequences, wav = out
            pcm = (wav.float().clamp(-1, 1) * 32767).to(torch.int16).cpu().numpy()
        else:
            sequences = out.sequences if hasattr(out, "sequences") else out
            pcm = np.zeros(0, np.int16)
        reply = sequences[0, kwargs["input_ids"].shape[1] :]
        text = self.tokenizer.decode(reply, skip_special_tokens=True)
        return str(text), pcm

    def _speaker(self, voice: str) -> str:
        by_name = {name.lower(): name for name in self.model.speaker_map}
        return str(by_name.get(voice.lower(), self.speaker))

    async def open_stream(self, call_id: str) -> QwenOmniStream:
        return QwenOmniStream(self, call_id)

    async def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class QwenOmniStream:
    def __init__(self, backend: QwenOmniBackend, call_id: str) -> None:
        self._b = backend
        self._log = CallLogger(log, call_id)
        self._call_id = call_id
        self._turn: collections.deque[np.ndarray] = collections.deque(maxlen=_MAX_TURN_FRAMES)
        self._committed: dict[str, np.ndarray] = {}
        self._out: collections.deque[StepResult] = collections.deque()
        self._generation = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def step(self, pcm: np.ndarray) -> StepResult:
        self._turn.append(pcm)
        return self._out.popleft() if self._out else StepResult()

    async def speech_started(self, item_id: str, since_ms: int) -> None:
        """The turn's audio starts here: what the caller's mic sent before it (while the model
        spoke, a pause) stays out of the prompt, as it stays out of OpenAI's turns."""
        keep_latest(self._turn, since_ms * self._b.input_rate // 1000)

    async def commit(self, item_id: str) -> None:
        frames = list(self._turn)
        self._committed = {item_id: np.concatenate(frames) if frames else np.zeros(0, np.int16)}
        self._turn.clear()

    async def clear_input(self) -> None:
        self._turn.clear()

    async def respond(self, request: ResponseRequest) -> None:
        self._generation += 1
        turn = self.turn_for(request)
        task = asyncio.create_task(
            self._generate(request, turn, self._generation), name=f"{self._call_id}/qwen-omni"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def steer(self, steering: Steering) -> None:
        # The response is generated whole before it plays: there is nothing left to steer.
        pass

    async def reset(self) -> None:
        self._generation += 1
        self._out.clear()

    async def close(self) -> None:
        self._generation += 1
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def turn_for(self, request: ResponseRequest) -> Turn:
        """The last user turn of ``request``: its committed audio and text, and the picture."""
        system = QWEN_SYSTEM + ("\n" + request.instructions if request.instructions else "")
        system += tools_prompt(request.tools, request.tool_required)
        answer = tool_response(request.conversation)
        if answer is not None:  # the reply follows a tool's output, not the caller's words
            jpeg = request.pictures[-1].jpeg if request.pictures else None
            return Turn(system=system, text=answer, jpeg=jpeg)
        user = _last_user(request.conversation)
        text = ""
        audio = None
        if user is not None:
            text = " ".join(p.text for p in user.content if isinstance(p, InputText))
            if user.id is not None:  # (a deleted turn's audio, with no item, is not heard)
                audio = self._committed.get(user.id)
        jpeg = request.pictures[-1].jpeg if request.pictures else None
        return Turn(system=system, text=text, audio=audio, jpeg=jpeg)

    async def _generate(self, request: ResponseRequest, turn: Turn, generation: int) -> None:
        loop = asyncio.get_running_loop()
        speak = "audio" in request.modalities
        started = time.perf_counter()
        try:
            text, pcm = await loop.run_in_executor(
                self._b.executor, self._b.generate, turn, speak, request.voice
            )
        except Exception:
            self._log.exception("qwen-omni generation failed")
            text, pcm = "", np.zeros(0, np.int16)
        if generation != self._generation:
            self._log.debug("dropped a generation that finished after a reset")
            return
        self._log.info(
            "generated %.1f s of speech in %.1f s", pcm.size / OUTPUT_RATE,
            time.perf_counter() - started,
        )  # fmt: skip
        self._out.extend(reply_steps(request, text, pcm))


def reply_steps(request: ResponseRequest, text: str, pcm: np.ndarray) -> list[StepResult]:
    """A generated reply as steps: speech, or the tool calls in its text (without the speech,
    which said the call aloud) and any words around them as text."""
    spoken, calls = split_tool_calls(text, request.tools) if request.tools else (text, [])
    rid = request.response_id
    if not calls:
        return _chunks(rid, text, pcm)
    out = [StepResult(text=spoken, response_id=rid)] if spoken else []
    events: list[ModelEvent] = [ToolCalled(rid, call.name, call.arguments) for call in calls]
    out.append(StepResult(response_id=rid, events=[*events, ResponseFinished(rid)]))
    return out


def _last_user(conversation: list[Item]) -> MessageItem | None:
    for item in reversed(conversation):
        if isinstance(item, MessageItem) and item.role == "user":
            return item
    return None


def _chunks(response_id: str, text: str, pcm: np.ndarray) -> list[StepResult]:
    """``pcm`` in 200 ms steps, all of ``text`` with the first, then ``ResponseFinished``."""
    out = [
        StepResult(audio=pcm[i : i + _CHUNK], text=text if i == 0 else "", response_id=response_id)
        for i in range(0, pcm.size, _CHUNK)
    ]
    if not out and text:
        out.append(StepResult(text=text, response_id=response_id))
    out.append(StepResult(response_id=response_id, events=[ResponseFinished(response_id)]))
    return out
