"""Who owns each of ``OmniEngine``'s slots: no one, a call (from ``begin`` to its end), or a
finished conversation whose caches the slot keeps for its next turn (``s2s.omni.kept``).

Kept apart from the engine's model work because it is only bookkeeping, and the rules are easy
to get wrong: a conversation's next request takes its own slot back; a new call takes an unused
slot, else the longest-kept one (a kept cache never keeps a call out); a conversation keeps at
most one slot.
"""

from __future__ import annotations

from collections import OrderedDict

from s2s.omni.kept import Kept
from s2s.omni.prefilling import Prefilling
from s2s.omni.rows import Row
from s2s.omni.slots import SlotCache


class SlotOwners:
    """The slots but ``scratch``: which are unused, and which are kept for which conversation
    (a slot in neither is a call's)."""

    def __init__(self, slots: int, scratch: int, thinker_cache: SlotCache) -> None:
        self.unused = [slot for slot in range(slots) if slot != scratch]
        #: Finished conversations' slots, least recently finished first (``Request.conversation``).
        self.kept: OrderedDict[str, Kept] = OrderedDict()
        self._thinker_cache = thinker_cache

    @property
    def free(self) -> list[int]:
        """The slots a new call may take: unused ones, and kept ones (the oldest is given up)."""
        return self.unused + [kept.slot for kept in self.kept.values()]

    def take(self, conversation: str | None) -> tuple[int, Kept | None]:
        """A slot for a new call of ``conversation`` (there must be a free one), and what it
        holds of that conversation's last turn, if it is that conversation's kept slot."""
        kept = self.kept.pop(conversation, None) if conversation else None
        if kept is not None:
            return kept.slot, kept
        if self.unused:
            return self.unused.pop(), None
        return self.kept.popitem(last=False)[1].slot, None  # the longest unused conversation's

    def release(self, slot: int) -> None:
        """``slot`` is unused again; nothing of what it holds is kept."""
        self.unused.append(slot)

    def forget(self, conversation: str) -> None:
        """Give up ``conversation``'s kept slot, if it has one."""
        kept = self.kept.pop(conversation, None)
        if kept is not None:
            self.unused.append(kept.slot)

    def finish(self, row: Row) -> None:
        """``row`` has ended: its caches stay in its slot for its conversation's next turn if it
        keeps a prompt for one (``Row.prompt``), else the slot is unused again."""
        if row.prompt is None:
            self.unused.append(row.slot)
            return
        assert row.request.conversation is not None
        held = self._thinker_cache.host_lengths[row.slot]
        kept = Kept.of(row.slot, row.prompt, row.made, held, row.talker_prompt)
        self._hold(row.request.conversation, kept)

    def finish_prefill(self, state: Prefilling) -> None:
        """A call cancelled while prefilling: its slot keeps what it holds for its conversation,
        the conversation's kept cache as it was, if the new prompt has not touched it yet, else
        the new prompt's positions prefilled so far (a caller who barges in just after a turn
        would otherwise have the whole conversation prefilled again); without a conversation, or
        with nothing prefilled, the slot is unused again."""
        conversation, kept = state.request.conversation, state.kept
        if conversation is not None and state.thinker is not None:
            held = self._thinker_cache.host_lengths[state.slot]
            kept = Kept.of(state.slot, state.thinker, [], held, None) if held else None
        if conversation is None or kept is None:
            self.unused.append(state.slot)
        else:
            self._hold(conversation, kept)

    def _hold(self, conversation: str, kept: Kept) -> None:
        # What an older reply of the conversation left (one that began while it was ending) is
        # replaced; a reply of it still under way is not touched.
        older = self.kept.pop(conversation, None)
        if older is not None:
            self.unused.append(older.slot)
        self.kept[conversation] = kept
