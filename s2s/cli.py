"""``s2s`` command line: the only place that reads argv and the environment."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import uvloop

from s2s import __version__
from s2s import log as s2s_log
from s2s.config import CUDA_GRAPHS, LOOPBACK, Settings
from s2s.pool import MAX_WORKERS
from s2s.server import serve
from s2s.supervisor import supervise
from s2s.worker.handle import ClusterUnavailable
from s2s.worker.process import WorkerError, WorkerOptions

log = logging.getLogger("s2s")


# Options that set one Settings field each: (flag, field, help, extra argparse keywords). Type and
# default come from Settings, so each default lives in one place.
_FIELD_OPTIONS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("--host", "host", "address to listen on", {}),
    ("--port", "port", "HTTP port", {}),
    ("--model", "model", "model backend: local, echo, or NAME:PATH_OR_HUB_ID", {}),
    (
        "--device",
        "device",
        "device for model compute: cpu, cuda, cuda:N (default: CUDA when there is one)",
        {"type": str},
    ),
    (
        "--max-sessions",
        "max_sessions",
        "calls the whole server takes, all workers together, before answering 503 "
        "server_full. The default protects the latency of the calls already in: 4 to 6 "
        "local-model talkers or about 50 echo calls fit on one core of a 2-core VM, and a GPU "
        "model's batch slows past its slot count. It is not per worker: with --workers N, raise "
        "it by what N cores hold (scripts/bench_transport.py measures it)",
        {},
    ),
    (
        "--prompt-tokens",
        "prompt_tokens",
        "prompt budget of a turn-based model (qwen3-omni) in tokens: a response reads the "
        "conversation so far, leaving out the oldest turns past this",
        {},
    ),
    (
        "--prefill-tokens",
        "prefill_tokens",
        "prefill piece of a turn-based model (qwen3-omni): at most this many prompt tokens per "
        "tick, between the other calls' steps; smaller keeps their frames steadier, larger "
        "starts a long turn's reply sooner (0: the worker's default, 512)",
        {},
    ),
    (
        "--cuda-graphs",
        "cuda_graphs",
        "replay a GPU model worker's steps from CUDA graphs: auto is on for moshi and off for "
        "qwen3-omni (its graphs have not yet run on a GPU); graphs that fail to set up fall back "
        "to eager steps, with the reason in the log",
        {"choices": CUDA_GRAPHS},
    ),
    (
        "--workers",
        "workers",
        "server processes sharing the port, each pinned to a core; 0 is one "
        "per usable core for CPU models (echo, local) and 1 for GPU ones, whose process batches "
        "every call; 1 serves in this process",
        {},
    ),
    (
        "--ray-address",
        "ray_address",
        "a Ray cluster (its head's HOST:PORT, or auto) whose model workers (s2s worker) serve "
        "this edge's calls; without it the model runs here",
        {},
    ),
    (
        "--peer-timeout",
        "peer_timeout_s",
        "seconds without inbound audio before a call is ended",
        {},
    ),
    (
        "--transport",
        "transport",
        "media path: s2s's tuned one, or aiortc's stock one for comparison",
        {"choices": ("tuned", "stock")},
    ),
    (
        "--opus-bitrate",
        "opus_bitrate",
        "Opus bitrate sent, and asked of callers, in bits/s",
        {},
    ),
    (
        "--max-gap-wait",
        "max_gap_wait_ms",
        "longest wait in ms for a missing inbound packet "
        "before it is rebuilt from FEC or concealed; the wait adapts to measured jitter below "
        "this",
        {},
    ),
    ("--image-max-bytes", "image_max_bytes", "largest image a client may send, in bytes", {}),
    (
        "--image-max-pixels",
        "image_max_pixels",
        "largest image in pixels; checked before decoding",
        {},
    ),
    (
        "--image-history",
        "image_history",
        "pictures a call keeps; the latest is what the model looks at",
        {},
    ),
    (
        "--camera-fps",
        "camera_fps",
        "frames per second kept from a client's video track; 0 refuses video",
        {},
    ),
    ("--max-call-seconds", "max_call_s", "longest call in seconds; 0 for no limit", {}),
    (
        "--max-calls-per-key",
        "max_calls_per_key",
        "calls one API key may hold at once; 0 for no limit",
        {},
    ),
    ("--shutdown-grace", "shutdown_grace_s", "seconds calls may go on after SIGTERM", {}),
    (
        "--stats-interval",
        "stats_interval_s",
        "seconds between a call's s2s.session.stats events; 0 sends none",
        {},
    ),
    ("--webhook", "webhook_url", "URL that gets call started/ended webhooks", {}),
    (
        "--webhook-secret",
        "webhook_secret",
        "secret that signs the webhooks (argv is visible to every user of the machine: prefer "
        "--webhook-secret-file or S2S_WEBHOOK_SECRET)",
        {},
    ),
    (
        "--log-level",
        "log_level",
        "log level",
        {"choices": ("DEBUG", "INFO", "WARNING", "ERROR"), "type": str.upper},
    ),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2s", description="Realtime speech-to-speech server")
    parser.add_argument("--version", action="version", version=f"s2s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the WebRTC server")
    defaults = Settings()
    for flag, field, help_, extra in _FIELD_OPTIONS:
        default = getattr(defaults, field)
        options = {"dest": field, "default": default, "type": type(default)}
        if "choices" not in extra:  # named after the flag, not the field
            options["metavar"] = flag.removeprefix("--").replace("-", "_").upper()
        if default not in (None, ""):
            help_ += " (default %(default)s)"
        serve.add_argument(flag, help=help_, **(options | extra))
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="server API key clients must present as 'Authorization: Bearer KEY' (repeatable)",
    )
    serve.add_argument("--api-key-file", type=Path, help="a file of server API keys, one a line")
    serve.add_argument(
        "--webhook-secret-file", type=Path, help="a file holding the secret that signs webhooks"
    )
    serve.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        help="browser origin allowed to call the API (repeatable; default: any)",
    )
    serve.add_argument(
        "--single-use-client-secrets",
        action="store_true",
        help="a client secret makes one call (default: as OpenAI's, any until it expires)",
    )
    serve.add_argument(
        "--insecure-public",
        action="store_true",
        help="listen on a public address even with no API key (anyone can call)",
    )
    worker = commands.add_parser(
        "worker", help="start a model worker on a Ray cluster (pip install s2s[ray])"
    )
    worker.add_argument(
        "--ray-address", required=True, help="the cluster: its head's HOST:PORT, or auto"
    )
    worker.add_argument(
        "--model", required=True,
        help="the model it serves: moshi:PATH_OR_HUB_ID or qwen3-omni:PATH_OR_HUB_ID",
    )  # fmt: skip
    worker.add_argument(
        "--device", help="cpu or cuda (the GPU Ray gives it; default: CUDA on a GPU cluster)"
    )
    worker.add_argument(
        "--max-calls", type=int, default=32, help="call slots (default %(default)s)"
    )
    worker.add_argument(
        "--peer-timeout",
        type=float,
        default=Settings().peer_timeout_s,
        help="seconds a call may go untouched by its edge before its slot is freed (default "
        "%(default)s)",
    )
    worker.add_argument(
        "--cuda-graphs", choices=CUDA_GRAPHS, default="auto",
        help="CUDA graphs for its steps, as for serve (default %(default)s)",
    )  # fmt: skip
    worker.add_argument(
        "--prompt-tokens", type=int, default=Settings().prompt_tokens,
        help="a qwen3-omni worker's prompt budget: its caches are allocated for it at load, and "
        "an edge's larger --prompt-tokens is cut to it (default %(default)s)",
    )  # fmt: skip
    worker.add_argument("--name", default="", help="the worker's name (default: a new one)")
    worker.add_argument(
        "--max-restarts",
        type=int,
        default=-1,
        help="times Ray restarts it when it dies; -1 for always (default %(default)s)",
    )
    worker.add_argument(
        "--detach",
        action="store_true",
        help="return once it is up; it lives on until the cluster stops",
    )
    worker.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper
    )
    return parser


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Settings, str | None]:
    """The settings ``s2s serve`` runs with (``argv``, and ``environ`` for the webhook secret:
    ``os.environ`` by default), and a warning to log if the host was narrowed."""
    environ = os.environ if environ is None else environ
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 <= args.workers <= MAX_WORKERS:
        parser.error(f"--workers must be between 0 and {MAX_WORKERS}")
    if args.prefill_tokens < 0 or args.prompt_tokens < 1:
        parser.error("--prefill-tokens must be 0 or more and --prompt-tokens at least 1")
    keys = [k.strip() for k in args.api_key if k.strip()]
    if args.api_key_file:
        keys += [
            line.strip() for line in args.api_key_file.read_text().splitlines() if line.strip()
        ]
    fields = {field: getattr(args, field) for _, field, _, _ in _FIELD_OPTIONS}
    if args.webhook_secret and args.webhook_secret_file:
        parser.error("give the webhook secret once: --webhook-secret or --webhook-secret-file")
    if args.webhook_secret_file:
        try:
            fields["webhook_secret"] = args.webhook_secret_file.read_text().strip()
        except OSError as exc:
            parser.error(f"--webhook-secret-file: {exc}")
        if not fields["webhook_secret"]:
            parser.error(f"--webhook-secret-file: {args.webhook_secret_file} is empty")
    elif not args.webhook_secret:
        fields["webhook_secret"] = environ.get("S2S_WEBHOOK_SECRET", "").strip()
    if fields["webhook_url"] and not fields["webhook_secret"]:
        # Signed with an empty key, anyone could forge them.
        parser.error("--webhook needs a secret: --webhook-secret-file or S2S_WEBHOOK_SECRET")
    host = fields["host"]
    warning = None
    if not keys and host not in LOOPBACK and not args.insecure_public:
        warning = f"no --api-key given: listening on 127.0.0.1, not {host}"
        fields["host"] = "127.0.0.1"
    settings = Settings(
        **fields, api_keys=tuple(keys), allowed_origins=tuple(args.allow_origin),
        single_use_client_secrets=args.single_use_client_secrets,
    )  # fmt: skip
    if settings.ray_address and settings.workers > 1:
        parser.error("--workers above 1 with --ray-address: run one edge per machine instead")
    if settings.ray_address and (settings.device or settings.cuda_graphs != "auto"):
        # The model runs on the workers, each started with its own (s2s worker --device ...).
        parser.error("--device and --cuda-graphs are the workers' with --ray-address (s2s worker)")
    if settings.ray_address and settings.model.partition(":")[0] not in ("moshi", "qwen3-omni"):
        parser.error(
            "--ray-address serves moshi:PATH_OR_HUB_ID and qwen3-omni:PATH_OR_HUB_ID models only "
            "(s2s worker)"
        )
    return settings, warning


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "worker":
        return run_worker(args)
    settings, open_warning = parse_settings(argv)
    s2s_log.configure(settings.log_level)
    if open_warning:
        log.warning("%s (use --insecure-public to allow it)", open_warning)
    elif not settings.api_keys:
        log.warning("no --api-key given: anyone who can reach %s may make calls", settings.host)
    workers = 1 if settings.ray_address else settings.workers or default_workers(settings.model)
    if workers > 1:
        return supervise(settings, workers)
    try:
        uvloop.run(serve(settings))
    except ClusterUnavailable as exc:
        log.error("%s", exc)
        return 2
    return 0


def run_worker(args: argparse.Namespace) -> int:
    """``s2s worker``: start a model worker actor on the cluster and keep it until SIGTERM."""
    s2s_log.configure(args.log_level)
    if args.device and args.device.startswith("cuda:") and args.device != "cuda:0":
        # Ray shows the actor the one GPU it was given, as cuda:0 (CUDA_VISIBLE_DEVICES).
        log.error("--device %s: a worker sees only the GPU Ray gives it; use cuda", args.device)
        return 2
    from s2s.worker import cluster  # Ray, only here and with serve --ray-address

    try:
        cluster.connect(args.ray_address)
        options = WorkerOptions(
            args.model, args.device, args.max_calls, args.cuda_graphs, args.prompt_tokens
        )
        name, actor, hello = cluster.start_worker(
            options, name=args.name, evict_after_s=args.peer_timeout,
            max_restarts=args.max_restarts, detached=args.detach,
        )  # fmt: skip
    except (ClusterUnavailable, WorkerError) as exc:
        log.error("%s", exc)
        return 2
    log.info("model worker %s: %s on %s, %d slots", name, hello.model, hello.device, hello.slots)
    if args.detach:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    log.info("stopping model worker %s", name)
    cluster.stop_worker(name, actor)
    return 0


def default_workers(model: str) -> int:
    """One worker per usable core, except for GPU models (Moshi, Qwen-Omni): a worker loads its
    own copy of the weights, and Moshi batches only the calls of its own process."""
    if model.split(":", 1)[0] in ("moshi", "qwen-omni", "qwen3-omni"):
        return 1
    return len(os.sched_getaffinity(0))
