"""s2s: a realtime speech-to-speech gateway (WebRTC in, speech model, WebRTC out)."""

__version__ = "0.1.0"
