"""The streaming Qwen3-Omni engine (``s2s.omni``) on a tiny random checkpoint, on the CPU.

Greedy streaming must give what the model's own ``generate()`` gives (text tokens, codec codes,
waveform), audio must start within the first steps, calls in one batch must not affect each
other, and a cancelled call must stop at the next step.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from s2s.hosttraffic import HostTraffic
from s2s.omni.code2wav import Code2WavStream
from s2s.omni.engine import OmniEngine
from s2s.omni.media import Media
from s2s.omni.model import load_model
from s2s.omni.moe import experts_forward, feed_forward
from s2s.omni.prompt import Message, build_inputs, fit_inputs
from s2s.omni.request import GREEDY, Decoding, Request
from s2s.omni.sampling import Draws, Sampling, pick
from tests.omni_replies import (
    GENERATE_WARNING,
    MAX_FRAMES,
    MAX_TEXT,
    QUESTIONS,
    Reply,
    make_inputs,
    make_request,
    run_alone,
    run_engine,
    same_reply,
)


def _generate(model: Any, inputs: dict[str, Tensor]) -> tuple[list[int], Tensor, Tensor]:
    """Greedy ``generate()``: text tokens, the codes it handed code2wav, and the waveform."""
    seen: list[Tensor] = []
    hook = model.code2wav.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        with torch.inference_mode():
            sequences, wav = model.generate(
                **inputs, speaker="ethan", return_audio=True, thinker_do_sample=False,
                talker_do_sample=False, thinker_max_new_tokens=MAX_TEXT,
                talker_max_new_tokens=MAX_FRAMES,
                thinker_eos_token_id=model.config.im_end_token_id,
            )  # fmt: skip
    finally:
        hook.remove()
    assert len(seen) == 1, "a short reply is decoded in one chunk"
    text = sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return text, seen[0][0], wav[0, 0]


@pytest.mark.filterwarnings(GENERATE_WARNING)
@pytest.mark.parametrize("kind", ["text", "media"])
def test_greedy_stream_equals_generate(model: Any, pieces: Any, kind: str) -> None:
    inputs = make_inputs(pieces, kind)
    text, codes, wav = _generate(model, inputs)
    reply = run_alone(model, make_request(inputs))
    assert reply.text == text
    streamed = torch.stack(reply.codes, dim=1)
    assert streamed.shape[1] >= 5, "too short a reply to test streaming"
    assert torch.equal(streamed, codes)
    assert reply.waveform().shape == wav.shape
    assert (reply.waveform() - wav).abs().max() < 1e-4
    with torch.inference_mode():
        whole = model.code2wav(streamed[None])[0, 0]
    assert (reply.waveform() - whole).abs().max() < 1e-4
    assert wav.abs().max() > 0.01, "silence would match anything"


def test_first_audio_comes_early(model: Any, pieces: Any) -> None:
    reply = run_alone(model, make_request(make_inputs(pieces, "media")))
    assert reply.first_audio_step is not None
    assert reply.first_audio_step < 0.3 * reply.steps
    assert reply.audio[0].numel() > 0


def test_rows_do_not_affect_each_other(model: Any, pieces: Any) -> None:
    first, second = (
        make_request(make_inputs(pieces, "media")),
        make_request(make_inputs(pieces, "media", seed=1)),
    )
    alone = [run_alone(model, first), run_alone(model, second)]
    assert alone[0].text != alone[1].text, "two different calls to tell apart"
    engine = OmniEngine(model, max_rows=3)
    replies = {engine.add(first): Reply()}
    for _ in range(3):  # the second call joins while the first is speaking
        for out in engine.step():
            reply = replies[out.row]
            reply.text += out.text
            if out.audio is not None and out.codes is not None:
                reply.codes.append(out.codes)
                reply.audio.append(out.audio)
    replies[engine.add(second)] = Reply()
    run_engine(engine, replies)
    for reply, single in zip(replies.values(), alone, strict=True):
        assert reply.text == single.text
        assert len(reply.codes) == len(single.codes)
        assert all(torch.equal(a, b) for a, b in zip(reply.codes, single.codes, strict=True))
        assert (reply.waveform() - single.waveform()).abs().max() < 1e-4


def test_cancel_stops_a_row_at_the_next_step(model: Any, pieces: Any) -> None:
    engine = OmniEngine(model, max_rows=2)
    keep = engine.add(make_request(make_inputs(pieces, "media")))
    stop = engine.add(make_request(make_inputs(pieces, "text")))
    for _ in range(2):
        engine.step()
    engine.cancel(stop)
    outs = {out.row: out for out in engine.step()}
    assert outs[stop].done and outs[stop].reason == "cancelled"
    assert outs[stop].audio is None and outs[stop].codes is None and outs[stop].text == []
    assert outs[keep].audio is not None and not outs[keep].done
    assert engine.active == [keep]
    for _ in range(3):
        assert stop not in {out.row for out in engine.step()}
    with pytest.raises(KeyError):
        engine.cancel(stop)
    # Its slot is free again: a new call takes it and gets the same reply as alone.
    request = make_request(make_inputs(pieces, "text"))
    replies = {engine.add(request): Reply()}
    replies[keep] = Reply()
    run_engine(engine, replies)
    again = next(r for row, r in replies.items() if row != keep)
    single = run_alone(model, request)
    same_reply(again, single)


def _same(a: Reply, b: Reply) -> bool:
    return (
        a.text == b.text
        and len(a.codes) == len(b.codes)
        and all(torch.equal(x, y) for x, y in zip(a.codes, b.codes, strict=True))
    )


def test_a_sampled_call_depends_on_its_seed_not_on_its_neighbours(model: Any, pieces: Any) -> None:
    """Text, first codes and residual codes all sampled: the same request and seed give the same
    reply alone (twice) and beside another sampled call; another seed gives another reply."""
    sampled = Decoding(text=Sampling(temperature=1.0, top_k=20, top_p=0.9))
    mine = Request(make_inputs(pieces, "media"), max_text_tokens=MAX_TEXT, max_frames=MAX_FRAMES,
                   decoding=sampled, seed=7)  # fmt: skip
    alone = run_alone(model, mine)
    assert len(alone.codes) >= 5 and alone.reason in ("stop", "length")
    assert _same(run_alone(model, mine), alone)
    assert not _same(run_alone(model, replace(mine, seed=8)), alone), "the seed must matter"
    other = replace(mine, inputs=make_inputs(pieces, "media", seed=1), seed=8)
    engine = OmniEngine(model, max_rows=2)
    replies = {engine.add(other): Reply()}
    for _ in range(2):  # mine joins while the other call is speaking, behind it in the batch
        for out in engine.step():
            replies[out.row].text += out.text
    row = engine.add(mine)
    replies[row] = Reply()
    run_engine(engine, replies)
    assert _same(replies[row], alone)
    assert (replies[row].waveform() - alone.waveform()).abs().max() < 1e-4
    codebook = model.config.code2wav_config.codebook_size
    assert all(int(c.max()) < codebook and int(c.min()) >= 0 for c in alone.codes)
    with pytest.raises(ValueError, match="seed"):
        replace(mine, seed=-1)


def _filtered_softmax(logits: np.ndarray, setting: Sampling) -> np.ndarray:
    """``generate()``'s filters written out plainly for one row (float64): temperature, the
    ``top_k`` best, then the least likely dropped while their mass stays within 1 - top_p."""
    scores = logits / setting.temperature
    order = np.argsort(-scores)
    kept = order[: setting.top_k or len(order)]
    probs = np.exp(scores[kept] - scores[kept].max())
    probs /= probs.sum()
    from_least = np.cumsum(probs[::-1])[::-1]  # mass of each token and all less likely ones
    keep = from_least > 1 - setting.top_p
    keep[0] = True
    out = np.zeros(len(logits))
    out[kept[keep]] = probs[keep] / probs[keep].sum()
    return out


def test_sampling_draws_from_the_filtered_softmax() -> None:
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    setting = Sampling(temperature=0.7, top_k=6, top_p=0.9)
    expected = _filtered_softmax(logits, setting)
    assert (expected > 0).sum() == 4, "top-k and top-p both cut something"
    tolerance = 0.015  # over 4 standard deviations at 20,000 draws
    # Samplers that are wrong must be told apart: uniform over the kept tokens, temperature 1.
    assert np.abs(expected - (expected > 0) / 4).max() > 3 * tolerance
    no_temperature = _filtered_softmax(logits, replace(setting, temperature=1.0))
    assert np.abs(expected - no_temperature).max() > 3 * tolerance
    draws = 20_000
    batch = torch.tensor(logits, dtype=torch.float32).expand(draws, -1)
    settings: list[Sampling | None] = [setting] * draws
    cpu = torch.device("cpu")
    spread = [(row, 0) for row in range(draws)]
    same = [(12345, row) for row in range(draws)]
    for keys in (spread, same):
        tokens = pick(batch, Draws.send(cpu, settings, keys), 3)
        frequencies = np.bincount(tokens.numpy(), minlength=len(logits)) / draws
        assert np.abs(frequencies - expected).max() < tolerance, frequencies
        # A row's draw is its own: the same in a smaller batch, and greedy rows stay greedy.
        part = pick(batch[:50], Draws.send(cpu, [*settings[:25], *[None] * 25], keys[:50]), 3)
        assert torch.equal(part[:25], tokens[:25]) and (part[25:] == 0).all()


def test_full_engine_and_bad_requests_are_refused(model: Any, pieces: Any) -> None:
    engine = OmniEngine(model, max_rows=1)
    inputs = make_inputs(pieces, "text")
    with pytest.raises(ValueError, match="speaker"):
        engine.add(Request(inputs, speaker="nobody"))
    cut = {key: value[:, :-1] for key, value in inputs.items()}
    with pytest.raises(ValueError, match="assistant turn"):
        engine.add(make_request(cut))
    engine.add(make_request(inputs))
    with pytest.raises(RuntimeError, match="slots"):
        engine.add(make_request(inputs))
    tokenizer, features, images = pieces
    with pytest.raises(ValueError, match="role"):
        build_inputs(tokenizer, features, images, [Message("robot", "hi")])


@pytest.mark.parametrize("part", ["thinker", "talker"])
def test_grouped_moe_equals_the_module(model: Any, part: str) -> None:
    layers = (
        model.thinker.model.language_model.layers
        if part == "thinker"
        else model.talker.model.layers
    )
    torch.manual_seed(0)
    for layer in layers:
        x = torch.randn(3, 5, layer.mlp.gate.hidden_dim)
        with torch.inference_mode():
            assert torch.allclose(feed_forward(layer.mlp, x), layer.mlp(x), atol=1e-6)
            flat = x.reshape(-1, x.shape[-1])
            _, weights, index = layer.mlp.gate(flat)
            grouped = experts_forward(layer.mlp.experts, flat, index, weights, grouped=True)
            gathered = experts_forward(layer.mlp.experts, flat, index, weights, grouped=False)
            reference = layer.mlp.experts(flat, index, weights)
        assert torch.allclose(grouped, reference, atol=1e-6)
        assert torch.allclose(gathered, reference, atol=1e-6)
        assert reference.abs().max() > 1e-4, "experts that output nothing would match anything"


def test_code2wav_stream_equals_whole_decode(model: Any) -> None:
    torch.manual_seed(0)
    quantizers = model.config.code2wav_config.num_quantizers
    codes = torch.randint(0, model.config.code2wav_config.codebook_size, (2, quantizers, 12))
    with torch.inference_mode():
        whole = model.code2wav(codes)[:, 0]
    stream = Code2WavStream(model.code2wav, slots=3)
    audio: list[list[Tensor]] = [[], []]
    for t in range(12):
        # The second call starts 4 frames late, and the two swap batch order halfway.
        calls = [c for c in ((0, 2), (1, 0)) if t >= 4 * c[0]]
        if t >= 6:
            calls.reverse()
        frames = torch.stack([codes[c, :, t - 4 * c] for c, _ in calls])
        for (c, _), wav in zip(calls, stream.step(frames, [s for _, s in calls]), strict=True):
            audio[c].append(wav)
    assert (torch.cat(audio[0]) - whole[0]).abs().max() < 1e-5
    late = torch.cat(audio[1])
    with torch.inference_mode():
        whole_late = model.code2wav(codes[1:, :, :8])[0, 0]
    assert (late - whole_late).abs().max() < 1e-5


def test_bfloat16_streams(tiny_models: Path, pieces: Any) -> None:
    """The engine in the dtype it runs in on a GPU: features cast, audio handed out as float32."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        half = load_model(str(tiny_models / "tiny-qwen3-omni"), dtype=torch.bfloat16)
        reply = run_alone(half, make_request(make_inputs(pieces, "media")))
    finally:
        torch.set_num_threads(threads)
    assert 1 <= len(reply.text) <= MAX_TEXT and len(reply.codes) >= 5
    wav = reply.waveform()
    assert wav.dtype == torch.float32 and torch.isfinite(wav).all() and wav.abs().max() > 0.01


