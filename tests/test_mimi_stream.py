"""Streaming Mimi equals offline Mimi: codes exactly, audio within float rounding.

The checkpoint is the tiny random one from ``scripts/make_tiny_models.py``, written into a
temporary folder once per module (a few seconds), so these tests never touch ``models/``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import MimiModel, MoshiForConditionalGeneration

from s2s.backends.mimi_stream import MimiStreamDecoder, MimiStreamEncoder

ROOT = Path(__file__).resolve().parent.parent
FRAME = 1920  # 80 ms at 24 kHz
FRAMES = 25  # 2 s
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def models_dir(tiny_models: Path) -> Path:
    return tiny_models


@pytest.fixture(scope="module")
def mimi(models_dir: Path) -> MimiModel:
    # from_pretrained hands back the model in eval mode.
    model: MimiModel = MimiModel.from_pretrained(models_dir / "tiny-mimi", local_files_only=True)
    return model


@pytest.fixture(scope="module")
def narrow(models_dir: Path) -> MimiModel:
    # The real window is 10 s; shrink it so 2 s of audio slides past it many times.
    model: MimiModel = MimiModel.from_pretrained(
        models_dir / "tiny-mimi", local_files_only=True, sliding_window=6
    )
    assert model.config.sliding_window == 6
    return model


def _speechlike(seed: int, frames: int = FRAMES) -> torch.Tensor:
    """A gliding tone with noise, ``(1, 1, frames * FRAME)`` in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(frames * FRAME) / 24_000
    pitch = 150 + 50 * seed + 100 * t
    noise = 0.1 * torch.randn(t.shape, generator=generator)
    return (0.5 * torch.sin(2 * torch.pi * pitch * t) + noise).clamp(-1, 1)[None, None]


def _encode_streaming(encoder: MimiStreamEncoder, audio: torch.Tensor) -> torch.Tensor:
    frames = audio.shape[-1] // FRAME
    steps = [encoder.step(audio[..., i * FRAME : (i + 1) * FRAME]) for i in range(frames)]
    return torch.cat(steps, dim=-1)


def _decode_streaming(decoder: MimiStreamDecoder, codes: torch.Tensor) -> torch.Tensor:
    return torch.cat([decoder.step(codes[..., i : i + 1]) for i in range(codes.shape[-1])], -1)


