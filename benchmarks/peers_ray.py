"""Peer: Ray, as a user would write it (ray.put / ray.get / @ray.remote actors).

bench.py runs this module twice, each in a fresh process: as shipped (torch tensors are
pickled into the object store and copied back out by ray.get) and with
RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1 in the environment (tensors stored as buffers that
ray.get maps without a copy). `ray.init(num_cpus=2)`, one intra-op thread everywhere.

Run as `python -m peers_ray --config JSON --out FILE`.
"""
from __future__ import annotations

import logging
import os
import signal
import time
import warnings

import ray
import torch
from common import (
    QUEUE_MAXSIZE,
    QUEUE_PRODUCERS,
    QUEUE_SIZES,
    WEIGHT_READERS,
    Config,
    Recorder,
    key,
    make_rollout_buffer,
    make_state_dict,
    make_tensor,
    memcpy,
    queue_item,
    queue_key,
    queue_messages,
    start_ns,
    startup_reps,
    summarize,
    touch,
    weight_sync_key,
)


@ray.remote
class Worker:
    """The actor of xproc_get, get_only and actor_rtt."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        warnings.filterwarnings("ignore")  # zero-copy tensors are read-only: torch warns once

    def noop(self) -> None:
        return None

    def total(self, box: list) -> float:
        # Passed inside a list so that the actor, not Ray's argument resolution, calls get.
        x = ray.get(box[0])
        return float(x.sum())

    def get_seconds(self, box: list) -> float:
        t0 = time.perf_counter()
        x = ray.get(box[0])
        dt = time.perf_counter() - t0
        del x
        return dt


@ray.remote
class Producer:
    """Holds a preallocated rollout buffer; each call returns a snapshot of it.

    Returning the tensor makes Ray serialize it into the object store: that copy is the
    snapshot, so there is no extra clone here.
    """

    def __init__(self, shape: tuple[int, ...], seed: int) -> None:
        torch.set_num_threads(1)
        self.buf = make_rollout_buffer(shape, seed)

    def rollout(self) -> torch.Tensor:
        return self.buf


@ray.remote
class WeightReader:
    """weight_sync: gets the state dict it is sent a ref to (inside a list: the actor calls get)."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        warnings.filterwarnings("ignore")

    def noop(self) -> None:
        return None

    def fetch(self, box: list) -> int:
        sd = ray.get(box[0])
        return len(sd)


@ray.remote
class QueueProducer:
    """queue_throughput: puts n items into a ray.util.queue.Queue."""

    def __init__(self) -> None:
        torch.set_num_threads(1)

    def noop(self) -> None:
        return None

    def produce(self, q, n: int, nbytes: int) -> int:
        item = queue_item(nbytes)
        for _ in range(n):
            q.put(item)
        return n


def _dataplane(cfg: Config, rec: Recorder) -> None:
    """weight_sync: ray.put of the state dict, then ray.get in each of 4 actors;
    queue_throughput: ray.util.queue.Queue, 2 producer actors, the driver consumes."""
    from ray.util.queue import Queue

    with rec.guard("weight_sync"):
        sd = make_state_dict(cfg)
        readers = [WeightReader.remote() for _ in range(WEIGHT_READERS)]
        ray.get([r.noop.remote() for r in readers])

        def sync() -> None:
            ref = ray.put(sd)
            ray.get([r.fetch.remote([ref]) for r in readers])
        rec.time_op(weight_sync_key(cfg), sync, sum(t.nbytes for t in sd.values()))
        for r in readers:
            ray.kill(r)

    with rec.guard("queue_throughput"):
        producers = [QueueProducer.remote() for _ in range(QUEUE_PRODUCERS)]
        ray.get([p.noop.remote() for p in producers])
        q = Queue(maxsize=QUEUE_MAXSIZE)
        for nbytes in QUEUE_SIZES:
            n = queue_messages(cfg, nbytes, slow=True)

            def rounds(n: int = n, nbytes: int = nbytes) -> float:
                t0 = time.perf_counter()
                done = [p.produce.remote(q, n, nbytes) for p in producers]
                for _ in range(n * len(producers)):
                    x = q.get()
                del x
                ray.get(done)
                return (time.perf_counter() - t0) / (n * len(producers))
            rec.time_op(queue_key(nbytes), rounds, nbytes, self_timed=True)
        q.shutdown()
        for p in producers:
            ray.kill(p)