def test_history_is_cut_to_the_token_budget(pieces: Any) -> None:
    tokenizer, features, images = pieces
    system = Message("system", "You are a helpful voice assistant.")
    turns = [
        Message("user" if i % 2 == 0 else "assistant", f"turn {i} hello there") for i in range(6)
    ]
    whole = build_inputs(tokenizer, features, images, [system, *turns])
    length = whole["input_ids"].shape[1]
    cut = build_inputs(tokenizer, features, images, [system, *turns], max_tokens=length - 1)
    assert cut["input_ids"].shape[1] < length
    text = tokenizer.decode(cut["input_ids"][0])
    # The system message stays; the oldest turn goes first, the last one stays.
    assert "helpful voice assistant" in text and "turn 0" not in text and "turn 5" in text
    assert text.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="budget"):
        build_inputs(tokenizer, features, images, [system, *turns], max_tokens=5)


def test_a_cut_history_keeps_its_start_until_the_budget_is_reached_again(pieces: Any) -> None:
    """Cut to 60% of the budget, the next turns leave out the same turns (the prompt starts
    where it did, as a kept cache needs) until the budget is passed again."""
    system = Message("system", "You are a helpful voice assistant.")
    turns = [Message("user" if i % 2 == 0 else "assistant", f"turn {i} hello there")
             for i in range(40)]  # fmt: skip
    size = build_inputs(*pieces, [system, *turns[:10]])["input_ids"].shape[1]
    budget, dropped, starts = size, 0, []
    for count in range(10, 40, 2):
        inputs, dropped = fit_inputs(*pieces, [system, *turns[:count]], budget, dropped, 0.6)
        assert inputs["input_ids"].shape[1] <= budget
        text = pieces[0].decode(inputs["input_ids"][0])
        assert f"turn {count - 1} " in text and "helpful voice assistant" in text
        starts.append(dropped)
    assert starts[0] == 0  # ten turns fit exactly
    changes = [i for i in range(1, len(starts)) if starts[i] != starts[i - 1]]
    assert len(changes) >= 2, starts  # cut again as the talk grows...
    # ...but not at each turn.
    assert all(b - a > 1 for a, b in pairwise(changes)), starts
    # With nothing retained beyond the budget, every turn past it moves the start.
    _, first = fit_inputs(*pieces, [system, *turns[:12]], budget)
    _, second = fit_inputs(*pieces, [system, *turns[:14]], budget, first)
    assert 0 < first < second


