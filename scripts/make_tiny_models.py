#!/usr/bin/env python
"""Write tiny random Moshi, Mimi and Qwen2.5-Omni checkpoints for tests and local runs.

    .venv/bin/python scripts/make_tiny_models.py [OUT_DIR]   # default: models/

writes ``OUT_DIR/tiny-moshi`` (``MoshiForConditionalGeneration``) and ``OUT_DIR/tiny-mimi`` (its
``audio_encoder``, a ``MimiModel``), overwriting what is there. The weights are random but
seeded, so two runs write the same tensors. The shapes keep what the server relies on: 24 kHz
audio, Mimi's ``[8, 6, 5, 4]`` upsampling so one codec frame is 1920 samples (80 ms, 12.5 Hz),
and 8 codebooks; everything else is shrunk to about 1M parameters so tests run on a laptop CPU.

It also writes ``OUT_DIR/tiny-qwen-omni``: a ``Qwen2_5OmniForConditionalGeneration`` whose every
part (thinker text model, audio and vision encoders, talker, token2wav) is two layers deep and 32
wide (~1.1M parameters), a byte-level BPE tokenizer with Qwen's special tokens at ids 0-16, one
``preprocessor_config.json`` for the Whisper features (128 mel bins) and the Qwen2-VL image
processor, and ``spk_dict.pt`` with one speaker, as ``from_pretrained`` requires.

And ``OUT_DIR/tiny-qwen3-omni``: a ``Qwen3OmniMoeForConditionalGeneration`` (thinker with audio
and vision towers, MoE talker with its code predictor, code2wav), every part one or two layers
deep and 32 wide with 4 experts (~0.5M parameters), 4 codebooks of 64 codes, code2wav's real
upsampling (1920 samples per 80 ms frame), speakers "ethan" and "chelsie" in the config, and the
same tokenizer/preprocessor layout with Qwen3-Omni's special token names. Its processor class
needs torchvision, so ``s2s.omni.prompt`` builds the inputs from the pieces instead.

``scripts/`` is not a package, so tests run this file with ``sys.executable`` rather than import
it; ``build(out_dir)`` is the same thing for a caller that loads the file as a module.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    MimiConfig,
    MimiModel,
    MoshiConfig,
    MoshiForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from transformers.models.mimi.modeling_mimi import MimiEuclideanCodebook

ROOT = Path(__file__).resolve().parent.parent
SEED = 1234

# Text and audio vocabularies are tiny on purpose: the tests check plumbing, not language.
TEXT_VOCAB = 64
CODEBOOK_SIZE = 64  # Mimi needs a power of two
NUM_CODEBOOKS = 8
PEAK = 0.5  # of decoded random codes, in [-1, 1] audio units

WORDS = [
    "hello", "there", "how", "are", "you", "today", "the", "weather", "is", "nice", "I",
    "can", "hear", "say", "what", "am", "looking", "at", "yes", "no", "maybe", "good",
    "morning", "evening", "thanks", "sure", "okay", "right", "well", "so", "and", "but",
    "or", "we", "they", "it", "this", "that", "here", "now", "later", "again", "please",
    "stop", "go", "wait", "listen", "talk", "speak", "sound", "voice", "music", "light",
    "dark", "red", "blue", "green", "one", "two", "three", "four",
]  # fmt: skip


def mimi_config() -> MimiConfig:
    """Mimi shrunk in width and depth, with the real sample rate, strides and frame size."""
    return MimiConfig(
        sampling_rate=24_000,
        upsampling_ratios=[8, 6, 5, 4],
        hidden_size=64,
        num_filters=8,
        codebook_size=CODEBOOK_SIZE,
        codebook_dim=16,
        vector_quantization_hidden_dimension=16,
        num_quantizers=NUM_CODEBOOKS,
        num_semantic_quantizers=1,
        # Depthwise like the real checkpoint (512 groups for 512 channels).
        upsample_groups=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        # At the default 0.01 a random transformer barely touches the signal, and a test of its
        # streaming state could pass with the state wrong.
        layer_scale_initial_scale=0.5,
    )


def moshi_config(mimi: MimiConfig) -> MoshiConfig:
    """A two-layer Moshi over ``mimi``; a bare ``MoshiConfig()`` fails without an audio codec."""
    return MoshiConfig(
        vocab_size=TEXT_VOCAB,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=256,
        num_codebooks=NUM_CODEBOOKS,
        audio_encoder_config=mimi.to_dict(),
        depth_decoder_config={
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "ffn_dim": 128,
            "max_position_embeddings": NUM_CODEBOOKS + 1,
            "sliding_window": NUM_CODEBOOKS,
        },
    )


def _codebooks(mimi: MimiModel) -> list[MimiEuclideanCodebook]:
    return [m for m in mimi.modules() if isinstance(m, MimiEuclideanCodebook)]


def _quieten(mimi: MimiModel) -> None:
    """Scale the decoder's last conv so decoded audio peaks at ``PEAK`` instead of ~20.

    Random weights decode to far beyond full scale; the server would clip every sample, and
    float rounding errors grow with the signal, which makes "streaming equals offline" checks
    depend on the size of the numbers rather than on the state being right.
    """
    codes = torch.randint(0, CODEBOOK_SIZE, (1, NUM_CODEBOOKS, 25))
    with torch.inference_mode():
        peak = float(mimi.decode(codes).audio_values.abs().max())
    if mimi.decoder is None:
        raise RuntimeError("the tiny Mimi was built without a decoder")
    last = mimi.decoder.decoder_seanet.layers[-1].conv
    with torch.no_grad():
        last.weight.mul_(PEAK / peak)
        last.bias.mul_(PEAK / peak)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def text_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with ``TEXT_VOCAB`` entries, so Moshi's text stream decodes.

    Real Moshi checkpoints ship a SentencePiece tokenizer; this one only has to turn the tiny
    model's random text tokens into words, like the real one turns real tokens into text.
    Special tokens come first so their ids are fixed: 0 is Moshi's text padding.
    """
    special = ["<pad>", "<unk>", "<s>"]
    vocab = {token: i for i, token in enumerate(special + WORDS[: TEXT_VOCAB - len(special)])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>"
    )


