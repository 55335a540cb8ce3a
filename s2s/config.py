"""The server's settings: one frozen object, built by the CLI (or a test), read everywhere else."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    model: str = "local"
    #: Device for model compute ("cpu", "cuda", "cuda:1"); None picks CUDA when available.
    device: str | None = None
    max_sessions: int = 32
    #: Seconds a call may go without inbound audio (no track, or RTP stopped) before it ends.
    peer_timeout_s: float = 15.0
    #: Seconds suggested to a client turned away because the server is full.
    retry_after_s: int = 5
    #: Audio frames aiortc's receive jitter buffer holds before it releases one (aiortc's own is 4).
    jitter_prefetch: int = 0
    #: Largest data-channel message accepted, in bytes (Chromium and aiortc cap it at 256 KiB).
    max_event_bytes: int = 262_144
    #: Largest SDP offer accepted, in bytes.
    max_sdp_bytes: int = 65_536
    log_level: str = "INFO"
    web_dir: Path = WEB_DIR
