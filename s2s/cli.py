"""``s2s`` command line: the only place that reads argv and the environment."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import uvloop

from s2s import __version__
from s2s import log as s2s_log
from s2s.config import Settings
from s2s.pool import MAX_WORKERS
from s2s.server import serve
from s2s.supervisor import supervise

log = logging.getLogger("s2s")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2s", description="Realtime speech-to-speech server")
    parser.add_argument("--version", action="version", version=f"s2s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the WebRTC server")
    d = Settings()
    serve.add_argument("--host", default=d.host, help="address to listen on (default %(default)s)")
    serve.add_argument("--port", type=int, default=d.port, help="HTTP port (default %(default)s)")
    serve.add_argument(
        "--model",
        default=d.model,
        help="model backend: echo, or NAME:PATH_OR_HUB_ID (default %(default)s)",
    )
    serve.add_argument(
        "--device",
        default=None,
        help="device for model compute: cpu, cuda, cuda:N (default: CUDA when there is one)",
    )
    serve.add_argument(
        "--max-sessions",
        type=int,
        default=d.max_sessions,
        help="calls the server takes (all workers together) before answering 503 "
        "(default %(default)s)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="server processes sharing the port, each pinned to a core; 0 is one per usable "
        "core for CPU models (echo, local) and 1 for GPU ones, whose process batches every "
        "call; 1 serves in this process (default %(default)s)",
    )
    serve.add_argument(
        "--peer-timeout",
        type=float,
        default=d.peer_timeout_s,
        help="seconds without inbound audio before a call is ended (default %(default)s)",
    )
    serve.add_argument(
        "--transport",
        choices=("tuned", "stock"),
        default=d.transport,
        help="media path: s2s's tuned one, or aiortc's stock one for comparison "
        "(default %(default)s)",
    )
    serve.add_argument(
        "--opus-bitrate",
        type=int,
        default=d.opus_bitrate,
        help="Opus bitrate sent, and asked of callers, in bits/s (default %(default)s)",
    )
    serve.add_argument(
        "--max-gap-wait",
        type=float,
        default=d.max_gap_wait_ms,
        help="longest wait in ms for a missing inbound packet before it is rebuilt from FEC "
        "or concealed; the wait adapts to measured jitter below this (default %(default)s)",
    )
    serve.add_argument(
        "--image-max-bytes",
        type=int,
        default=d.image_max_bytes,
        help="largest image a client may send, in bytes (default %(default)s)",
    )
    serve.add_argument(
        "--image-max-pixels",
        type=int,
        default=d.image_max_pixels,
        help="largest image in pixels; checked before decoding (default %(default)s)",
    )
    serve.add_argument(
        "--image-history",
        type=int,
        default=d.image_history,
        help="pictures a call keeps; the latest is what the model looks at (default %(default)s)",
    )
    serve.add_argument(
        "--camera-fps",
        type=float,
        default=d.camera_fps,
        help="frames per second kept from a client's video track; 0 refuses video "
        "(default %(default)s)",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="server API key clients must present as 'Authorization: Bearer KEY' (repeatable)",
    )
    serve.add_argument("--api-key-file", type=Path, help="a file of server API keys, one a line")
    serve.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        help="browser origin allowed to call the API (repeatable; default: any)",
    )
    serve.add_argument(
        "--insecure-public",
        action="store_true",
        help="listen on a public address even with no API key (anyone can call)",
    )
    serve.add_argument(
        "--max-call-seconds",
        type=float,
        default=d.max_call_s,
        help="longest call in seconds; 0 for no limit (default %(default)s)",
    )
    serve.add_argument(
        "--max-calls-per-key",
        type=int,
        default=d.max_calls_per_key,
        help="calls one API key may hold at once; 0 for no limit (default %(default)s)",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=d.shutdown_grace_s,
        help="seconds calls may go on after SIGTERM (default %(default)s)",
    )
    serve.add_argument(
        "--stats-interval",
        type=float,
        default=d.stats_interval_s,
        help="seconds between a call's s2s.session.stats events; 0 sends none "
        "(default %(default)s)",
    )
    serve.add_argument("--webhook", default="", help="URL that gets call started/ended webhooks")
    serve.add_argument("--webhook-secret", default="", help="secret that signs the webhooks")
    serve.add_argument(
        "--log-level",
        default=d.log_level,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 <= args.workers <= MAX_WORKERS:
        parser.error(f"--workers must be between 0 and {MAX_WORKERS}")
    keys = [k.strip() for k in args.api_key if k.strip()]
    if args.api_key_file:
        keys += [
            line.strip() for line in args.api_key_file.read_text().splitlines() if line.strip()
        ]
    host = args.host
    open_warning = None
    if not keys and host not in ("127.0.0.1", "::1", "localhost") and not args.insecure_public:
        open_warning = f"no --api-key given: listening on 127.0.0.1, not {host}"
        host = "127.0.0.1"
    settings = Settings(
        host=host,
        api_keys=tuple(keys),
        allowed_origins=tuple(args.allow_origin),
        port=args.port,
        model=args.model,
        device=args.device,
        max_sessions=args.max_sessions,
        workers=args.workers,
        peer_timeout_s=args.peer_timeout,
        transport=args.transport,
        opus_bitrate=args.opus_bitrate,
        max_gap_wait_ms=args.max_gap_wait,
        image_max_bytes=args.image_max_bytes,
        image_max_pixels=args.image_max_pixels,
        image_history=args.image_history,
        camera_fps=args.camera_fps,
        max_call_s=args.max_call_seconds,
        max_calls_per_key=args.max_calls_per_key,
        shutdown_grace_s=args.shutdown_grace,
        stats_interval_s=args.stats_interval,
        webhook_url=args.webhook,
        webhook_secret=args.webhook_secret,
        log_level=args.log_level,
    )
    s2s_log.configure(settings.log_level)
    if open_warning:
        log.warning("%s (use --insecure-public to allow it)", open_warning)
    elif not keys:
        log.warning("no --api-key given: anyone who can reach %s may make calls", host)
    workers = settings.workers or default_workers(settings.model)
    if workers > 1:
        return supervise(settings, workers)
    uvloop.run(serve(settings))
    return 0


def default_workers(model: str) -> int:
    """One worker per usable core, except for GPU models (Moshi, Qwen-Omni): a worker loads its
    own copy of the weights, and Moshi batches only the calls of its own process."""
    if model.split(":", 1)[0] in ("moshi", "qwen-omni"):
        return 1
    return len(os.sched_getaffinity(0))