def test_a_text_only_reply_has_the_same_text_and_no_audio(model: Any, pieces: Any) -> None:
    inputs = make_inputs(pieces, "media")
    spoken = run_alone(model, make_request(inputs))
    written = run_alone(
        model, Request(inputs, speak=False, max_text_tokens=MAX_TEXT, decoding=GREEDY)
    )
    assert written.text == spoken.text and written.audio == []
    assert written.steps == len(written.text) - 1  # the first token comes from the prefill


def test_a_fixed_length_reply_runs_past_the_end_tokens(model: Any, pieces: Any) -> None:
    # Random weights may pick an end token at once or never. The tiny talker picks its end
    # code early; its thinker never picks the end token, so make this reply's own second token
    # the end, as such weights would. A benchmark's fixed-length request must still make
    # exactly its limits; an ordinary one stops early.
    inputs = make_inputs(pieces, "media")
    free = run_alone(model, make_request(inputs))
    assert len(free.text) == MAX_TEXT and len(free.codes) < MAX_FRAMES - 1
    engine = OmniEngine(model, max_rows=2)
    engine.text_end = {free.text[1]}
    stopped, fixed = Reply(), Reply()
    rows = {engine.add(make_request(inputs)): stopped}
    fixed_request = Request(
        inputs, max_text_tokens=MAX_TEXT, max_frames=MAX_FRAMES, decoding=GREEDY,
        fixed_length=True,
    )  # fmt: skip
    rows[engine.add(fixed_request)] = fixed
    run_engine(engine, rows)
    assert len(stopped.text) < MAX_TEXT and len(stopped.codes) < MAX_FRAMES - 1
    assert stopped.reason == "stop"
    # generate()'s count: the last first code ends the reply without its residual codes.
    assert len(fixed.text) == MAX_TEXT and len(fixed.codes) == MAX_FRAMES - 1
    assert fixed.reason == "length" and free.text[1] not in fixed.text[1:]
    assert all(int(codes[0]) != engine.codec_end for codes in fixed.codes)