def learner_step(pending: dict) -> None:
    """Take whichever rollout is ready first, ask its producer for the next, read this one."""
    ready, _ = ray.wait(list(pending), num_returns=1)
    ref = ready[0]
    producer = pending.pop(ref)
    pending[producer.rollout.remote()] = producer  # one rollout in flight per producer
    x = ray.get(ref)
    touch(x)


# -- start-up: actor_start[N] (ray.init + N actors), restart_latency ----------------------------------

@ray.remote(max_restarts=10)
class Idle:
    def noop(self) -> None:
        return None

    def pid(self) -> int:
        return os.getpid()


def _ray_init() -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)


def _startup(cfg: Config, rec: Recorder) -> None:
    """actor_start[N]: ray.init() to N actors answering a no-op call (a fresh Ray each rep);
    restart_latency: SIGKILL of an actor's process to its restarted process's next answer."""
    reps = startup_reps(cfg)
    for n in start_ns(cfg):
        with rec.guard(f"actor_start[{n}]"):
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                _ray_init()
                try:
                    actors = [Idle.remote() for _ in range(n)]
                    ray.get([a.noop.remote() for a in actors])
                    samples.append(time.perf_counter() - t0)
                finally:
                    ray.shutdown()
            rec.add(f"actor_start[{n}]", summarize(samples))
    with rec.guard("restart_latency"):
        _ray_init()
        try:
            a = Idle.remote()
            pid = ray.get(a.pid.remote())
            samples = []
            for _ in range(3):
                os.kill(pid, signal.SIGKILL)
                t0 = time.perf_counter()
                old = pid
                while pid == old:
                    try:
                        pid = ray.get(a.pid.remote(), timeout=60)
                    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                        time.sleep(0.001)
                samples.append(time.perf_counter() - t0)
            rec.add("restart_latency", summarize(samples))
        finally:
            ray.shutdown()


def run(cfg: Config, rec: Recorder) -> None:
    warnings.filterwarnings("ignore")
    zero_copy = os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "") not in ("", "0")
    rec.data["extra"]["zero_copy"] = zero_copy
    tensors = {n: make_tensor(n) for n in cfg.sizes}
    memcpy(rec, tensors)
    if not zero_copy:       # zero-copy tensors change nothing in how Ray starts actors
        _startup(cfg, rec)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    try:
        for nbytes, t in tensors.items():
            def put_get(t: torch.Tensor = t) -> None:
                ref = ray.put(t)
                x = ray.get(ref)
                del x, ref
            rec.time_op(key("put_get", nbytes), put_get, nbytes)

        with rec.guard("worker"):
            w = Worker.remote()
            ray.get(w.noop.remote())
            for nbytes, t in tensors.items():
                def xproc_get(t: torch.Tensor = t) -> float:
                    ref = ray.put(t)
                    return ray.get(w.total.remote([ref]))
                rec.time_op(key("xproc_get", nbytes), xproc_get, nbytes)
            for nbytes, t in tensors.items():
                def get_only(t: torch.Tensor = t) -> float:
                    ref = ray.put(t)
                    return ray.get(w.get_seconds.remote([ref]))
                rec.time_op(key("get_only", nbytes), get_only, nbytes, self_timed=True)
            rec.time_op("actor_rtt", lambda: ray.get(w.noop.remote()))
            ray.kill(w)

        with rec.guard("actor_learner"):
            producers = [Producer.remote(cfg.rollout_shape, i) for i in range(2)]
            pending = {p.rollout.remote(): p for p in producers}
            rec.time_rate("actor_learner", lambda: learner_step(pending))
            ray.get(list(pending))
            for p in producers:
                ray.kill(p)

        _dataplane(cfg, rec)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    from common import system_main

    system_main("ray", run)
