"""Qwen3-Omni-30B-A3B-Instruct's real sizes as a ``Qwen3OmniMoeConfig``, for random-weight runs.

transformers' config defaults are not the released model's sizes, so ``real_config()`` spells
out the values of the released ``config.json``. Sources (read 2026-12-01):

- a dump of the loaded ``Qwen3OmniMoeConfig`` of a local Qwen3-Omni-30B-A3B-Instruct copy, found
  in a public repository through the library's code index (every value below);
- copies of the released config.json on the Hub, which agree on what they show:
  https://huggingface.co/mcshao/LAT-Audio/blob/main/config.json (code2wav, talker ids),
  https://huggingface.co/ITSoftware/FRIDA-Qwen3/blob/main/config.json (code2wav, talker text),
  https://huggingface.co/TheClusterDev/Q3OT-FP8/blob/main/config.json (code2wav);
- independent re-implementations' fixtures of the same config (a Rust speech-config parser's
  test: talker text, code predictor ids, speakers; a Qwen3-Omni metadata table: thinker text,
  vision encoder, embedding vocabulary 152,064).

The thinker's text vocabulary is 152,064 (the embedding's rows), not Qwen3-30B-A3B's 151,936.
Fields the sources did not show keep transformers' defaults (the config classes' own).

Token ids: the values here are the real ones, but a run without the real tokenizer (the bench
uses the tiny checkpoint's) must take that tokenizer's ids: ``borrow_token_ids`` copies them from
another config. Sizes cost the time; ids do not.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import Qwen3OmniMoeConfig

#: 3-axis RoPE of both decoders: each head's 64 rotary pairs as time/height/width.
_MROPE = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [24, 20, 20]}
#: The released text token ids (Qwen's tokenizer), for ``real_config()`` alone.
_REAL_MEDIA = {
    "audio_token_id": 151675, "image_token_id": 151655, "video_token_id": 151656,
    "audio_start_token_id": 151669, "vision_start_token_id": 151652,
}  # fmt: skip
_REAL_TOP = {
    "im_start_token_id": 151644, "im_end_token_id": 151645, "system_token_id": 8948,
    "user_token_id": 872, "assistant_token_id": 77091, "tts_pad_token_id": 151671,
    "tts_bos_token_id": 151672, "tts_eos_token_id": 151673,
}  # fmt: skip


def real_parts() -> dict[str, Any]:
    """The released config as plain dicts (``Qwen3OmniMoeConfig``'s keyword arguments)."""
    thinker_text = {
        "vocab_size": 152_064, "hidden_size": 2048, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "intermediate_size": 768, "moe_intermediate_size": 768, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "rms_norm_eps": 1e-6, "max_position_embeddings": 65_536,
        "rope_parameters": dict(_MROPE), "tie_word_embeddings": False,
    }  # fmt: skip
    audio = {
        "num_mel_bins": 128, "encoder_layers": 32, "encoder_attention_heads": 20,
        "encoder_ffn_dim": 5120, "d_model": 1280, "output_dim": 2048,
        "downsample_hidden_size": 480, "n_window": 50, "n_window_infer": 800,
        "conv_chunksize": 500, "max_source_positions": 1500,
    }  # fmt: skip
    vision = {
        "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
        "out_hidden_size": 2048, "patch_size": 16, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24], "hidden_act": "gelu_pytorch_tanh",
    }  # fmt: skip
    thinker = {
        **_REAL_MEDIA, "user_token_id": _REAL_TOP["user_token_id"],
        "position_id_per_seconds": 13, "seconds_per_chunk": 2,
        "text_config": thinker_text, "audio_config": audio, "vision_config": vision,
    }  # fmt: skip
    talker_text = {
        "vocab_size": 3072, "hidden_size": 1024, "num_hidden_layers": 20,
        "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 128,
        "intermediate_size": 2048, "moe_intermediate_size": 384,
        "shared_expert_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 6,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "rms_norm_eps": 1e-6, "max_position_embeddings": 65_536,
        "rope_parameters": dict(_MROPE),
    }  # fmt: skip
    predictor = {
        "vocab_size": 2048, "hidden_size": 1024, "num_hidden_layers": 5,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "intermediate_size": 3072, "num_code_groups": 16, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32_768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    }  # fmt: skip
    talker = {
        **_REAL_MEDIA, "text_config": talker_text, "code_predictor_config": predictor,
        "num_code_groups": 16, "thinker_hidden_size": 2048, "accept_hidden_layer": 24,
        "codec_pad_id": 2148, "codec_bos_id": 2149, "codec_eos_token_id": 2150,
        "codec_nothink_id": 2155, "codec_think_bos_id": 2156, "codec_think_eos_id": 2157,
        "speaker_id": {"chelsie": 2301, "ethan": 2302, "aiden": 2303},
        "position_id_per_seconds": 13, "seconds_per_chunk": 2,
        # Not declared by the talker's config class; its rope index reads it.
        "spatial_merge_size": 2,
    }  # fmt: skip
    code2wav = {
        "codebook_size": 2048, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_quantizers": 16, "sliding_window": 72, "decoder_dim": 1536,
        "upsample_rates": [8, 5, 4, 3], "upsampling_ratios": [2, 2],
        "layer_scale_initial_scale": 0.01, "max_position_embeddings": 8000,
        "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},
    }  # fmt: skip
    return {
        **_REAL_TOP, "thinker_config": thinker, "talker_config": talker,
        "code2wav_config": code2wav, "enable_audio_output": True,
    }  # fmt: skip


