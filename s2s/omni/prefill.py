"""A call's prompts for the streaming engine, prepared once and then run in pieces.

A prefill run whole delays every other call's next frame by all of it, so ``OmniEngine`` runs a
prompt in pieces of at most N tokens between steps (``OmniEngine.prefill``), each piece attending
to the earlier ones through the call's slot cache (``SlotCache.extend``). What a piece boundary
could cut is computed once here for the whole prompt, and the pieces take slices of it:

- the audio and vision encoders run once; their outputs replace the placeholder tokens'
  embeddings, as the thinker's own forward does;
- multimodal RoPE positions come from ``get_rope_index`` over the whole prompt (an image's
  positions depend on its grid, and every later position on the offset it leaves);
- the vision tower's deepstack features, added at picture positions after the first decoder
  layers, are cut to each piece's picture positions.

The talker's prompt is made of the thinker's embeddings, its hidden states at the talker's
``accept_hidden_layer`` over the whole prompt, and the first text token, so it is built when the
thinker's prefill is complete (``talker_prompt``) and then run in pieces the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from s2s.omni.media import MediaPlan
from s2s.omni.slots import Visual


@dataclass(slots=True)
class Pieces:
    """A prompt's input embeddings ``(1, length, hidden)`` and multimodal RoPE positions
    ``(3, 1, length)``, of which the first ``done`` have been prefilled."""

    embeds: Tensor
    positions: Tensor
    delta: int  # where text positions continue after the prompt, less its length
    done: int = 0

    @property
    def length(self) -> int:
        return int(self.embeds.shape[1])

    @property
    def complete(self) -> bool:
        return self.done >= self.length

    def take(self, tokens: int) -> tuple[int, int]:
        """The next piece, ``tokens`` positions at most, as ``(start, end)``; marks it done."""
        start = self.done
        self.done = min(self.length, start + tokens)
        return start, self.done


@dataclass(slots=True, kw_only=True)
class ThinkerPrompt(Pieces):
    """The thinker's prompt with its encoders' outputs in place, and what the talker needs."""

    ids: Tensor  # (1, length)
    hidden: Tensor  # hidden_states[keep], filled piece by piece
    audio_lengths: Tensor | None
    grid: Tensor | None
    pictures: Tensor | None = None  # (length,) picture positions
    before: list[int] = field(default_factory=list)  # picture positions before each position
    deepstack: list[Tensor] = field(default_factory=list)

    def visual(self, start: int, end: int) -> Visual | None:
        """The deepstack features of the positions ``start:end``, if any is a picture's."""
        if self.pictures is None or self.before[start] == self.before[end]:
            return None
        lo, hi = self.before[start], self.before[end]
        return Visual(self.pictures[start:end], [f[lo:hi] for f in self.deepstack])


def encode(
    thinker: Any, inputs: dict[str, Tensor], keep: int, media: MediaPlan | None = None
) -> ThinkerPrompt:
    """Run the audio and vision encoders of ``thinker`` once over a batch-of-one prompt and
    prepare it for a prefill in pieces that keeps ``hidden_states[keep]`` (see
    ``SlotCache.extend``). With the prompt's ``media`` plan, the clips and pictures its
    conversation's earlier prompts held are not encoded again."""
    if "pixel_values_videos" in inputs:
        raise ValueError("video input is not supported")
    model, config = thinker.model, thinker.config
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    feature_mask = inputs.get("feature_attention_mask")
    audio_lengths = None if feature_mask is None else feature_mask.sum(-1)
    if feature_mask is not None:
        if media is None:
            features = inputs["input_features"]
            heard = model.get_audio_features(features, feature_mask, return_dict=True)
            audio = heard.last_hidden_state
        else:
            audio = media.audio_embeds(model)
        places = (ids == config.audio_token_id)[..., None]
        embeds = embeds.masked_scatter(places, audio.to(embeds.dtype))
    grid = inputs.get("image_grid_thw")
    pictures, before, deepstack = None, [], []
    if grid is not None:
        if media is None:
            image = model.get_image_features(inputs["pixel_values"], grid, return_dict=True)
            image_embeds = torch.cat(image.pooler_output)
            deepstack = [torch.cat(feature) for feature in image.deepstack_features]
        else:
            image_embeds, deepstack = media.image_embeds(model)
        pictures = ids[0] == config.image_token_id
        before = [0, *torch.cumsum(pictures, 0).tolist()]
        if before[-1] != image_embeds.shape[0]:
            raise ValueError(
                f"{before[-1]} image tokens for {image_embeds.shape[0]} image features"
            )
        embeds = embeds.masked_scatter(pictures[None, :, None], image_embeds.to(embeds.dtype))
    positions, deltas = model.get_rope_index(
        ids, grid, None, torch.ones_like(ids), False, audio_lengths, None
    )
    return ThinkerPrompt(
        embeds, positions, int(deltas[0, 0]), ids=ids, hidden=torch.empty_like(embeds),
        audio_lengths=audio_lengths, grid=grid, pictures=pictures, before=before,
        deepstack=deepstack,
    )  # fmt: skip


def talker_prompt(model: Any, prompt: ThinkerPrompt, token: int, speaker: int,
                  tts: tuple[Tensor, Tensor, Tensor]) -> Pieces:  # fmt: skip
    """The talker's prompt, as ``generate()`` builds it for a batch of one, from the thinker's
    complete ``prompt`` and first text ``token``; ``tts`` are the projected pad, begin and end
    markers. transformers' own helpers build the parts, so the two cannot drift."""
    config, thinker, talker = model.config, model.thinker, model.talker
    ids = prompt.ids
    first = thinker.get_input_embeddings()(torch.tensor([[token]], device=ids.device))
    embeds = torch.cat([prompt.embeds, first], dim=1)
    media_ids = config.thinker_config
    media = (ids == media_ids.audio_token_id) | (ids == media_ids.image_token_id)
    media = media | (ids == media_ids.video_token_id)
    length = ids.shape[1]
    user = user_mask(config, ids[0])
    user_embeds = model._get_talker_user_parts(0, length, media, prompt.hidden, prompt.embeds)
    start = length - 3  # <|im_start|>assistant\n, which OmniEngine.begin checks
    pad, bos, eos = tts
    assistant, assistant_ids, _ = model._get_talker_assistant_parts(
        start, length + 1, speaker, embeds, pad, bos, eos
    )
    talker_embeds = torch.cat([user_embeds[:, user], assistant], dim=1)
    talker_ids = torch.cat([ids[:, user], assistant_ids], dim=1)
    grid = prompt.grid
    if prompt.audio_lengths is not None or (grid is not None and grid.numel() > 0):
        positions, deltas = talker.get_rope_index(
            talker_ids, grid, None, torch.ones_like(talker_ids), False, prompt.audio_lengths, None
        )
        return Pieces(talker_embeds, positions, int(deltas[0, 0]))
    steps = torch.arange(talker_embeds.shape[1], device=ids.device)
    return Pieces(talker_embeds, steps[None, None].expand(3, 1, -1), 0)


def user_mask(config: Any, ids: Tensor) -> Tensor:
    """Positions in user turns (from their ``<|im_start|>`` to the next one)."""
    positions = torch.arange(ids.shape[0], device=ids.device)
    starts = torch.where(ids == config.im_start_token_id, positions, -1)
    role = ids[(torch.cummax(starts, 0).values.clamp_min(0) + 1).clamp_max(ids.shape[0] - 1)]
    user: Tensor = role == config.user_token_id
    return user
