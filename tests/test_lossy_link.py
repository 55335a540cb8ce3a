"""Calls over a lossy link between two network namespaces of the test's own: tuned vs stock.

The server runs in one namespace, the caller in another, joined by a veth pair. Loss and 30 ms
(± 30 ms) of jitter are applied to the outbound traffic of both, so only these namespaces'
packets are touched: with netem where the kernel has it, and otherwise in user space through
NFQUEUE (``tests/netqueue.py``: same distributions, UDP only). The link turns lossy once the call
is up (data channel open): what is measured is the audio of a call on a lossy link, not how long
set-up takes on one. Without ``ip netns`` (not root, or no iproute2) the tests skip with the
reason.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PORT = 8090
# The netfilter queues the user-space impairment uses (one per namespace).
NFQUEUE = 4090


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


@dataclass
class Link:
    server_ns: str
    client_ns: str
    server_ip: str
    #: "netem", or "nfqueue" where the kernel has no netem (``tests/netqueue.py`` in user space).
    impairment: str
    _impairers: list[subprocess.Popen[str]] = field(default_factory=list)

    def impair(self, loss: float, jitter_ms: float) -> None:
        """Drop ``loss`` of the UDP packets each way and delay the rest by ``jitter_ms`` ± as
        much again, uniformly; (0, 0) makes the link whole again."""
        self._clear()
        if not loss and not jitter_ms:
            return
        for i, (ns, dev) in enumerate(((self.server_ns, "veth-s"), (self.client_ns, "veth-c"))):
            if self.impairment == "netem":
                args = ["root", "netem", "loss", f"{100 * loss}%",
                        "delay", f"{jitter_ms}ms", f"{jitter_ms}ms"]  # fmt: skip
                check = _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, *args)
                assert check.returncode == 0, check.stderr
                continue
            # UDP only: signaling (TCP) stays whole, as it would through a lossy radio link
            # with retransmissions below it.
            queue = NFQUEUE + i
            impairer = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.netqueue", str(queue),
                 str(loss), str(jitter_ms), str(queue)],
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            self._impairers.append(impairer)
            assert impairer.stdout is not None
            ready, _, _ = select.select([impairer.stdout], [], [], 15)
            line = impairer.stdout.readline() if ready else ""
            assert line.strip() == "bound", f"netqueue did not start: {line!r}"
            check = _run("ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", "-p", "udp",
                         "-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass")  # fmt: skip
            assert check.returncode == 0, check.stderr

    def _clear(self) -> None:
        for ns, dev in ((self.server_ns, "veth-s"), (self.client_ns, "veth-c")):
            if self.impairment == "netem":
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root")
            else:
                _run("ip", "netns", "exec", ns, "iptables", "-F", "OUTPUT")
        for impairer in self._impairers:
            impairer.kill()
            impairer.communicate(timeout=30)
        self._impairers.clear()


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    if not shutil.which("ip"):
        return "needs iproute2 (ip netns)"
    probe = f"s2s-probe-{os.getpid()}"
    made = _run("ip", "netns", "add", probe)
    _run("ip", "netns", "del", probe)
    if made.returncode:
        return f"ip netns add failed: {made.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def link() -> Iterator[Link]:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    tag = os.getpid() % 10_000
    server_ns, client_ns = f"s2s-srv-{tag}", f"s2s-cli-{tag}"
    net = f"10.{200 + tag % 50}.{tag % 250}"
    link = None
    steps = [
        ("ip", "netns", "add", server_ns),
        ("ip", "netns", "add", client_ns),
        ("ip", "link", "add", f"s2s-v{tag}", "type", "veth", "peer", "name", f"s2s-w{tag}"),
        ("ip", "link", "set", f"s2s-v{tag}", "netns", server_ns, "name", "veth-s"),
        ("ip", "link", "set", f"s2s-w{tag}", "netns", client_ns, "name", "veth-c"),
        ("ip", "-n", server_ns, "addr", "add", f"{net}.1/24", "dev", "veth-s"),
        ("ip", "-n", client_ns, "addr", "add", f"{net}.2/24", "dev", "veth-c"),
        ("ip", "-n", server_ns, "link", "set", "veth-s", "up"),
        ("ip", "-n", client_ns, "link", "set", "veth-c", "up"),
        ("ip", "-n", server_ns, "link", "set", "lo", "up"),
        ("ip", "-n", client_ns, "link", "set", "lo", "up"),
    ]
    try:
        for step in steps:
            done = _run(*step)
            if done.returncode:
                pytest.skip(f"cannot build the test network ({' '.join(step)}): {done.stderr}")
        probe = _run("ip", "netns", "exec", server_ns, "tc", "qdisc", "add", "dev", "veth-s",
                     "root", "netem", "loss", "0%")  # fmt: skip
        netem = probe.returncode == 0
        _run("ip", "netns", "exec", server_ns, "tc", "qdisc", "del", "dev", "veth-s", "root")
        if not netem:
            if not shutil.which("iptables"):
                pytest.skip("this kernel has no netem, and there is no iptables for NFQUEUE")
            bind = "from tests.netqueue import Impairer; Impairer(1, 0, 0, 0).bind()"
            queue = _run("ip", "netns", "exec", server_ns, sys.executable, "-c", bind)
            if queue.returncode:
                pytest.skip(f"this kernel has neither netem nor NFQUEUE: {queue.stderr[-300:]}")
        link = Link(server_ns, client_ns, f"{net}.1", "netem" if netem else "nfqueue")
        yield link
    finally:
        if link is not None:
            link.impair(0.0, 0.0)
        _run("ip", "netns", "del", server_ns)
        _run("ip", "netns", "del", client_ns)


def _server(link: Link, transport: str, port: int) -> subprocess.Popen[bytes]:
    command = ["ip", "netns", "exec", link.server_ns, sys.executable, "-m", "s2s", "serve",
               "--model", "echo", "--host", link.server_ip, "--port", str(port),
               "--insecure-public", "--transport", transport,
               "--stats-interval", "0.5", "--log-level", "WARNING"]  # fmt: skip
    server = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 30
    while _run("ip", "netns", "exec", link.client_ns, sys.executable, "-c",
               f"import socket; socket.create_connection(('{link.server_ip}', {port}), 1)"
               ).returncode:  # fmt: skip
        assert server.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)
    return server


def _call(link: Link, port: int, mode: str, loss: float, jitter_ms: float) -> dict[str, object]:
    """One call from the client namespace; the link turns lossy once the call is up."""
    command = ["ip", "netns", "exec", link.client_ns, sys.executable, "-m",
               "tests.lossy_caller", f"http://{link.server_ip}:{port}", mode]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    caller = subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert caller.stdout is not None and caller.stdin is not None
        ready, _, _ = select.select([caller.stdout], [], [], 30)
        line = caller.stdout.readline() if ready else ""
        if line.strip() != "ready":
            caller.kill()
            pytest.fail(f"the call did not come up: {line!r} {caller.communicate(timeout=30)}")
        link.impair(loss, jitter_ms)
        caller.stdin.write("go\n")
        caller.stdin.flush()
        out, err = caller.communicate(timeout=90)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait(timeout=30)
    assert caller.returncode == 0, err[-2000:]
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("loss", [0.05, 0.15])
def test_tuned_path_recovers_what_the_stock_path_loses(link: Link, loss: float) -> None:
    jitter_ms = 30
    results = {}
    for transport, port in (("stock", PORT), ("tuned", PORT + 1)):
        server = _server(link, transport, port)
        try:
            results[transport] = _call(link, port, transport, loss, jitter_ms)
        finally:
            link.impair(0.0, 0)
            server.terminate()
            server.wait(timeout=30)
    tuned, stock = results["tuned"], results["stock"]
    stats = tuned["stats"]
    assert isinstance(stats, dict)
    audio_in = stats["audio_in"]
    print(
        f"\nloss {loss:.0%} each way, jitter {jitter_ms} ms ± {jitter_ms} ms ({link.impairment}): "
        f"server measured jitter {stats['jitter_in_ms']} ms in, {stats['jitter_out_ms']} ms out; "
        f"echo correlation with the original: tuned {tuned['correlation']:.2f} "
        f"vs stock {stock['correlation']:.2f}; loud audio back: tuned {tuned['loud_ratio']:.2f} "
        f"vs stock {stock['loud_ratio']:.2f}; server rebuilt {audio_in['fec_frames']:.0f} frames "
        f"from FEC, concealed {audio_in['concealed_frames']:.0f}, decoded "
        f"{audio_in['decoded_frames']:.0f}, dropped {audio_in['late_packets']:.0f} late packets"
    )
    assert audio_in["fec_frames"] + audio_in["concealed_frames"] > 0  # the link did lose
    # and did jitter: RFC 3550 jitter of a uniform 0-60 ms delay is ~20 ms (measured 14-17 ms),
    # of a whole link ~1 ms
    assert stats["jitter_in_ms"] > jitter_ms / 6
    assert float(tuned["correlation"]) > float(stock["correlation"])  # type: ignore[arg-type]
