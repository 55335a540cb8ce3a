"""Test signals and the measurements made on what comes back."""

from __future__ import annotations

import numpy as np

RATE = 48_000


def tone(freq: float, seconds: float, *, amplitude: float = 0.3, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def silence(seconds: float, *, rate: int = RATE) -> np.ndarray:
    return np.zeros(int(seconds * rate), np.int16)


def dominant_frequency(pcm: np.ndarray, *, rate: int = RATE) -> float:
    x = pcm.astype(np.float64) * np.hanning(pcm.size)
    spectrum = np.abs(np.fft.rfft(x))
    return float(np.fft.rfftfreq(pcm.size, 1 / rate)[int(np.argmax(spectrum))])


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) / 32768 if pcm.size else 0.0


def loud_spans(
    pcm: np.ndarray, *, threshold: float = 0.02, window_ms: int = 5, rate: int = RATE
) -> list[tuple[int, int]]:
    """``(start, end)`` sample offsets of the stretches louder than ``threshold`` (RMS, 0..1)."""
    win = rate * window_ms // 1000
    n = pcm.size // win
    if n == 0:
        return []
    frames = pcm[: n * win].astype(np.float64).reshape(n, win) / 32768
    loud = np.sqrt(np.mean(frames**2, axis=1)) > threshold
    spans: list[tuple[int, int]] = []
    start = None
    for i, on in enumerate(loud):
        if on and start is None:
            start = i
        elif not on and start is not None:
            spans.append((start * win, i * win))
            start = None
    if start is not None:
        spans.append((start * win, n * win))
    return spans