def _prefill_in_pieces(engine: OmniEngine, request: Request, tokens: int) -> tuple[int, int]:
    """``begin`` and ``prefill`` ``tokens`` at a time; the row and how many pieces it took."""
    row = engine.begin(request)
    pieces = 1
    while not engine.prefill(row, tokens):
        assert row in engine.prefilling and row not in engine.active
        pieces += 1
    return row, pieces


def _edges_cut(ids: Tensor, token: int, size: int) -> bool:
    """Whether a piece boundary of ``size`` falls inside the span of ``token``s."""
    span = (ids[0] == token).nonzero().flatten().tolist()
    return any(span[0] < edge <= span[-1] for edge in range(size, ids.shape[1], size))


@pytest.mark.filterwarnings(GENERATE_WARNING)
def test_a_prefill_in_small_pieces_equals_the_whole_one_and_generate(
    model: Any, pieces: Any
) -> None:
    inputs = make_inputs(pieces, "media")  # history, audio and a picture
    thinker = model.config.thinker_config
    for token in (thinker.audio_token_id, thinker.image_token_id):
        assert _edges_cut(inputs["input_ids"], token, 7), "a piece edge inside each span"
    text, codes, wav = _generate(model, inputs)
    whole = run_alone(model, make_request(inputs))
    engine = OmniEngine(model, max_rows=1)
    row, count = _prefill_in_pieces(engine, make_request(inputs), 7)
    assert count > inputs["input_ids"].shape[1] // 7, "the talker's prompt in pieces too"
    chunked = Reply()
    run_engine(engine, {row: chunked})
    for reply in (whole, chunked):
        assert reply.text == text
        assert torch.equal(torch.stack(reply.codes, dim=1), codes)
        assert (reply.waveform() - wav).abs().max() < 1e-4
    assert len(chunked.codes) >= 5 and wav.abs().max() > 0.01


