"""The server's settings: one frozen object, built by the CLI (or a test), read everywhere else."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
#: ``--cuda-graphs`` values.
CUDA_GRAPHS = ("auto", "on", "off")
#: The names of this machine's loopback interface: a server bound to one is its own.
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    model: str = "local"
    #: Device for model compute ("cpu", "cuda", "cuda:1"); None picks CUDA when available.
    device: str | None = None
    #: A Ray cluster (its head's HOST:PORT, or "auto") whose model workers serve this edge's
    #: calls; empty runs the model here, and nothing imports Ray.
    ray_address: str = ""
    #: Calls the whole server takes (over all its workers) before it answers 503.
    max_sessions: int = 32
    #: Turn-based models' prompt budget in tokens: the oldest turns are left out past it.
    prompt_tokens: int = 8192
    #: Turn-based models' prefill piece: at most this many prompt positions per tick, between
    #: the other calls' steps (0: the model worker's default, 512).
    prefill_tokens: int = 0
    #: CUDA graphs for the model worker's steps: "auto" (Moshi's on a GPU; Qwen3-Omni's not
    #: until they have been checked on one), "on" or "off". Graphs that fail to set up fall
    #: back to eager steps, with the reason in the log.
    cuda_graphs: str = "auto"
    #: Server processes, each pinned to a core; 0 is one per usable core. 1 serves in-process.
    workers: int = 0
    #: Seconds a call may go without inbound audio (no track, or RTP stopped) before it ends.
    peer_timeout_s: float = 15.0
    #: Seconds suggested to a client turned away because the server is full.
    retry_after_s: int = 5
    #: "tuned": s2s's own media path (inline Opus both ways, FEC/RED/NACK, loss recovery);
    #: "stock": aiortc's (its 80 ms jitter buffer, decoder thread, encoder), for comparison.
    transport: str = "tuned"
    #: Opus bitrate s2s sends at and asks the caller to stay under (bits/s).
    opus_bitrate: int = 32_000
    #: Longest wait for a missing inbound packet before it is rebuilt (FEC) or concealed.
    max_gap_wait_ms: float = 80.0
    #: Largest data-channel message accepted, in bytes (Chromium and aiortc cap it at 256 KiB).
    max_event_bytes: int = 262_144
    #: Largest SDP offer accepted, in bytes.
    max_sdp_bytes: int = 65_536
    #: Largest image accepted (bytes, decoded), largest in pixels, and the side it is scaled to.
    image_max_bytes: int = 8 * 1024 * 1024
    image_max_pixels: int = 40_000_000
    image_max_side: int = 1024
    #: Pictures a call keeps (the latest is what "what am I looking at" refers to).
    image_history: int = 4
    #: Bytes of unfinished chunked image uploads one call may have in flight.
    image_upload_bytes: int = 16 * 1024 * 1024
    #: Frames per second kept from a caller's video track (0: video is refused in the answer).
    camera_fps: float = 1.0
    #: Longest call in seconds (0: no limit).
    max_call_s: float = 0.0
    #: Calls one server key may hold at once (0: only --max-sessions applies).
    max_calls_per_key: int = 0
    #: Client events per second and bytes per second one call may send (bursts of 2 s allowed,
    #: and of bytes at least the largest picture's chunks). aiortc receives data-channel bytes
    #: at about 5 MB/s per core, so 1 MB/s is a fifth of a core for a call that uploads flat
    #: out (an 8 MB picture still goes in one burst).
    max_events_per_s: float = 100.0
    max_event_bytes_per_s: float = 1_000_000.0
    #: Seconds between a call's s2s.session.stats events (0: none; its metrics are then still
    #: sampled every 5 s).
    stats_interval_s: float = 5.0
    #: Seconds calls may go on after SIGTERM before they are closed.
    shutdown_grace_s: float = 10.0
    #: Where call started/ended webhooks go (none if empty), and the secret that signs them.
    webhook_url: str = ""
    webhook_secret: str = ""
    #: A client secret makes one call (else, as OpenAI's, any number until it expires).
    single_use_client_secrets: bool = False
    #: Server API keys; with none, every caller is trusted (and the CLI binds to loopback).
    api_keys: tuple[str, ...] = ()
    #: Browser origins allowed to use /v1/ endpoints; empty allows any.
    allowed_origins: tuple[str, ...] = ()
    log_level: str = "INFO"
    web_dir: Path = WEB_DIR
