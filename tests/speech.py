"""Real speech for tests: sentences spoken by the espeak-ng that espeakng-loader ships."""

from __future__ import annotations

import re

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


_listener = None


def transcribe(pcm48: np.ndarray) -> str:
    """What pocketsphinx's generic en-us model hears in mono 48 kHz audio.

    One recognizer serves the whole test run, warmed up on a few sentences first: pocketsphinx
    normalises its features by a running mean that starts far from espeak-ng's voice, and a
    fresh recognizer gets most words of its first utterances wrong.
    """
    from s2s.speech.asr import Recognizer, dither

    global _listener
    if _listener is None:
        _listener = Recognizer()
        for warmup in ("hello there how are you", "I can repeat what you say", "my name is echo"):
            _recognize(_listener, speak(warmup, voice="en-us+f2"), dither)
    return _recognize(_listener, pcm48, dither)


def _recognize(recognizer: object, pcm48: np.ndarray, dither: object) -> str:
    pcm = Resampler(16_000).from_pcm(pcm48, RATE)
    recognizer.start()  # type: ignore[attr-defined]
    recognizer.feed(dither(pcm, np.random.default_rng(0)))  # type: ignore[attr-defined,operator]
    return recognizer.finish()  # type: ignore[attr-defined,no-any-return]


def transcribe_with_grammar(pcm48: np.ndarray, text: str) -> str:
    """What pocketsphinx hears when it can only hear ``text``'s words, in order, each optional.

    A grammar of the phrase the policy said: recognition becomes near exact when the audio is
    intelligible, while garbled or missing audio loses words (every word may be skipped).
    """
    from pocketsphinx import Decoder

    from s2s.speech.asr import dither

    decoder = Decoder(samprate=16_000, loglevel="FATAL")
    words = [w for w in _words(text) if decoder.lookup_word(w)]
    grammar = "#JSGF V1.0;\ngrammar reply;\npublic <reply> = "
    grammar += " ".join(f"[{w}]" for w in words) + ";\n"
    decoder.add_jsgf_string("reply", grammar)
    decoder.activate_search("reply")
    pcm = dither(Resampler(16_000).from_pcm(pcm48, RATE), np.random.default_rng(0))
    decoder.start_utt()
    decoder.process_raw(pcm.tobytes(), False, True)
    decoder.end_utt()
    hypothesis = decoder.hyp()
    return hypothesis.hypstr if hypothesis is not None else ""


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance over the reference's length (punctuation ignored)."""
    ref = _words(reference)
    hyp = _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(1, len(ref))


def _words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() or c == "'" else " " for c in text).split()


def local_reply_fits(heard: str, reply: str) -> bool:
    """Whether the ``local`` model's ``reply`` answers ``heard``: a greeting is greeted back,
    anything else is said back."""
    if re.match(r"\s*(hello|hi|hey)\b", heard, re.I):
        return reply.startswith("Hello!")
    return bool(heard.strip()) and heard.strip() in reply