# -- Qwen2.5-Omni ---------------------------------------------------------------------------

#: Qwen's special tokens, in the real vocabulary's order; here they take ids 0, 1, 2, ...
QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>",
    "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>", "<|tts_pad|>", "<|tts_bos|>", "<|tts_eos|>",
]  # fmt: skip
QWEN_IDS = {token: i for i, token in enumerate(QWEN_SPECIAL)}
QWEN_VOCAB = 256
QWEN_CODEC_VOCAB = 64  # the talker's speech codes; the last four are its control codes
QWEN_CODEC = {"pad": 60, "bos": 61, "eos": 62, "mask": 63}
QWEN_TALKER_BOS = QWEN_IDS["<|tts_bos|>"]  # the speaker's text BOS, kept in spk_dict.pt
QWEN_SPEAKER = "Chelsie"  # the real checkpoint's default speaker, so generate() finds it
QWEN_TEXT = 32  # hidden width of the thinker's text model, which the encoders project into


def qwen_omni_config() -> Any:
    """Every part of Qwen2.5-Omni two layers deep and 32 wide, with Qwen's token layout."""
    from transformers import Qwen2_5OmniConfig

    ids = QWEN_IDS
    # Multimodal RoPE splits each head's rotary half (head_dim 16 → 8) into time/height/width.
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]}
    tokens = {
        "audio_token_index": ids["<|AUDIO|>"], "image_token_index": ids["<|IMAGE|>"],
        "video_token_index": ids["<|VIDEO|>"], "audio_start_token_id": ids["<|audio_bos|>"],
        "audio_end_token_id": ids["<|audio_eos|>"],
    }  # fmt: skip
    thinker = {
        **tokens,
        "user_token_id": QWEN_VOCAB - 1,
        # Not declared by the thinker's config class, but its rope index reads them (the real
        # checkpoint's config.json carries them too).
        "vision_start_token_id": ids["<|vision_bos|>"],
        "vision_end_token_id": ids["<|vision_eos|>"],
        "text_config": {
            "vocab_size": QWEN_VOCAB, "hidden_size": QWEN_TEXT, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "rope_parameters": rope, "max_position_embeddings": 4096,
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        },
        "audio_config": {
            "num_mel_bins": 128, "encoder_layers": 2, "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64, "d_model": 32, "output_dim": QWEN_TEXT,
        },
        "vision_config": {
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
            "out_hidden_size": QWEN_TEXT, "fullatt_block_indexes": [1],
        },
    }  # fmt: skip
    talker = {
        **tokens,
        "vocab_size": QWEN_CODEC_VOCAB, "embedding_size": QWEN_TEXT, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "rope_parameters": rope,
        "max_position_embeddings": 4096,
        "tts_text_start_token_id": ids["<|tts_bos|>"], "tts_text_end_token_id": ids["<|tts_eos|>"],
        "tts_text_pad_token_id": ids["<|tts_pad|>"],
        "tts_codec_start_token_id": QWEN_CODEC["bos"], "tts_codec_end_token_id": QWEN_CODEC["eos"],
        "tts_codec_pad_token_id": QWEN_CODEC["pad"], "tts_codec_mask_token_id": QWEN_CODEC["mask"],
        "vision_start_token_id": ids["<|vision_bos|>"],
        "vision_end_token_id": ids["<|vision_eos|>"],
    }  # fmt: skip
    token2wav = {
        "dit_config": {
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 16,
            "emb_dim": 16, "num_embeds": QWEN_CODEC_VOCAB, "look_ahead_layers": [1],
            "look_backward_layers": [0], "enc_emb_dim": 16, "enc_dim": 16,
            "enc_channels": [32, 32, 32, 32, 96], "enc_attention_channels": 16,
            "enc_se_channels": 16,
        },
        # The real upsampling (5*3*2*2*2*2 = 240 samples per mel frame, 24 kHz); channels halve
        # at each of the six stages, so 128 is the narrowest start that keeps one at the end.
        "bigvgan_config": {"upsample_initial_channel": 128},
    }  # fmt: skip
    return Qwen2_5OmniConfig(
        thinker_config=thinker, talker_config=talker, token2wav_config=token2wav
    )


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen's special tokens at fixed ids (0, 1, 2, ...)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=QWEN_VOCAB - 1,  # the last id is the thinker's "user" token
        special_tokens=QWEN_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = " ".join(WORDS) + " system user assistant You are a helpful voice assistant."
    tokenizer.train_from_iterator([text] * 4, trainer)
    tokenizer.add_tokens(["user"] if tokenizer.get_vocab_size() < QWEN_VOCAB else [])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL[1:],
    )


