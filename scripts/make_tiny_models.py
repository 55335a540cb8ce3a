#!/usr/bin/env python
"""Write tiny random Moshi and Mimi checkpoints for tests and local runs.

    .venv/bin/python scripts/make_tiny_models.py [OUT_DIR]   # default: models/

writes ``OUT_DIR/tiny-moshi`` (``MoshiForConditionalGeneration``) and ``OUT_DIR/tiny-mimi`` (its
``audio_encoder``, a ``MimiModel``), overwriting what is there. The weights are random but
seeded, so two runs write the same tensors. The shapes keep what the server relies on: 24 kHz
audio, Mimi's ``[8, 6, 5, 4]`` upsampling so one codec frame is 1920 samples (80 ms, 12.5 Hz),
and 8 codebooks; everything else is shrunk to about 1M parameters so tests run on a laptop CPU.

``scripts/`` is not a package, so tests run this file with ``sys.executable`` rather than import
it; ``build(out_dir)`` is the same thing for a caller that loads the file as a module.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

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
    words = [
        "hello", "there", "how", "are", "you", "today", "the", "weather", "is", "nice", "I",
        "can", "hear", "say", "what", "am", "looking", "at", "yes", "no", "maybe", "good",
        "morning", "evening", "thanks", "sure", "okay", "right", "well", "so", "and", "but",
        "or", "we", "they", "it", "this", "that", "here", "now", "later", "again", "please",
        "stop", "go", "wait", "listen", "talk", "speak", "sound", "voice", "music", "light",
        "dark", "red", "blue", "green", "one", "two", "three", "four",
    ]  # fmt: skip
    special = ["<pad>", "<unk>", "<s>"]
    vocab = {token: i for i, token in enumerate(special + words[: TEXT_VOCAB - len(special)])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>"
    )


def build(out_dir: Path) -> None:
    """Write ``out_dir/tiny-moshi`` and ``out_dir/tiny-mimi``, replacing any earlier copies."""
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


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "models")
