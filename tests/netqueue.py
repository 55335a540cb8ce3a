"""Loss and jitter for one network namespace's outbound UDP, in user space, where the kernel has
no netem: ``python -m tests.netqueue QUEUE LOSS JITTER_MS SEED``, run inside the namespace.

An iptables rule (``-j NFQUEUE --queue-num QUEUE --queue-bypass``) hands each outbound UDP packet
to this process, which drops ``LOSS`` of them at random and releases each of the others after a
delay drawn uniformly from 0 to twice ``JITTER_MS``: the same loss and delay distribution as
``netem loss L% delay J J`` (uniform jitter around a mean of J), reordering included. It prints
``bound`` once it holds the queue, and runs until killed.

It speaks the kernel's nfnetlink_queue protocol directly, over a netlink socket: the PyPI
binding (NetfilterQueue) ships only as source needing a C toolchain and libnetfilter-queue, and
three message types are all this needs. Only packet metadata is copied to user space, never the
payload: a verdict is all the kernel needs back.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import sys

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS = 1, 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_DROP, NF_ACCEPT = 0, 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id (host order)
_NFGENMSG = struct.Struct("=BBH")  # family, version, queue number (network order, packed below)
_NLATTR = struct.Struct("=HH")  # length, type


def _attribute(kind: int, payload: bytes) -> bytes:
    size = _NLATTR.size + len(payload)
    return _NLATTR.pack(size, kind) + payload + b"\0" * (-size % 4)


def _message(kind: int, queue: int, attributes: bytes, seq: int, flags: int) -> bytes:
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, socket.htons(queue)) + attributes
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind,
                            NLM_F_REQUEST | flags, seq, 0)  # fmt: skip
    return header + body


def _packet_ids(data: bytes) -> list[int]:
    """The packet ids of the queued-packet messages in one netlink read."""
    ids, at = [], 0
    while at + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, at)
        if length < _NLMSGHDR.size:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            a = at + _NLMSGHDR.size + _NFGENMSG.size
            while a + _NLATTR.size <= at + length:
                size, attr = _NLATTR.unpack_from(data, a)
                if size < _NLATTR.size:
                    break
                if attr & 0x3FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", data, a + _NLATTR.size)[0])
                a += (size + 3) & ~3
        at += (length + 3) & ~3
    return ids


class Impairer:
    def __init__(self, queue: int, loss: float, jitter_s: float, seed: int) -> None:
        self.queue = queue
        self.loss = loss
        self.jitter_s = jitter_s
        self.rng = random.Random(seed)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, 0))
        self.seq = 0

    def bind(self) -> None:
        """Take the queue and ask for metadata only; raises OSError if the kernel refuses."""
        command = _attribute(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0))
        params = _attribute(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
        for attribute in (command, params):
            self.seq += 1
            self.sock.send(_message(NFQNL_MSG_CONFIG, self.queue, attribute, self.seq, NLM_F_ACK))
            reply = self.sock.recv(4096)
            _, kind, _, _, _ = _NLMSGHDR.unpack_from(reply)
            if kind == NLMSG_ERROR:
                (error,) = struct.unpack_from("=i", reply, _NLMSGHDR.size)
                if error:
                    raise OSError(-error, f"nfnetlink_queue refused the config: {error}")

    def verdict(self, packet_id: int, verdict: int) -> None:
        self.seq += 1
        header = _attribute(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))
        self.sock.send(_message(NFQNL_MSG_VERDICT, self.queue, header, self.seq, 0))

    def on_readable(self) -> None:
        loop = asyncio.get_running_loop()
        for packet_id in _packet_ids(self.sock.recv(1 << 16)):
            if self.rng.random() < self.loss:
                self.verdict(packet_id, NF_DROP)
            else:
                delay = self.rng.uniform(0.0, 2 * self.jitter_s)
                loop.call_later(delay, self.verdict, packet_id, NF_ACCEPT)


async def main(queue: int, loss: float, jitter_ms: float, seed: int) -> None:
    impairer = Impairer(queue, loss, jitter_ms / 1000, seed)
    impairer.bind()
    impairer.sock.setblocking(False)
    asyncio.get_running_loop().add_reader(impairer.sock, impairer.on_readable)
    print("bound", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])))
