"""Model workers: where models run, and how calls talk to them.

A worker owns one device and one batched engine (``moshi.MoshiWorker``, ``omni.OmniWorker``) and
runs in a process of its own (``process.WorkerProcess``), so the model's Python never holds the
GIL of the event loop that carries the calls' RTP. Calls reach it through ticks (``messages``):
once per model step the server sends every call's input, and every join, leave, reset, steer and
respond since the last tick, in one message, and gets every call's output back in one message.
The same messages can cross a machine boundary: nothing in them refers to a process.

The server's scheduler sees a worker through ``handle.WorkerHandle``. On one machine that is
``process.WorkerProcess``; on a Ray cluster (``s2s serve --ray-address``, ``pip install
s2s[ray]``) the worker is an actor (``cluster``) and the edge's handle on it is
``edge.ClusterWorker``; ``edge.ClusterBackend`` places each call on a worker.
"""