def _long_inputs(pieces: Any) -> dict[str, Tensor]:
    rng = np.random.default_rng(3)
    clip = (rng.standard_normal(24_000) * 0.1).astype(np.float32)
    picture = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    history = [
        Message("user" if i % 2 == 0 else "assistant", f"turn {i}: tell me more about it")
        for i in range(12)
    ]
    last = Message("user", "and what is this", audio=[clip], images=[picture])
    tokenizer, features, images = pieces
    return build_inputs(
        tokenizer, features, images, [Message("system", "Be brief."), *history, last]
    )


def test_a_call_gets_a_frame_every_step_while_a_long_prompt_is_prefilled(
    model: Any, pieces: Any
) -> None:
    first = make_request(make_inputs(pieces, "text"))  # 17 frames: it speaks through the prefill
    second = make_request(_long_inputs(pieces))
    assert second.inputs["input_ids"].shape[1] > 200
    alone = [run_alone(model, first), run_alone(model, second)]
    engine = OmniEngine(model, max_rows=2)
    replies = {engine.add(first): Reply()}
    _run_steps(engine, replies, 1)
    late = engine.begin(second)
    replies[late] = Reply()
    pieces_run = 0
    while late in engine.prefilling:
        engine.prefill(late, 48)
        pieces_run += 1
        if late in engine.prefilling:  # the first call steps alone, a frame each step
            (out,) = _run_steps(engine, replies, 1)
            assert out.audio is not None and out.audio.numel() == 1920 and not out.done
    assert pieces_run >= 10
    run_engine(engine, replies)
    for reply, single in zip(replies.values(), alone, strict=True):
        assert reply.text == single.text
        assert all(torch.equal(a, b) for a, b in zip(reply.codes, single.codes, strict=True))
        assert len(reply.codes) == len(single.codes) >= 5