def _louden_vocoder(model: Any, speaker: dict[str, Any]) -> None:
    """Scale the vocoder's last conv so random codes decode to peaks near ``PEAK``.

    Random BigVGAN weights decode to about 1e-5 of full scale, which rounds to digital silence in
    int16; tests that check the server hands out sound need something audible.
    """
    codes = torch.randint(0, QWEN_CODEC["pad"], (1, 25))
    with torch.inference_mode():
        wav = model.token2wav(codes, conditioning=speaker["cond"], reference_mel=speaker["ref_mel"])
    peak = float(wav.abs().max())
    conv = model.token2wav.code2wav_bigvgan_model.conv_post
    with torch.no_grad():
        conv.weight.mul_(PEAK / peak)
        if conv.bias is not None:
            conv.bias.mul_(PEAK / peak)


def build_qwen_omni(out_dir: Path) -> None:
    """Write ``out_dir/tiny-qwen-omni``: model, tokenizer, speaker table and preprocessors."""
    from transformers import (
        Qwen2_5OmniForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        WhisperFeatureExtractor,
    )

    torch.manual_seed(SEED)
    config = qwen_omni_config()
    model = Qwen2_5OmniForConditionalGeneration(config).eval()
    # A random model never says its end token: these keep a reply to 8 words and ~1 s of speech
    # (the qwen-omni backend reads them; generate() itself defaults to 1024 and 4096).
    model.generation_config.thinker_max_new_tokens = 8
    model.generation_config.talker_max_new_tokens = 50
    model.generation_config.talker_min_new_tokens = 10
    # generate() conditions the vocoder on a speaker: its text BOS, an embedding ("cond") and a
    # reference mel ("ref_mel", frames x mel bins); the real file holds the same keys.
    dit = config.token2wav_config.dit_config
    speakers = {
        QWEN_SPEAKER: {
            "bos_token": QWEN_TALKER_BOS,
            "cond": torch.randn(1, dit.enc_emb_dim),
            "ref_mel": torch.randn(1, 30, dit.mel_dim),
        }
    }
    _louden_vocoder(model, speakers[QWEN_SPEAKER])
    path = out_dir / "tiny-qwen-omni"
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    tokenizer = qwen_tokenizer()
    tokenizer.save_pretrained(path)
    # Like the real checkpoint, one preprocessor_config.json serves both the audio features and
    # the image processor (each saved alone would overwrite the other's file).
    preprocessor = {
        **WhisperFeatureExtractor(feature_size=128).to_dict(),
        **Qwen2VLImageProcessorPil().to_dict(),
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    torch.save(speakers, path / "spk_dict.pt")
    print(f"wrote {path} ({type(model).__name__}, {_count(model):,} parameters)")

    loaded = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, local_files_only=True)
    theirs = loaded.state_dict()
    for key, tensor in model.state_dict().items():
        if not torch.equal(tensor, theirs[key]):
            raise RuntimeError(f"{key} did not survive save_pretrained/from_pretrained")
    if QWEN_SPEAKER not in loaded.speaker_map:
        raise RuntimeError("spk_dict.pt did not load")
    print(f"loaded back; speakers: {sorted(loaded.speaker_map)}")


