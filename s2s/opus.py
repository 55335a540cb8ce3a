"""libopus, called directly: the encoder and decoder controls a voice gateway needs.

PyAV's codec wrapper exposes neither in-band FEC decoding nor packet-loss concealment, and sets
encoder options once at open; a call's FEC strength should follow the loss its peer reports. So
s2s loads the libopus that PyAV already ships (or the system's) through ctypes. One call costs
about a microsecond of overhead on top of libopus's own work.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os

import av
import numpy as np

RATE = 48_000
#: Samples in one 20 ms frame at 48 kHz, the only frame size s2s sends or expects.
FRAME = 960
# Largest Opus packet RFC 6716 allows for one frame; a decoder needs no more for 20 ms.
_MAX_PACKET = 1275
# Longest frame a single Opus packet may carry (120 ms at 48 kHz), for decoding foreign packets.
_MAX_FRAME = 5760

_APPLICATION_VOIP = 2048
_SET_BITRATE = 4002
_SET_VBR = 4006
_SET_INBAND_FEC = 4012
_SET_PACKET_LOSS_PERC = 4014
_SET_DTX = 4016
_SET_SIGNAL = 4024
_SIGNAL_VOICE = 3001
_RESET_STATE = 4028


class OpusError(RuntimeError):
    """libopus refused a call; the message is libopus's own."""


def _load() -> ctypes.CDLL:
    here = os.path.dirname(av.__file__)
    bundled = sorted(glob.glob(os.path.join(here, os.pardir, "av.libs", "libopus*.so*")))
    candidates = [*bundled, ctypes.util.find_library("opus") or ""]
    for path in filter(None, candidates):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    raise OpusError("libopus not found (neither PyAV's bundled copy nor a system libopus)")


_lib = _load()
_lib.opus_strerror.restype = ctypes.c_char_p
_lib.opus_encoder_create.restype = ctypes.c_void_p
_lib.opus_encoder_create.argtypes = [
    ctypes.c_int32, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)
]  # fmt: skip
_lib.opus_encode.restype = ctypes.c_int32
_lib.opus_encode.argtypes = [
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int32
]  # fmt: skip
_lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
_lib.opus_decoder_create.restype = ctypes.c_void_p
_lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
_lib.opus_decode.restype = ctypes.c_int
_lib.opus_decode.argtypes = [
    ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int, ctypes.c_int
]  # fmt: skip
_lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
_lib.opus_packet_get_nb_samples.restype = ctypes.c_int
_lib.opus_packet_get_nb_samples.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32]
# opus_*_ctl are variadic: every request s2s makes takes one int (or none), passed as c_int.
# Their fixed arguments are declared so that ctypes passes the rest as variadic ones: on Apple
# arm64 those go on the stack, and undeclared ones would be read as garbage there.
_lib.opus_encoder_ctl.restype = ctypes.c_int
_lib.opus_encoder_ctl.argtypes = [ctypes.c_void_p, ctypes.c_int]


def _check(code: int) -> int:
    if code < 0:
        raise OpusError(_lib.opus_strerror(code).decode())
    return code


class Encoder:
    """Mono 48 kHz Opus for speech: one packet per 20 ms frame, in-band FEC, no DTX."""

    def __init__(self, bitrate: int = 32_000, *, fec: bool = True, loss_percent: int = 10) -> None:
        error = ctypes.c_int()
        self._state = _lib.opus_encoder_create(RATE, 1, _APPLICATION_VOIP, ctypes.byref(error))
        _check(error.value)
        self._out = ctypes.create_string_buffer(_MAX_PACKET)
        self._ctl(_SET_BITRATE, bitrate)
        self._ctl(_SET_SIGNAL, _SIGNAL_VOICE)
        self._ctl(_SET_VBR, 1)
        # A silent model still sends frames: the far end's VAD and jitter buffer want them.
        self._ctl(_SET_DTX, 0)
        self._ctl(_SET_INBAND_FEC, int(fec))
        self.loss_percent = -1
        self.set_expected_loss(loss_percent)

    def _ctl(self, request: int, value: int) -> None:
        _check(_lib.opus_encoder_ctl(ctypes.c_void_p(self._state), request, ctypes.c_int(value)))

    def set_expected_loss(self, percent: int) -> None:
        """Tell libopus how much loss to protect against: FEC spends bits in proportion to it."""
        percent = max(0, min(100, int(percent)))
        if percent != self.loss_percent:
            self._ctl(_SET_PACKET_LOSS_PERC, percent)
            self.loss_percent = percent

    def encode(self, pcm: np.ndarray) -> bytes:
        """Encode exactly ``FRAME`` mono ``int16`` samples."""
        if pcm.size != FRAME or pcm.dtype != np.int16:
            raise ValueError(f"expected {FRAME} int16 samples, got {pcm.size} {pcm.dtype}")
        pcm = np.ascontiguousarray(pcm)
        size = _check(_lib.opus_encode(self._state, pcm.ctypes.data, FRAME, self._out, _MAX_PACKET))
        return self._out.raw[:size]

    def reset(self) -> None:
        """Forget the signal history (as a fresh encoder), keeping every setting."""
        _check(_lib.opus_encoder_ctl(ctypes.c_void_p(self._state), _RESET_STATE))

    def __del__(self) -> None:
        if getattr(self, "_state", None):
            _lib.opus_encoder_destroy(self._state)
            self._state = None


class Decoder:
    """Mono 48 kHz Opus decoding with the two recoveries a lossy network needs.

    ``decode`` plays a packet; ``recover`` rebuilds the frame *before* a packet from the in-band
    FEC data that packet carries (or conceals it when there is none); ``conceal`` makes up one
    frame from the decoder's history (PLC). Every call returns ``FRAME`` samples for a 20 ms
    stream, so the caller's timeline never skips.
    """

    def __init__(self) -> None:
        error = ctypes.c_int()
        self._state = _lib.opus_decoder_create(RATE, 1, ctypes.byref(error))
        _check(error.value)
        self._pcm = np.zeros(_MAX_FRAME, np.int16)

    def decode(self, packet: bytes) -> np.ndarray:
        return self._run(packet, _frames_in(packet), fec=False)

    def recover(self, next_packet: bytes, samples: int = FRAME) -> np.ndarray:
        return self._run(next_packet, samples, fec=True)

    def conceal(self, samples: int = FRAME) -> np.ndarray:
        return self._run(None, samples, fec=False)

    def _run(self, packet: bytes | None, samples: int, *, fec: bool) -> np.ndarray:
        size = len(packet) if packet is not None else 0
        count = _lib.opus_decode(
            self._state, packet, size, self._pcm.ctypes.data, min(samples, _MAX_FRAME), int(fec)
        )
        return self._pcm[: _check(count)].copy()

    def __del__(self) -> None:
        if getattr(self, "_state", None):
            _lib.opus_decoder_destroy(self._state)
            self._state = None


def _frames_in(packet: bytes) -> int:
    count = _lib.opus_packet_get_nb_samples(packet, len(packet), RATE)
    return count if count > 0 else FRAME
