"""A finished reply's caches, kept in its slot for the conversation's next turn.

The next turn's prompt usually starts with everything the last one held: the same system
message, earlier turns and media, then the reply just spoken. ``OmniEngine`` leaves a reply's
slot untouched when it ends (``Request.conversation``) and records here what each position of
its thinker and talker caches was; the next turn's prefill then starts where its prompt stops
matching (``reuse_thinker``, ``reuse_talker``). A position matches when its token (thinker),
RoPE position and input embedding are all the same, so media that changed, a turn deleted or a
reply truncated only shorten the match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from s2s.omni.prefill import Pieces, ThinkerPrompt


@dataclass(frozen=True, slots=True)
class Kept:
    """What the slot's caches hold: of the thinker's, each position's token (``ids``: the
    prompt, then the reply tokens fed back) and, of the prompt's positions, their RoPE
    positions, input embeddings and the hidden states the talker reads (reply positions are
    text at ``index + delta`` on every axis); of the talker's, its prompt."""

    slot: int
    ids: list[int]
    positions: Tensor  # (3, prompt length)
    delta: int
    embeds: Tensor  # (1, prompt length, hidden)
    hidden: Tensor  # (1, prompt length, hidden)
    talker: Pieces | None

    @staticmethod
    def of(slot: int, prompt: ThinkerPrompt, made: list[int], held: int,
           talker: Pieces | None) -> Kept:  # fmt: skip
        """The record of a reply to ``prompt`` that made the text tokens ``made``, whose thinker
        cache holds ``held`` positions (the last token made is never fed back)."""
        ids = (prompt.ids[0].tolist() + made)[:held]
        return Kept(slot, ids, prompt.positions[:, 0], prompt.delta, prompt.embeds,
                    prompt.hidden, talker)  # fmt: skip


def reuse_thinker(prompt: ThinkerPrompt, kept: Kept) -> int:
    """How many of the thinker ``prompt``'s first positions the slot's cache holds already
    (never the last, whose logits pick the first token); marks them done and copies their hidden
    states."""
    ids = prompt.ids[0].tolist()
    count = 0
    for new, old in zip(ids[: len(ids) - 1], kept.ids, strict=False):
        if new != old:
            break
        count += 1
    if count == 0:
        return 0
    known = kept.positions.shape[1]
    # Past the prompt, the reply fed back (none when a prefill was cancelled part way).
    reply = torch.arange(known, max(known, len(kept.ids)), device=kept.positions.device)
    reply += kept.delta
    old_positions = torch.cat([kept.positions, reply.expand(3, -1)], dim=1)[:, :count]
    same = (prompt.positions[:, 0, :count] == old_positions).all(0)
    shared = min(count, known)
    same[:shared] &= (prompt.embeds[0, :shared] == kept.embeds[0, :shared]).all(-1)
    count = _leading(same)
    shared = min(count, known)
    prompt.hidden[:, :shared] = kept.hidden[:, :shared]
    prompt.hidden[:, shared:count] = 0  # reply text: the talker reads no hidden state there
    prompt.done = count
    return count


def reuse_talker(prompt: Pieces, kept: Kept) -> int:
    """How many of the talker ``prompt``'s first positions the slot's talker cache holds already
    (never the last, whose hidden state picks the first code): the earlier user turns, when
    they are unchanged. Marks them done."""
    old = kept.talker
    if old is None:
        return 0
    count = min(prompt.length - 1, old.length)
    same = (prompt.embeds[0, :count] == old.embeds[0, :count]).all(-1)
    same &= (prompt.positions[:, 0, :count] == old.positions[:, 0, :count]).all(0)
    prompt.done = _leading(same)
    return prompt.done


def _leading(same: Tensor) -> int:
    """How many of ``same``'s first entries are all true (one read back)."""
    differs = (~same).nonzero()
    return int(differs[0, 0]) if differs.numel() else int(same.numel())
