"""torchactors actor classes of the benchmark, in a module of their own.

Actor processes are spawned and find a class by importing its module by name, so the
classes cannot live in the `__main__` of workloads_torchactors; this directory is on the
PYTHONPATH of every benchmark process and its children.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from common import make_rollout_buffer

import torchactors as ta


def as_tensor(x: Any) -> torch.Tensor:
    """A tensor from an argument that is a ref or, if the runtime resolved it already, a tensor."""
    return x if isinstance(x, torch.Tensor) else ta.get(x)


@ta.actor(num_threads=1)
class Worker:
    """The actor of xproc_get, get_only and actor_rtt."""

    def noop(self) -> None:
        return None

    def total(self, box: list) -> float:
        # The ref travels inside a list so that this method, not argument resolution, gets it.
        return float(as_tensor(box[0]).sum())

    def get_seconds(self, box: list) -> float | None:
        """Seconds for get alone (before the data is touched); None if already resolved."""
        item = box[0]
        if isinstance(item, torch.Tensor):
            return None
        t0 = time.perf_counter()
        x = ta.get(item)
        dt = time.perf_counter() - t0
        del x
        return dt


@ta.actor(num_threads=1)
class Producer:
    """Holds a preallocated rollout buffer; each call returns a snapshot of it.

    A tensor returned by a method is put into the store by the runtime, which copies a tensor
    that is not already shared (ARCHITECTURE.md, "How data flows"): that one copy is the
    snapshot, as for Ray, so there is no extra clone here.
    """

    def __init__(self, shape: tuple[int, ...], seed: int) -> None:
        self.buf = make_rollout_buffer(shape, seed)

    def rollout(self) -> torch.Tensor:
        if self.buf.is_shared():  # moved in place (as torch.mp queues do): no longer a snapshot
            raise RuntimeError("the runtime moved the rollout buffer into shared memory; "
                               "returned rollouts would alias it instead of copying it")
        return self.buf


@ta.actor(num_threads=1)
class WeightReader:
    """weight_sync: waits for a version and builds its state dict of views."""

    def __init__(self, name: str) -> None:
        self.w = ta.Weights(name)

    def noop(self) -> None:
        return None

    def wait_for(self, version: int) -> int:
        v, sd = self.w.wait_newer(version - 1, timeout=60)
        return v if len(sd) else -1


@ta.actor(num_threads=1)
class QueueProducer:
    """queue_throughput: puts n items as fast as the queue takes them."""

    def noop(self) -> None:
        return None

    def produce(self, q: ta.Queue, n: int, item: Any) -> int:
        for _ in range(n):
            q.put(item)
        return n


@ta.actor(num_threads=1)
class Idle:
    """The actor of actor_start, restart_latency and the idle-memory figure."""

    def noop(self) -> None:
        return None

    def pid(self) -> int:
        import os

        return os.getpid()
