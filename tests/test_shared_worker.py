"""One model worker shared by several edges (``s2s.worker.shared``): what the cluster's worker
actor does with the ticks of edges, here with a real worker and no cluster."""

from __future__ import annotations

from pathlib import Path

from s2s.worker.messages import Change, Respond, Tick, Turn
from s2s.worker.shared import Liveness, Outbox, merged


def test_calls_no_edge_ticks_leave_with_the_next_tick_not_in_a_tick_of_their_own() -> None:
    """An evicted call's leave goes in front of the next tick's changes: a tick of its own
    would step every answering call of a turn-based worker, its outputs sent to no edge."""
    liveness = Liveness(evict_after_s=5.0)
    first = liveness.take(Tick([Change("join", "a"), Change("join", "b")]), now=0.0)
    assert [c.kind for c in first.changes] == ["join", "join"]
    liveness.take(Tick(frames={"b": b""}), now=4.0)
    assert liveness.evict(now=6.0) == ["a"]
    assert liveness.evict(now=6.5) == []  # once
    assert liveness.leaving == ["a"]
    tick = liveness.take(Tick([Change("reset", "b")], {"b": b""}), now=7.0)
    assert [(c.kind, c.call) for c in tick.changes] == [("leave", "a"), ("reset", "b")]
    assert tick.frames == {"b": b""} and liveness.leaving == []
    assert liveness.take(Tick(frames={"b": b""}), now=8.0).changes == []
    assert liveness.evict(now=12.0) == []  # "b" is ticked: it stays


def test_a_calls_output_made_in_a_step_its_edge_did_not_tick_reaches_it_whole(
    tiny_models: Path,
) -> None:
    """A Qwen3-Omni worker steps every answering call on each tick; when one edge's ticks come
    while the other's is away, the other's call's text, audio and end wait for its next tick.
    What the call gets is then exactly what it gets when every step names it."""
    from s2s.worker.omni import OmniWorker

    path = str(tiny_models / "tiny-qwen3-omni")
    ask = [Turn("user", "hello there", item="u1")]
    starts = [
        Tick([Change("join", c), Change("respond", c, respond=Respond(f"r{c}", ask))], {c: b""})
        for c in "ab"
    ]

    def reply(lonely: bool) -> tuple[str, bytes, str]:
        """Call "a"'s reply, its edge's ticks missing from four steps of every five (lonely),
        or in every step."""
        worker, outbox = OmniWorker.load(path, "cpu", max_calls=2), Outbox()
        text, audio, done, step = "", b"", "", 0
        ticks = starts
        while not done:
            step += 1
            assert step < 300
            results = outbox.split(ticks, worker.handle(merged(ticks)))
            for tick, result in zip(ticks, results, strict=True):
                if (output := result.outputs.get("a")) is not None:
                    assert "a" in tick.frames
                    text, audio, done = text + output.text, audio + output.audio, output.done
            ticks = [Tick(frames={"b": b""})]
            if not lonely or step % 5 == 0:
                ticks.append(Tick(frames={"a": b""}))
        return text, audio, done

    together, apart = reply(lonely=False), reply(lonely=True)
    assert together[2] in ("stop", "length") and len(together[1]) > 0
    assert apart == together
