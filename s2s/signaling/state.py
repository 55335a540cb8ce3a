"""What the app holds for its handlers: typed ``web.AppKey`` entries, set up by ``s2s.app``."""

from __future__ import annotations

from aiohttp import web

from s2s.auth import Keys
from s2s.backends import Backend
from s2s.config import Settings
from s2s.forwarding import Relay
from s2s.metrics import MergedScrape, ServerMetrics
from s2s.pool import Pool
from s2s.registry import SessionRegistry
from s2s.vad import VadService

SETTINGS = web.AppKey("settings", Settings)
BACKEND = web.AppKey("backend", Backend)
REGISTRY = web.AppKey("registry", SessionRegistry)
VAD = web.AppKey("vad", VadService)
KEYS = web.AppKey("keys", Keys)
METRICS = web.AppKey("metrics", ServerMetrics)
#: Set only in a worker of ``s2s serve --workers N`` (N > 1).
POOL = web.AppKey("pool", Pool)
RELAY = web.AppKey("relay", Relay)
MERGED_SCRAPE = web.AppKey("merged_scrape", MergedScrape)