def _run_steps(engine: OmniEngine, replies: dict[int, Reply], steps: int) -> list[Any]:
    outs: list[Any] = []
    for _ in range(steps):
        outs = engine.step()
        for out in outs:
            reply = replies[out.row]
            reply.text += out.text
            if out.audio is not None and out.codes is not None:
                reply.codes.append(out.codes)
                reply.audio.append(out.audio)
    return outs


def test_a_call_cancelled_while_prefilling_frees_its_slot(model: Any, pieces: Any) -> None:
    engine = OmniEngine(model, max_rows=1)
    request = make_request(make_inputs(pieces, "media"))
    row = engine.begin(request)
    assert not engine.prefill(row, 16) and engine.prefilling == [row] and not engine.free
    engine.cancel(row)
    assert engine.prefilling == [] and engine.active == [] and engine.step() == []
    again = Reply()
    run_engine(engine, {engine.add(request): again})
    single = run_alone(model, request)
    same_reply(again, single)


def test_a_conversation_cancelled_while_prefilling_keeps_what_its_slot_holds(
    model: Any, pieces: Any
) -> None:
    """A caller who barges in just after a turn cancels that turn's prefill: what the slot
    holds by then is kept for the conversation (it was freed, and the whole conversation
    prefilled again), and the next turn starts from it with the reply it would get alone."""
    engine = OmniEngine(model, max_rows=1)
    request = replace(make_request(make_inputs(pieces, "media")), conversation="call")
    row = engine.begin(request)
    assert not engine.prefill(row, 16) and not engine.prefill(row, 16)
    engine.cancel(row)
    assert engine.prefilling == [] and list(engine.kept) == ["call"]
    again = Reply()
    run_engine(engine, {engine.add(request): again})
    assert engine.reused == 32  # the two pieces, not prefilled again
    same_reply(again, run_alone(model, replace(request, conversation=None)))


