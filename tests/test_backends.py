"""The contract every model backend meets, run against each one."""

from __future__ import annotations

import numpy as np
import pytest

from s2s.backends import UnknownModelError, load_backend
from tests.signals import tone

BACKENDS = ["echo"]


@pytest.mark.parametrize("spec", BACKENDS)
async def test_stream_contract(spec: str) -> None:
    backend = await load_backend(spec)
    assert backend.input_rate in (16_000, 24_000, 48_000)
    assert backend.frame_samples > 0
    streams = [await backend.open_stream(f"call{i}") for i in range(2)]
    try:
        source = tone(440, 0.5, rate=backend.input_rate)
        produced = []
        for start in range(0, source.size - backend.frame_samples + 1, backend.frame_samples):
            frame = source[start : start + backend.frame_samples]
            result = await streams[0].step(frame)
            assert result.audio.dtype == np.int16 and result.audio.ndim == 1
            assert isinstance(result.text, str)
            produced.append(result.audio)
            # Another call's stream is independent of this one.
            other = await streams[1].step(np.zeros(backend.frame_samples, np.int16))
            assert other.audio.dtype == np.int16
        assert sum(a.size for a in produced) > 0
        await streams[0].reset()
        after = await streams[0].step(np.zeros(backend.frame_samples, np.int16))
        assert after.audio.dtype == np.int16
    finally:
        for stream in streams:
            await stream.close()
        await backend.close()


async def test_unknown_model_is_refused_by_name() -> None:
    with pytest.raises(UnknownModelError, match="nope"):
        await load_backend("nope:somewhere")
