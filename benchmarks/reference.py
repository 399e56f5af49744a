"""Hand-written physical limits that torchactors is measured against (no runtime at all).

- xproc_get: copy into a shared segment (memfd, allocated and pre-faulted once, reused) plus
  a length-prefixed pickle message over a socketpair; the child sums and replies.
- actor_rtt: the raw round trip over that socketpair (4-byte length prefix + pickle).
- weight_sync: one memcpy of the whole state into a memfd that 4 reader processes mapped
  once, then a pipe message to each reader and its answer.
- actor_learner: the two-core copy limit, measured: two threads each snapshot an 18 MB
  buffer (clone, into memory the allocator reuses) as fast as they can at the same time; the
  sum of their rates is the most rollouts per second any runtime can reach when every rollout
  costs one copy. BENCH.md's "about 300/s" is instead two cores copying at memcpy[256MB]'s
  speed, i.e. into fresh pages; that estimate goes to `extra` as copy_limit_fresh_pages.

Run as `python -m reference --config JSON --out FILE`; it re-runs this file as its child.
"""
from __future__ import annotations

import mmap
import os
import pickle
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import torch
from common import (
    WEIGHT_READERS,
    Config,
    Recorder,
    key,
    make_rollout_buffer,
    make_state_dict,
    make_tensor,
    memcpy,
    summarize,
    weight_sync_key,
)

_LEN = struct.Struct("<I")


def send_msg(sock: socket.socket, obj: Any) -> None:
    """One message: 4-byte little-endian length, then the pickle."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("peer closed the socket")
        got += k
    return bytes(buf)


def recv_msg(sock: socket.socket) -> Any:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    return pickle.loads(_recv_exact(sock, n))


def _child_server(sock_fd: int, mem_fd: int, capacity: int) -> None:
    """The 'actor': maps the segment once, then answers ('sum', n) and ('noop',) forever."""
    torch.set_num_threads(1)
    sock = socket.socket(fileno=sock_fd)
    mem = mmap.mmap(mem_fd, capacity)
    seg = torch.frombuffer(mem, dtype=torch.float32)
    while True:
        msg = recv_msg(sock)
        if msg[0] == "sum":
            send_msg(sock, float(seg[: msg[1]].sum()))
        elif msg[0] == "noop":
            send_msg(sock, None)
        else:
            break
    del seg
    sock.close()


def _copy_loop(buf: torch.Tensor, seconds: float, start: threading.Barrier,
               out: list[float]) -> None:
    """Snapshot buf (clone) in a loop for `seconds`; append the median seconds per copy."""
    snapshot = buf.clone
    for _ in range(3):
        snapshot()
    start.wait()
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        snap = snapshot()
        samples.append(time.perf_counter() - t0)
        del snap
    out.append(statistics.median(samples))


class _Server:
    """Parent side of the segment + socketpair 'actor'."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, mmap.PAGESIZE)
        self.mem_fd = os.memfd_create("torchactors-bench-ref")
        os.ftruncate(self.mem_fd, self.capacity)
        self.mem = mmap.mmap(self.mem_fd, self.capacity)
        self.seg = torch.frombuffer(self.mem, dtype=torch.float32)
        self.seg.zero_()  # pre-fault once: page faults on fresh tmpfs pages cost 4x the copy
        self.sock, child = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child-server",
             str(child.fileno()), str(self.mem_fd), str(self.capacity)],
            pass_fds=(child.fileno(), self.mem_fd))
        child.close()

    def xproc_get(self, t: torch.Tensor) -> float:
        n = t.numel()
        self.seg[:n].copy_(t)
        send_msg(self.sock, ("sum", n))
        return recv_msg(self.sock)

    def rtt(self) -> None:
        send_msg(self.sock, ("noop",))
        recv_msg(self.sock)

    def close(self) -> None:
        send_msg(self.sock, ("exit",))
        self.proc.wait(timeout=10)
        self.sock.close()
        del self.seg
        self.mem.close()
        os.close(self.mem_fd)