def _turns(pieces: Any, reply: list[int] | None = None) -> dict[str, Tensor]:
    """A spoken question with a picture; with ``reply`` (the tokens the model made), the
    conversation's next turn: that prompt, the reply's very tokens, and a new question."""
    rng = np.random.default_rng(5)
    clip = (rng.standard_normal(16_000) * 0.1).astype(np.float32)
    picture = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    messages = [
        Message("system", "You are a helpful voice assistant."),
        Message("user", QUESTIONS[0], audio=[clip], images=[picture]),
    ]
    inputs = build_inputs(*pieces, messages)
    if reply is None:
        return inputs
    # The reply as the model made it (decoding and encoding its text again need not give the
    # same tokens), then the next user turn and the open assistant turn.
    after = f"<|im_end|>\n<|im_start|>user\n{QUESTIONS[1]}<|im_end|>\n<|im_start|>assistant\n"
    more = torch.tensor([reply + pieces[0].encode(after)])
    ids = torch.cat([inputs["input_ids"], more], dim=1)
    return {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_a_conversations_next_turn_prefills_only_what_is_new(model: Any, pieces: Any) -> None:
    """A reply's thinker cache stays in its slot for the call's next turn, whose prefill starts
    after the prefix both prompts share (the first turn's prompt at least), and the reply is the
    one a full prefill gives."""
    first = _turns(pieces)
    engine = OmniEngine(model, max_rows=2)
    replies = {engine.add(replace(make_request(first), conversation="call")): Reply()}
    run_engine(engine, replies)
    said = next(iter(replies.values())).text
    assert list(engine.kept) == ["call"] and len(engine.free) == 2
    second = _turns(pieces, said)
    row = engine.add(replace(make_request(second), conversation="call"))
    # All the slot holds: turn one's prompt and its reply's tokens but the last (never fed);
    # and of the talker's prompt, turn one's user part.
    assert engine.reused == first["input_ids"].shape[1] + len(said) - 1
    assert engine.talker_reused > 10, engine.talker_reused
    replies = {row: Reply()}
    run_engine(engine, replies)
    same_reply(replies[row], run_alone(model, make_request(second)))
    engine.forget("call")
    assert not engine.kept and len(engine.free) == 2


def test_a_next_turn_prepares_and_encodes_only_its_new_media(model: Any, pieces: Any) -> None:
    """With the conversation's ``Media``, a next turn computes features and runs the audio
    encoder for its new clip alone, takes the earlier clip's and the picture's from before
    (its prefill still reuses all of the first prompt), and is answered as a build from
    nothing is."""
    rng = np.random.default_rng(7)
    clips = [(rng.standard_normal(16_000 + 3_200 * i) * 0.1).astype(np.float32) for i in (0, 1)]
    picture = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    asked = [
        Message("system", "You are a helpful voice assistant."),
        Message("user", QUESTIONS[0], audio=[clips[0]], images=[picture]),
    ]
    media, engine = Media(), OmniEngine(model, max_rows=1)
    first = build_inputs(*pieces, asked, media=media)
    row = engine.add(replace(make_request(first), conversation="call", media=media.latest))
    replies = {row: Reply()}
    run_engine(engine, replies)
    assert (media.prepared, media.encoded, media.held_bytes) == (2, 2, 0)
    said = pieces[0].decode(replies[row].text, skip_special_tokens=True)
    turns = [*asked, Message("assistant", said), Message("user", "and this?", audio=[clips[1]])]
    second = build_inputs(*pieces, turns, media=media)
    assert media.prepared == 3 and media.held_bytes > 0  # the new clip's features
    whole = build_inputs(*pieces, turns)
    # Planned inputs are a whole build's without the features and pixels, which the media
    # hold until they are encoded and then let go.
    assert whole.keys() - second.keys() == {"input_features", "pixel_values"}
    assert all(torch.equal(whole[key], second[key]) for key in second)
    row = engine.add(replace(make_request(second), conversation="call", media=media.latest))
    assert media.encoded == 3 and engine.reused >= first["input_ids"].shape[1]
    assert media.held_bytes == 0
    replies = {row: Reply()}
    run_engine(engine, replies)
    same_reply(replies[row], run_alone(model, make_request(whole)))
    # Only the latest prompt's media are held: a turn without the picture lets it go.
    build_inputs(*pieces, [asked[0], turns[-1]], media=media)
    assert len(media) == 1


def test_a_clips_features_do_not_depend_on_the_other_clips(pieces: Any) -> None:
    """Each clip's features are its own: Qwen's processor pads a prompt's clips to the longest
    together, which changes a shorter clip's last frame with the clips beside it, and so a
    kept turn's embeddings with every longer clip that comes after."""
    rng = np.random.default_rng(8)
    short, long = ((rng.standard_normal(n) * 0.1).astype(np.float32) for n in (16_000, 24_000))
    alone = build_inputs(*pieces, [Message("user", "", audio=[short])])
    beside = build_inputs(*pieces, [Message("user", "", audio=[long, short])])
    frames = int(alone["feature_attention_mask"].sum())
    assert int(beside["feature_attention_mask"][1].sum()) == frames
    assert torch.equal(beside["input_features"][1, :, :frames], alone["input_features"][0])


def test_a_clips_features_are_made_as_qwens_processor_makes_them(pieces: Any) -> None:
    """Not padded to 30 s nor cut there (the extractor's own defaults), as Qwen3-Omni's
    processor asks for: a 40 s clip keeps its last 10 s, and a short clip's features are the
    processor's for it alone."""
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import (
        Qwen3OmniMoeProcessor,
    )

    from s2s.omni.media import Media

    _, extractor, _ = pieces
    rng = np.random.default_rng(3)
    long, short = ((rng.standard_normal(n) * 0.1).astype(np.float32) for n in (640_000, 32_000))
    media = Media()
    key, frames = media.clip(extractor, long)
    assert frames == 4000 and media.features(key).shape[-1] == 4000
    key, frames = media.clip(extractor, short)
    # The processor's own audio settings (it cannot be built here: its video part needs
    # torchvision).
    settings = Qwen3OmniMoeProcessor.audio_kwargs
    made = extractor([short], **settings, return_tensors="pt")
    assert torch.equal(media.features(key), made["input_features"][0, :, :frames])


def test_a_picture_that_is_no_image_is_a_clear_error(pieces: Any) -> None:
    with pytest.raises(ValueError, match="cannot be decoded"):
        build_inputs(*pieces, [Message("user", "look", images=[b"not a jpeg"])])


def test_a_kept_cache_gives_way_to_another_call(model: Any, pieces: Any) -> None:
    """With every slot kept, another call takes the oldest; the conversation that lost it is
    prefilled whole next time, with the same reply."""
    first = _turns(pieces)
    engine = OmniEngine(model, max_rows=1)
    replies = {engine.add(replace(make_request(first), conversation="a")): Reply()}
    run_engine(engine, replies)
    said = next(iter(replies.values())).text
    other = engine.add(replace(make_request(make_inputs(pieces, "text")), conversation="b"))
    assert list(engine.kept) == [] and engine.reused == 0
    run_engine(engine, {other: Reply()})
    second = _turns(pieces, said)
    row = engine.add(replace(make_request(second), conversation="a"))
    assert engine.reused == 0 and list(engine.kept) == []  # b's cache gave way, a's was gone
    replies = {row: Reply()}
    run_engine(engine, replies)
    same_reply(replies[row], run_alone(model, make_request(second)))


@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_a_step_reads_back_once_and_uploads_once_per_dtype(
    model: Any, pieces: Any, fixed_shapes: bool
) -> None:
    """On a GPU each value read back is a host sync and each tensor of host values a copy: a
    step makes one of each kind of copy, whatever its calls do (greedy, sampled, at a fixed
    length, a first frame beside others' later ones, a text that ends while speech goes on).
    The CPU cannot time this, but ``HostTraffic`` counts the calls themselves."""
    sampled = Decoding(
        text=Sampling(temperature=1.0, top_k=20, top_p=0.9), speech=Sampling(top_k=10),
        residual=Sampling(temperature=0.9),
    )  # fmt: skip
    inputs = make_inputs(pieces, "media")
    requests = [
        make_request(inputs),
        Request(inputs, max_text_tokens=3, max_frames=MAX_FRAMES, decoding=sampled, seed=3),
        Request(
            make_inputs(pieces, "text"),
            max_text_tokens=MAX_TEXT,
            max_frames=12,
            decoding=GREEDY,
            fixed_length=True,
        ),
    ]
    engine = OmniEngine(model, max_rows=3, fixed_shapes=fixed_shapes)
    replies = {engine.add(requests[0]): Reply()}
    steps = 0
    for _ in range(200):
        if not engine.active:
            break
        if steps in (2, 4):  # joins between steps: a first frame beside later ones
            replies[engine.add(requests[1 + steps // 4])] = Reply()
        with HostTraffic() as traffic:
            outs = engine.step()
        steps += 1
        assert traffic.reads == {"numpy": 1}, (steps, traffic.reads)
        assert traffic.uploads == {"as_tensor": 2}, (steps, traffic.uploads)
        for out in outs:
            replies[out.row].text += out.text
            replies[out.row].codes += [] if out.codes is None else [out.codes]
    assert not engine.active and steps > 12
    assert all(reply.codes for reply in replies.values()), "every call spoke"