def real_config(depth: int | None = None) -> Qwen3OmniMoeConfig:
    """Qwen3-Omni-30B-A3B-Instruct's config (about 35 B parameters), with Qwen's token ids.

    ``depth`` cuts every stack (both encoders, thinker, talker, code predictor, code2wav) to at
    most that many layers, widths kept: the real shapes through every module, in the memory of
    a few layers (``depth=1``: 1.74 B parameters)."""
    parts = real_parts()
    if depth is not None:
        _cut(parts, depth)
    return Qwen3OmniMoeConfig(**parts)


def _cut(parts: dict[str, Any], depth: int) -> None:
    thinker, talker = parts["thinker_config"], parts["talker_config"]
    stacks = [
        (thinker["text_config"], "num_hidden_layers"), (thinker["audio_config"], "encoder_layers"),
        (thinker["vision_config"], "depth"), (talker["text_config"], "num_hidden_layers"),
        (talker["code_predictor_config"], "num_hidden_layers"),
        (parts["code2wav_config"], "num_hidden_layers"),
    ]  # fmt: skip
    for config, key in stacks:
        config[key] = min(config[key], depth)
    vision = thinker["vision_config"]
    # Deepstack features join the first thinker layers, one per listed vision block.
    kept = [i for i in vision["deepstack_visual_indexes"] if i < vision["depth"]] or [0]
    vision["deepstack_visual_indexes"] = kept[: thinker["text_config"]["num_hidden_layers"]]
    talker["accept_hidden_layer"] = min(talker["accept_hidden_layer"], depth)


def shrunk_config(real_depth: bool = False) -> Qwen3OmniMoeConfig:
    """The same parts and wiring, two layers deep, 8 experts and a quarter as wide (head sizes
    and codebooks kept), so a bench runs through every module on a small CPU.

    ``real_depth`` keeps every stack's real layer count (and where the deepstack features and
    the talker's accepted hidden state come from): a step then dispatches exactly the
    operators the real model's does (their count depends on layers, not widths), so a CPU can
    count what a GPU would have to launch."""
    real = real_parts()
    parts = copy.deepcopy(real)
    thinker, talker = parts["thinker_config"], parts["talker_config"]
    thinker["text_config"].update(
        vocab_size=4096, hidden_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=1, moe_intermediate_size=192, num_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    thinker["audio_config"].update(
        encoder_layers=2, d_model=320, encoder_attention_heads=5, encoder_ffn_dim=1280,
        output_dim=512, downsample_hidden_size=120,
    )  # fmt: skip
    thinker["vision_config"].update(
        depth=2, hidden_size=288, num_heads=4, intermediate_size=1076, out_hidden_size=512,
        deepstack_visual_indexes=[0, 1],
    )  # fmt: skip
    talker["text_config"].update(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=512, moe_intermediate_size=96, shared_expert_intermediate_size=192,
        num_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    talker["code_predictor_config"].update(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=768,
    )  # fmt: skip
    talker.update(thinker_hidden_size=512, accept_hidden_layer=1)
    parts["code2wav_config"].update(
        hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, decoder_dim=384,
    )  # fmt: skip
    if real_depth:
        _keep_depth(parts, real)
    return Qwen3OmniMoeConfig(**parts)


def _keep_depth(parts: dict[str, Any], real: dict[str, Any]) -> None:
    stacks = [
        ("thinker_config", "text_config", "num_hidden_layers"),
        ("thinker_config", "audio_config", "encoder_layers"),
        ("thinker_config", "vision_config", "depth"),
        ("thinker_config", "vision_config", "deepstack_visual_indexes"),
        ("talker_config", "text_config", "num_hidden_layers"),
        ("talker_config", "code_predictor_config", "num_hidden_layers"),
    ]
    for part, sub, key in stacks:
        parts[part][sub][key] = copy.deepcopy(real[part][sub][key])
    parts["talker_config"]["accept_hidden_layer"] = real["talker_config"]["accept_hidden_layer"]
    parts["code2wav_config"]["num_hidden_layers"] = real["code2wav_config"]["num_hidden_layers"]


#: Text token ids a prompt's tokenizer decides, per part of the config.
_TOP_IDS = list(_REAL_TOP)
_MEDIA_IDS = list(_REAL_MEDIA)


def borrow_token_ids(config: Any, donor: Any) -> None:
    """Give ``config`` the text token ids of ``donor`` (whose tokenizer builds the prompts):
    chat markers, roles, media placeholders and the talker's tts markers. Codec ids and speakers
    live in the talker's own vocabulary and stay."""
    for name in _TOP_IDS:
        setattr(config, name, getattr(donor, name))
    thinker, talker = config.thinker_config, config.talker_config
    for name in _MEDIA_IDS:
        setattr(thinker, name, getattr(donor.thinker_config, name))
        setattr(talker, name, getattr(donor.talker_config, name))
    thinker.user_token_id = donor.thinker_config.user_token_id
    text = thinker.text_config
    text.eos_token_id = donor.thinker_config.text_config.eos_token_id
    text.pad_token_id = donor.thinker_config.text_config.pad_token_id
    largest = max(getattr(donor, n) for n in _TOP_IDS)
    if largest >= text.vocab_size:
        raise ValueError(f"token id {largest} does not fit a vocabulary of {text.vocab_size}")
