"""HTTP endpoints: OpenAI-style WebRTC call set-up, hang-up, health and metrics.

This is the only package that turns errors into HTTP statuses: 400 for an offer or session it
cannot take, 404 for an unknown call, 413/415 for bodies of the wrong size or type, 503 (with
``Retry-After``) when the server is full. Error bodies are JSON in OpenAI's ``{"error": {...}}``
shape; nothing that failed is ever answered with 200.

With ``--workers`` (an app with a ``POOL``), requests about a call another worker owns are relayed
to it (``route_to_owner``), and an offer goes to the least loaded worker (``create_call``).

- ``state``: the typed app state (``web.AppKey``) every handler reads.
- ``calls``: ``POST /v1/realtime/calls`` (offer in, answer out) and hang-up.
- ``client_secrets``: ``POST /v1/realtime/client_secrets``.
- ``sideband``: ``GET /v1/realtime?call_id=…``, an app backend's WebSocket onto a call.
- ``health``: ``/healthz`` and ``/metrics``.
- ``middleware``: relaying to the worker that owns a call, and CORS.
- ``errors``: OpenAI-shaped error bodies and the API key check.
- ``routes``: ``add_routes``, the table of all of them.
"""
