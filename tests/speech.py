"""Real speech for tests: sentences spoken by the espeak-ng that espeakng-loader ships."""

from __future__ import annotations

import numpy as np

from s2s.audio import Resampler
from s2s.speech.espeak import Espeak

RATE = 48_000


def speak(text: str, *, voice: str = "en-us", speed: float = 1.0) -> np.ndarray:
    """``text`` as mono 48 kHz ``int16``, with 0.3 s of quiet before and after."""
    espeak = Espeak.shared()
    speech = espeak.synthesize(text, voice=voice, speed=speed)
    pcm = Resampler(RATE).from_pcm(speech.pcm, espeak.rate)
    pad = np.zeros(int(0.3 * RATE), np.int16)
    return np.concatenate([pad, pcm, pad])


def transcribe(pcm48: np.ndarray) -> str:
    """What pocketsphinx's generic en-us model hears in mono 48 kHz audio."""
    from s2s.speech.asr import Recognizer, dither

    pcm = Resampler(16_000).from_pcm(pcm48, RATE)
    recognizer = Recognizer()
    recognizer.start()
    recognizer.feed(dither(pcm, np.random.default_rng(0)))
    return recognizer.finish()