def copy_limit(cfg: Config, cores: int = 2) -> dict[str, Any]:
    """Rollouts/s if every rollout costs exactly one copy and `cores` copy at once.

    Threads, not processes: torch releases the GIL while it copies, and there is no
    interpreter start-up to wait for.
    """
    seconds = 1.0 if cfg.tiny else 3.0
    bufs = [make_rollout_buffer(cfg.rollout_shape, seed=i) for i in range(cores)]
    start = threading.Barrier(cores)
    per_copy: list[float] = []
    threads = [threading.Thread(target=_copy_loop, args=(b, seconds, start, per_copy))
               for b in bufs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = sum(1.0 / s for s in per_copy)
    res = summarize([1.0 / rate])
    res["rate"] = rate
    res["per_copy_s"] = per_copy
    return res


def fresh_copy_estimate(cfg: Config, rec: Recorder, cores: int = 2) -> dict[str, Any] | None:
    """BENCH.md's way to the limit: `cores` copies at the speed of memcpy of the largest size
    (>= 64 MB, so clone gets fresh pages from the kernel), scaled to one rollout."""
    big = [n for n in cfg.sizes if n >= 64 << 20 and key("memcpy", n) in rec.data["results"]]
    if not big:
        return None
    n = max(big)
    per_byte = rec.data["results"][key("memcpy", n)]["median"] / n
    rollout_bytes = 1
    for d in cfg.rollout_shape:
        rollout_bytes *= d
    rate = cores / (per_byte * rollout_bytes)
    return {"median": 1.0 / rate, "rate": rate, "from": key("memcpy", n), "unit": "s"}


class _WeightReaders:
    """weight_sync's hand-written limit: one memfd the readers map once; a sync is one memcpy
    of the whole state into it and a pipe message to (and answer from) each reader."""

    def __init__(self, nbytes: int, readers: int) -> None:
        self.capacity = max(nbytes, mmap.PAGESIZE)
        self.mem_fd = os.memfd_create("torchactors-bench-ref-weights")
        os.ftruncate(self.mem_fd, self.capacity)
        self.mem = mmap.mmap(self.mem_fd, self.capacity)
        self.seg = torch.frombuffer(self.mem, dtype=torch.uint8)
        self.seg.zero_()  # pre-fault once
        self.socks, self.procs = [], []
        for _ in range(readers):
            sock, child = socket.socketpair()
            self.procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--child-server",
                 str(child.fileno()), str(self.mem_fd), str(self.capacity)],
                pass_fds=(child.fileno(), self.mem_fd)))
            child.close()
            self.socks.append(sock)

    def sync(self, flat: torch.Tensor) -> None:
        self.seg[:flat.numel()].copy_(flat)
        for s in self.socks:
            send_msg(s, ("noop",))
        for s in self.socks:
            recv_msg(s)

    def close(self) -> None:
        for s, p in zip(self.socks, self.procs, strict=False):
            send_msg(s, ("exit",))
            p.wait(timeout=10)
            s.close()
        del self.seg
        self.mem.close()
        os.close(self.mem_fd)


def _weight_sync(cfg: Config, rec: Recorder) -> None:
    sd = make_state_dict(cfg)
    flat = torch.cat([t.reshape(-1) for t in sd.values()]).view(torch.uint8)
    readers = _WeightReaders(flat.numel(), WEIGHT_READERS)
    try:
        readers.sync(flat)
        rec.time_op(weight_sync_key(cfg), lambda: readers.sync(flat), flat.numel())
    finally:
        readers.close()


def run(cfg: Config, rec: Recorder) -> None:
    tensors = {n: make_tensor(n) for n in cfg.sizes}
    memcpy(rec, tensors)
    server = _Server(max(cfg.sizes) if cfg.sizes else 0)
    try:
        for nbytes, t in tensors.items():
            rec.time_op(key("xproc_get", nbytes), lambda t=t: server.xproc_get(t), nbytes)
        rec.time_op("actor_rtt", server.rtt)
    finally:
        server.close()
    with rec.guard("actor_learner"):
        rec.add("actor_learner", copy_limit(cfg))
    with rec.guard("weight_sync"):
        _weight_sync(cfg, rec)
    fresh = fresh_copy_estimate(cfg, rec)
    if fresh:
        rec.add("copy_limit_fresh_pages", fresh, section="extra")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-server":
        _child_server(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        from common import system_main

        system_main("reference", run)