# -- Qwen3-Omni ------------------------------------------------------------------------------

#: Qwen3-Omni's special tokens (the real names), at ids 0, 1, 2, ... of the tiny vocabulary.
QWEN3_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>",
    "<|audio_pad|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
    "<|tts_pad|>", "<|tts_bos|>", "<|tts_eos|>",
]  # fmt: skip
QWEN3_IDS = {token: i for i, token in enumerate(QWEN3_SPECIAL)}
#: Role names the talker finds turns by; added as whole tokens so each is one id.
QWEN3_ROLES = ["system", "user", "assistant"]
# BPE keeps all 256 byte symbols besides the special tokens, so the vocabulary cannot be smaller.
QWEN3_VOCAB = 320
QWEN3_TEXT = 32  # hidden width of the thinker's text model, which both encoders project into
QWEN3_CODEBOOK = 64  # codes per codebook; code2wav and the code predictor share it
QWEN3_CODE_GROUPS = 4  # codebooks per 80 ms frame: the talker's first, then the residuals
# The talker suppresses its top 1024 ids except EOS, so its control codes must live there and
# its vocabulary be the codebook plus those 1024.
QWEN3_TALKER_VOCAB = QWEN3_CODEBOOK + 1024
QWEN3_CODEC = {
    "pad": QWEN3_CODEBOOK + 0, "bos": QWEN3_CODEBOOK + 1, "eos": QWEN3_CODEBOOK + 2,
    "nothink": QWEN3_CODEBOOK + 3, "think_bos": QWEN3_CODEBOOK + 4,
    "think_eos": QWEN3_CODEBOOK + 5,
}  # fmt: skip
QWEN3_SPEAKERS = {"ethan": QWEN3_CODEBOOK + 10, "chelsie": QWEN3_CODEBOOK + 11}


def _qwen3_text(vocab: int) -> dict[str, Any]:
    """A two-layer MoE text model (4 experts, 2 per token) with Qwen's 3-axis RoPE."""
    # Multimodal RoPE splits each head's rotary half (head_dim 16 → 8) into time/height/width.
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]}
    return {
        "vocab_size": vocab, "hidden_size": QWEN3_TEXT, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 16, "moe_intermediate_size": 32, "num_experts": 4,
        "num_experts_per_tok": 2, "rope_parameters": rope, "max_position_embeddings": 4096,
    }  # fmt: skip