def _offline_codes(mimi: MimiModel, audio: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        codes: torch.Tensor = mimi.encode(audio).audio_codes
    return codes


def _offline_audio(mimi: MimiModel, codes: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        audio: torch.Tensor = mimi.decode(codes).audio_values
    return audio


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


def test_tiny_checkpoints_load_back_with_an_80_ms_frame(models_dir: Path, mimi: MimiModel) -> None:
    moshi = MoshiForConditionalGeneration.from_pretrained(
        models_dir / "tiny-moshi", local_files_only=True
    )
    assert mimi.config.sampling_rate == 24_000 and mimi.config.frame_size == FRAME
    assert moshi.config.num_codebooks == mimi.config.num_quantizers == 8
    # tiny-mimi is tiny-moshi's own codec, so codes from one decode in the other.
    theirs = moshi.audio_encoder.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in mimi.state_dict().items())
    assert sum(p.numel() for p in moshi.parameters()) < 2_000_000


def test_streaming_encode_equals_offline_codes(mimi: MimiModel) -> None:
    audio = _speechlike(0)
    offline = _offline_codes(mimi, audio)
    streamed = _encode_streaming(MimiStreamEncoder(mimi), audio)
    assert streamed.shape == (1, 8, FRAMES)
    assert torch.equal(streamed, offline)
    # Random codebooks and a varied signal: many distinct codes, so equality means something.
    assert len(set(offline.flatten().tolist())) > 20


def test_streaming_decode_equals_offline_and_per_frame_decode_does_not(mimi: MimiModel) -> None:
    codes = _offline_codes(mimi, _speechlike(0))
    offline = _offline_audio(mimi, codes)
    streamed = _decode_streaming(MimiStreamDecoder(mimi), codes)
    assert _max_error(streamed, offline) < TOLERANCE
    assert float(offline.abs().max()) > 0.1
    # transformers' decode keeps no state between calls: frame by frame it clicks.
    naive = torch.cat([_offline_audio(mimi, codes[..., i : i + 1]) for i in range(FRAMES)], -1)
    assert _max_error(naive, offline) > 1e-3


def test_a_batch_of_three_calls_stream_like_three_single_calls(mimi: MimiModel) -> None:
    audio = torch.cat([_speechlike(seed) for seed in range(3)])
    codes = _encode_streaming(MimiStreamEncoder(mimi, slots=3), audio)
    audio_out = _decode_streaming(MimiStreamDecoder(mimi, slots=3), codes)
    for row in range(3):
        alone = _encode_streaming(MimiStreamEncoder(mimi), audio[row : row + 1])
        assert torch.equal(codes[row : row + 1], alone)
        decoded_alone = _decode_streaming(MimiStreamDecoder(mimi), alone)
        assert _max_error(audio_out[row : row + 1], decoded_alone) < TOLERANCE


def test_resetting_one_row_starts_that_call_afresh_and_leaves_the_others(mimi: MimiModel) -> None:
    first, second, other = _speechlike(0, 8), _speechlike(1, 8), _speechlike(2, 16)
    encoder, decoder = MimiStreamEncoder(mimi, slots=2), MimiStreamDecoder(mimi, slots=2)
    codes = [_encode_streaming(encoder, torch.cat([first, other[..., : 8 * FRAME]]))]
    audio = [_decode_streaming(decoder, codes[0])]
    encoder.reset(0)
    decoder.reset(0)
    codes.append(_encode_streaming(encoder, torch.cat([second, other[..., 8 * FRAME :]])))
    audio.append(_decode_streaming(decoder, codes[1]))

    # Row 0 after the reset is a new call: as if its stream had just been made.
    assert torch.equal(codes[1][:1], _offline_codes(mimi, second))
    assert _max_error(audio[1][:1], _offline_audio(mimi, codes[1][:1])) < TOLERANCE
    # Row 1 never noticed.
    other_codes = torch.cat([c[1:] for c in codes], -1)
    assert torch.equal(other_codes, _offline_codes(mimi, other))
    other_audio = torch.cat([a[1:] for a in audio], -1)
    assert _max_error(other_audio, _offline_audio(mimi, other_codes)) < TOLERANCE


def test_the_transformer_cache_follows_the_sliding_window(narrow: MimiModel) -> None:
    audio = _speechlike(1)
    codes = _encode_streaming(MimiStreamEncoder(narrow), audio)
    assert torch.equal(codes, _offline_codes(narrow, audio))
    streamed = _decode_streaming(MimiStreamDecoder(narrow), codes)
    assert _max_error(streamed, _offline_audio(narrow, codes)) < TOLERANCE


def test_steps_of_the_wrong_shape_are_refused(mimi: MimiModel) -> None:
    with pytest.raises(ValueError, match="multiple of 1920"):
        MimiStreamEncoder(mimi).step(torch.zeros(1, 1, 1000))
    with pytest.raises(ValueError, match="codes for 1 to 2 slots, got 3 rows"):
        MimiStreamDecoder(mimi, slots=2).step(torch.zeros(3, 8, 1, dtype=torch.long))
    with pytest.raises(IndexError, match="outside a codec of 2 slots"):
        MimiStreamDecoder(mimi, slots=2).reset(2)


def _frame(audio: torch.Tensor, index: int) -> torch.Tensor:
    return audio[..., index * FRAME : (index + 1) * FRAME]


def _alone(mimi: MimiModel, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and audio of ``audio`` streamed by a batch-1 encoder and decoder of its own."""
    codes = _encode_streaming(MimiStreamEncoder(mimi), audio)
    return codes, _decode_streaming(MimiStreamDecoder(mimi), codes)


def test_calls_that_join_and_leave_stream_like_single_calls(mimi: MimiModel) -> None:
    # call: (tick it joins, frames it sends); call 1 leaves while 0 and 2 go on, and call 3
    # then joins into its freed slot (reset first), below call 2's.
    calls = {0: (0, 10), 1: (2, 5), 2: (3, 9), 3: (8, 5)}
    audio = {call: _speechlike(call, frames) for call, (_, frames) in calls.items()}
    encoder, decoder = MimiStreamEncoder(mimi, slots=4), MimiStreamDecoder(mimi, slots=4)
    slots: dict[int, int] = {}  # call -> slot
    codes: dict[int, list[torch.Tensor]] = {call: [] for call in calls}
    out: dict[int, list[torch.Tensor]] = {call: [] for call in calls}
    for tick in range(max(start + frames for start, frames in calls.values())):
        for call, (start, frames) in calls.items():
            if tick == start + frames:
                del slots[call]
            if tick == start:
                slots[call] = min(set(range(4)) - set(slots.values()))
                assert call != 3 or slots[call] == 1  # call 1's old slot
                encoder.reset(slots[call])
                decoder.reset(slots[call])
        n = max(slots.values()) + 1
        audio_in = torch.zeros(n, 1, FRAME)
        ready = torch.zeros(n, dtype=torch.bool)
        for call, slot in slots.items():
            audio_in[slot] = _frame(audio[call], tick - calls[call][0])[0]
            ready[slot] = True
        step_codes = encoder.step(audio_in, ready)
        step_audio = decoder.step(step_codes, ready)
        for call, slot in slots.items():
            codes[call].append(step_codes[slot : slot + 1])
            out[call].append(step_audio[slot : slot + 1])
    for call in calls:
        alone_codes, alone_audio = _alone(mimi, audio[call])
        assert torch.equal(torch.cat(codes[call], -1), alone_codes)
        assert _max_error(torch.cat(out[call], -1), alone_audio) < 1e-5


def test_a_call_that_skips_ticks_resumes_where_it_was(narrow: MimiModel) -> None:
    # The narrow window slides while a call sits out ticks: what it keeps is counted in its own
    # steps, not in ticks of the batch. Rows without a frame compute on silence, unready.
    # The rows that have a frame at each tick; row 2 sits out 4 ticks, rows 0 and 1 one or more.
    ticks = ["012", "02", "1", "", "01", "2", "2", "2", "2", "012", "02", "12", "012", "1", "1"]
    present = [[int(row) for row in tick] for tick in ticks]
    sent = [sum(row in rows for rows in present) for row in range(3)]
    audio = [_speechlike(row, frames) for row, frames in enumerate(sent)]
    encoder, decoder = MimiStreamEncoder(narrow, 3), MimiStreamDecoder(narrow, 3)
    codes: list[list[torch.Tensor]] = [[], [], []]
    out: list[list[torch.Tensor]] = [[], [], []]
    for rows in present:
        audio_in = torch.zeros(3, 1, FRAME)
        for row in rows:
            audio_in[row] = _frame(audio[row], len(codes[row]))[0]
        ready = torch.tensor([row in rows for row in range(3)])
        step_codes = encoder.step(audio_in, ready)
        step_audio = decoder.step(step_codes, ready)
        assert step_codes.shape == (3, 8, 1) and step_audio.shape == (3, 1, FRAME)
        for row in rows:
            codes[row].append(step_codes[row : row + 1])
            out[row].append(step_audio[row : row + 1])
    for row in range(3):
        alone_codes, alone_audio = _alone(narrow, audio[row])
        assert torch.equal(torch.cat(codes[row], -1), alone_codes)
        assert _max_error(torch.cat(out[row], -1), alone_audio) < 1e-5


def test_stepping_some_rows_leaves_the_others_as_they_were(mimi: MimiModel) -> None:
    audio = torch.cat([_speechlike(seed, 8) for seed in range(3)])
    skipping = (MimiStreamEncoder(mimi, 3), MimiStreamDecoder(mimi, 3))
    stepping = (MimiStreamEncoder(mimi, 3), MimiStreamDecoder(mimi, 3))
    for encoder, decoder in (skipping, stepping):
        _decode_streaming(decoder, _encode_streaming(encoder, audio[..., : 4 * FRAME]))
    # Only row 1 steps in one pair, with audio the other pair never sees; rows 0 and 2 compute
    # on other audio, unready.
    middle = torch.tensor([False, True, False])
    for seed in range(3, 6):
        noise = torch.cat([_speechlike(seed + 10 * i, 1) for i in range(3)])
        skipping[1].step(skipping[0].step(noise, middle), middle)
    # Rows 0 and 2 go on as if nothing had happened in between.
    codes = [
        _encode_streaming(encoder, audio[..., 4 * FRAME :]) for encoder, _ in (skipping, stepping)
    ]
    out = [_decode_streaming(decoder, codes[0]) for _, decoder in (skipping, stepping)]
    others = torch.tensor([0, 2])
    assert torch.equal(codes[0][others], codes[1][others])
    assert torch.equal(out[0][others], out[1][others])
    assert not torch.equal(codes[0][1], codes[1][1])


def test_steps_that_do_not_fit_the_slots_are_refused(mimi: MimiModel) -> None:
    encoder = MimiStreamEncoder(mimi, slots=2)
    frame = torch.zeros(2, 1, FRAME)
    for ready in (torch.tensor([True]), torch.tensor([1, 0]), torch.ones(2, 1, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"ready must be a bool mask of shape \(2,\)"):
            encoder.step(frame, ready)
    with pytest.raises(ValueError, match="audio for 1 to 2 slots, got 0 rows"):
        encoder.step(frame[:0])
    with pytest.raises(ValueError, match="at least one slot"):
        MimiStreamEncoder(mimi, slots=0)
    assert encoder.step(frame[:1]).shape == (1, 8, 1)
