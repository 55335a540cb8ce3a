"""Text to speech with libespeak-ng from the ``espeakng-loader`` wheel, through ctypes.

libespeak-ng is a process-wide singleton and not thread-safe, so every call goes through one
``Espeak`` object whose methods must run on a single thread (the local backend's TTS executor).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import espeakng_loader
import numpy as np

_SYNCHRONOUS = 2  # AUDIO_OUTPUT_SYNCHRONOUS: samples come back through the callback
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_EVENT_END_OF_LIST = 0
_EVENT_WORD = 1
_RATE, _PITCH = 1, 3  # espeak_PARAMETER
_DEFAULT_WPM = 175


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


@dataclass(frozen=True, slots=True)
class Word:
    """A word of the input text: where it starts in the text, and where its sound starts."""

    text: str
    start: int
    sample: int


@dataclass(frozen=True, slots=True)
class Speech:
    pcm: np.ndarray  # mono int16 at ``Espeak.rate``
    words: list[Word]


class Espeak:
    """The one libespeak-ng instance of this process."""

    _instance: Espeak | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._lib = espeakng_loader.load_library()
        data = espeakng_loader.get_data_path().encode()
        self.rate = int(self._lib.espeak_Initialize(_SYNCHRONOUS, 0, data, 0))
        if self.rate <= 0:
            raise RuntimeError("libespeak-ng failed to initialise")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int]] = []
        self._callback = _CALLBACK(self._on_synth)  # kept referenced for the library's sake
        self._lib.espeak_SetSynthCallback(self._callback)
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]

    @classmethod
    def shared(cls) -> Espeak:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def synthesize(
        self, text: str, *, voice: str = "en-us", speed: float = 1.0, pitch: int = 50
    ) -> Speech:
        """Speak ``text``; ``speed`` scales espeak's 175 words a minute."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            self._lib.espeak_SetVoiceByName(b"en-us")
        self._lib.espeak_SetParameter(_RATE, int(np.clip(_DEFAULT_WPM * speed, 80, 450)), 0)
        self._lib.espeak_SetParameter(_PITCH, int(np.clip(pitch, 0, 100)), 0)
        self._chunks, self._events = [], []
        data = text.encode()
        self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        self._lib.espeak_Synchronize()
        pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return Speech(pcm=pcm, words=self._words(text, pcm.size))

    def _words(self, text: str, total: int) -> list[Word]:
        # espeak reports character positions (1-based) and the audio position in ms.
        words = []
        for position, length, ms in self._events:
            word = text[position - 1 : position - 1 + length]
            if word.strip():
                words.append(Word(word, position - 1, min(total, ms * self.rate // 1000)))
        return words

    def _on_synth(
        self, wav: ctypes._Pointer[ctypes.c_short], count: int, events: ctypes._Pointer[_Event]
    ) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        i = 0
        while events[i].type != _EVENT_END_OF_LIST:
            event = events[i]
            if event.type == _EVENT_WORD:
                self._events.append((event.text_position, event.length, event.audio_position))
            i += 1
        return 0