def qwen3_omni_config(tokens: dict[str, int]) -> Any:
    """Every part of Qwen3-Omni two layers deep and 32 wide, with ``tokens`` (name → id)."""
    from transformers import Qwen3OmniMoeConfig

    media = {
        "audio_token_id": tokens["<|audio_pad|>"], "image_token_id": tokens["<|image_pad|>"],
        "video_token_id": tokens["<|video_pad|>"],
        "audio_start_token_id": tokens["<|audio_start|>"],
        "vision_start_token_id": tokens["<|vision_start|>"],
    }  # fmt: skip
    thinker = {
        **media,
        "user_token_id": tokens["user"],
        "text_config": {
            **_qwen3_text(QWEN3_VOCAB), "eos_token_id": tokens["<|im_end|>"],
            "pad_token_id": tokens["<|endoftext|>"],
        },
        "audio_config": {
            "num_mel_bins": 128, "encoder_layers": 2, "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64, "d_model": 32, "output_dim": QWEN3_TEXT,
            "downsample_hidden_size": 16,
        },
        "vision_config": {
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
            "out_hidden_size": QWEN3_TEXT, "deepstack_visual_indexes": [0],
            "num_position_embeddings": 64,
        },
    }  # fmt: skip
    codec = QWEN3_CODEC
    talker = {
        **media,
        "text_config": {**_qwen3_text(QWEN3_TALKER_VOCAB), "shared_expert_intermediate_size": 32},
        "code_predictor_config": {
            "vocab_size": QWEN3_CODEBOOK, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 16, "num_code_groups": QWEN3_CODE_GROUPS,
        },
        "num_code_groups": QWEN3_CODE_GROUPS, "thinker_hidden_size": QWEN3_TEXT,
        "accept_hidden_layer": 1, "codec_eos_token_id": codec["eos"],
        "codec_nothink_id": codec["nothink"], "codec_think_bos_id": codec["think_bos"],
        "codec_think_eos_id": codec["think_eos"], "codec_pad_id": codec["pad"],
        "codec_bos_id": codec["bos"], "speaker_id": QWEN3_SPEAKERS,
        # Not declared by the talker's config class, but its rope index reads it (the real
        # checkpoint's config.json carries it too).
        "spatial_merge_size": 2,
    }  # fmt: skip
    code2wav = {
        "codebook_size": QWEN3_CODEBOOK, "hidden_size": 32, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": 64, "num_hidden_layers": 2,
        "sliding_window": 8, "num_quantizers": QWEN3_CODE_GROUPS, "decoder_dim": 64,
        # The real upsampling (8*5*4*3 * 2*2 = 1920 samples per 80 ms frame at 24 kHz).
        "upsample_rates": [8, 5, 4, 3], "upsampling_ratios": [2, 2],
        # At the default 0.01 a random transformer barely touches the signal, and a test of
        # its streaming state could pass with the state wrong.
        "layer_scale_initial_scale": 0.5,
    }  # fmt: skip
    return Qwen3OmniMoeConfig(
        thinker_config=thinker, talker_config=talker, code2wav_config=code2wav,
        im_start_token_id=tokens["<|im_start|>"], im_end_token_id=tokens["<|im_end|>"],
        tts_pad_token_id=tokens["<|tts_pad|>"], tts_bos_token_id=tokens["<|tts_bos|>"],
        tts_eos_token_id=tokens["<|tts_eos|>"], system_token_id=tokens["system"],
        user_token_id=tokens["user"], assistant_token_id=tokens["assistant"],
    )  # fmt: skip


def qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen3-Omni's special tokens at ids 0, 1, 2, ..."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=QWEN3_VOCAB - len(QWEN3_ROLES),
        special_tokens=QWEN3_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = " ".join(WORDS) + " You are a helpful voice assistant."
    tokenizer.train_from_iterator([text] * 4, trainer)
    # The talker finds each turn's role by the one token after <|im_start|>.
    tokenizer.add_tokens([role for role in QWEN3_ROLES if role not in tokenizer.get_vocab()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN3_SPECIAL[1:],
    )


def _fill_uninitialised(model: Any) -> None:
    """Give random values to what ``__init__`` leaves empty or all alike.

    transformers 5.24 initialises the thinker's experts but not the talker's (``torch.empty``:
    whatever memory held, NaN at times) and zeroes the talker's routers (every token would go to
    the same experts); code2wav's ConvNeXt blocks start at ``gamma`` 1e-6, which leaves their
    causal convs, and a test of their streaming state, without effect.
    """
    with torch.no_grad():
        for layer in model.talker.model.layers:
            layer.mlp.experts.gate_up_proj.normal_(0.0, 0.02)
            layer.mlp.experts.down_proj.normal_(0.0, 0.02)
            layer.mlp.gate.weight.normal_(0.0, 0.5)
        for _, block in model.code2wav.upsample:
            block.gamma.fill_(0.5)


def _quieten_code2wav(model: Any) -> None:
    """Scale code2wav's last conv so random codes decode to peaks near ``PEAK``, not clipped."""
    codes = torch.randint(0, QWEN3_CODEBOOK, (1, QWEN3_CODE_GROUPS, 10))
    with torch.inference_mode():
        peak = float(model.code2wav(codes).abs().max())
    conv = model.code2wav.decoder[-1].conv
    with torch.no_grad():
        conv.weight.mul_(PEAK / max(peak, 1e-6))
        if conv.bias is not None:
            conv.bias.mul_(PEAK / max(peak, 1e-6))


def build_qwen3_omni(out_dir: Path) -> None:
    """Write ``out_dir/tiny-qwen3-omni``: model, tokenizer and preprocessors."""
    from transformers import (
        Qwen2VLImageProcessorPil,
        Qwen3OmniMoeForConditionalGeneration,
        WhisperFeatureExtractor,
    )

    torch.manual_seed(SEED)
    tokenizer = qwen3_tokenizer()
    vocab = tokenizer.get_vocab()
    config = qwen3_omni_config(vocab)
    model: Any = Qwen3OmniMoeForConditionalGeneration(config).eval()  # type: ignore[no-untyped-call]
    _fill_uninitialised(model)
    _quieten_code2wav(model)
    # The random thinker never ends a reply by itself: cap it (the model worker reads these, as
    # generate()'s thinker_/talker_max_new_tokens) at 8 text tokens and 5 s of speech. Its
    # talker does pick its end code, sampled sometimes at once (a reply without speech), so it
    # decodes greedily (talker_do_sample, read by the worker too): a server test's reply then
    # does not depend on its call's random id. Sampling is tested on the engine, seed by seed.
    model.generation_config.thinker_max_new_tokens = 8
    model.generation_config.talker_max_new_tokens = 60
    model.generation_config.talker_do_sample = False
    path = out_dir / "tiny-qwen3-omni"
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # One preprocessor_config.json serves the audio features and the image processor, as in
    # the real checkpoint (each saved alone would overwrite the other's file).
    preprocessor = {
        **WhisperFeatureExtractor(feature_size=128).to_dict(),
        **Qwen2VLImageProcessorPil(patch_size=16, merge_size=2).to_dict(),
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    print(f"wrote {path} ({type(model).__name__}, {_count(model):,} parameters)")

    loaded: Any = Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, local_files_only=True)
    theirs = loaded.state_dict()
    for key, tensor in model.state_dict().items():
        if not torch.equal(tensor, theirs[key]):
            raise RuntimeError(f"{key} did not survive save_pretrained/from_pretrained")
    print(f"loaded back; speakers: {sorted(loaded.config.talker_config.speaker_id)}")


def build(out_dir: Path) -> None:
    """Write ``tiny-moshi``, ``tiny-mimi``, ``tiny-qwen-omni`` and ``tiny-qwen3-omni`` under
    ``out_dir``, replacing any earlier copies."""
    torch.manual_seed(SEED)
    moshi = MoshiForConditionalGeneration(moshi_config(mimi_config())).eval()
    if any(p.dtype != torch.float32 for p in moshi.parameters()):
        raise RuntimeError("expected float32 weights; is torch's default dtype changed?")
    mimi = moshi.audio_encoder
    # Mimi initialises every codebook entry to zero, so all audio would encode to code 0 and
    # decode to the same frame; random entries give codes and audio that tests can tell apart.
    for codebook in _codebooks(mimi):
        codebook.embed_sum.normal_()
        codebook.cluster_usage.fill_(1.0)
        codebook._embed = None  # the cached embed (embed_sum / usage), now stale
    _quieten(mimi)

    for name, model in (("tiny-moshi", moshi), ("tiny-mimi", mimi)):
        path = out_dir / name
        # save_pretrained leaves files of an older layout behind; start clean so reruns match.
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(path)
        print(f"wrote {path} ({type(model).__name__}, {_count(model):,} parameters)")
    text_tokenizer().save_pretrained(out_dir / "tiny-moshi")

    # Fail here, not in a test far away, if a checkpoint does not load back on its own.
    loaded_moshi = MoshiForConditionalGeneration.from_pretrained(
        out_dir / "tiny-moshi", local_files_only=True
    )
    loaded_mimi = MimiModel.from_pretrained(out_dir / "tiny-mimi", local_files_only=True)
    for original, loaded in ((moshi, loaded_moshi), (mimi, loaded_mimi)):
        theirs = loaded.state_dict()
        for key, tensor in original.state_dict().items():
            if not torch.equal(tensor, theirs[key]):
                raise RuntimeError(f"{key} did not survive save_pretrained/from_pretrained")
    frame = mimi.config.frame_size
    print(f"loaded back; Mimi frame: {frame} samples at {mimi.config.sampling_rate} Hz")
    build_qwen_omni(out_dir)
    build_qwen3_omni(out_dir)


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "models")
