"""torchactors side of the benchmark, written only against the public API (ARCHITECTURE.md).

Same workloads, tensors and timing loops as the peers; run in a fresh process by bench.py as
`python -m workloads_torchactors --config JSON --out FILE`.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import time
from typing import Any

import torch
from common import (
    BACKEND_ENV,
    QUEUE_MAXSIZE,
    QUEUE_PRODUCERS,
    QUEUE_SIZES,
    WEIGHT_READERS,
    Config,
    Recorder,
    idle_pss,
    key,
    make_state_dict,
    make_tensor,
    memcpy,
    queue_item,
    queue_key,
    queue_messages,
    scale,
    start_ns,
    startup_reps,
    summarize,
    time_op,
    time_rate,
    touch,
    weight_sync_key,
)
from ta_actors import Idle, Producer, QueueProducer, WeightReader, Worker

import torchactors as ta

log = logging.getLogger(__name__)

SCALING_ACTORS = (1, 2, 3, 4)


def _index(refs: list, ref: Any) -> int:
    """Position of ref in refs: wait returns the given ref objects, so identity should hit."""
    for i, r in enumerate(refs):
        if r is ref:
            return i
    return refs.index(ref)


class Learner:
    """actor_learner in the driver: n producers, one rollout in flight per producer."""

    def __init__(self, n: int, shape: tuple[int, ...]) -> None:
        self.producers = [Producer.remote(shape, i) for i in range(n)]
        self.pending = [p.rollout.remote() for p in self.producers]

    def step(self) -> None:
        ready, _ = ta.wait(self.pending, num_returns=1)
        i = _index(self.pending, ready[0])
        ref = self.pending[i]
        self.pending[i] = self.producers[i].rollout.remote()  # ask for the next before reading
        x = ta.get(ref)
        touch(x)

    def close(self) -> None:
        try:
            ta.get(self.pending, timeout=30)
        finally:
            self.pending = []
            for p in self.producers:
                ta.kill(p)


def leak_counts() -> dict[str, int]:
    """Open fds, mapped shared segments and /dev/shm entries of this process (BENCH.md target)."""
    segments = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and ("/dev/shm/" in parts[5] or "memfd:" in parts[5]):
                segments.add((parts[4], parts[5].strip()))
    shm = len(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else 0
    return {"fds": len(os.listdir("/proc/self/fd")), "segments": len(segments), "dev_shm": shm}


def leak_check(cycles: int) -> dict[str, Any]:
    """put/get/free cycles of a 4 KB tensor; counts before and after (after a warm-up)."""
    t = make_tensor(4096)

    def cycle() -> None:
        ref = ta.put(t)
        x = ta.get(ref)
        ta.free(ref)
        del x, ref

    for _ in range(200):
        cycle()
    gc.collect()
    before = leak_counts()
    t0 = time.perf_counter()
    for _ in range(cycles):
        cycle()
    seconds = time.perf_counter() - t0
    gc.collect()
    after = leak_counts()
    return {"cycles": cycles, "seconds": seconds, "before": before, "after": after,
            "growth": {k: after[k] - before[k] for k in before}}


def _core(cfg: Config, rec: Recorder, tensors: dict[int, torch.Tensor]) -> None:
    """put_get, xproc_get, get_only, actor_rtt, actor_learner, leak check."""
    for nbytes, t in tensors.items():
        def put_get(t: torch.Tensor = t) -> None:
            ref = ta.put(t)
            x = ta.get(ref)
            del x, ref
        rec.time_op(key("put_get", nbytes), put_get, nbytes)

    with rec.guard("worker"):
        w = Worker.remote()
        ta.get(w.noop.remote())
        try:
            for nbytes, t in tensors.items():
                def xproc_get(t: torch.Tensor = t) -> float:
                    ref = ta.put(t)
                    return ta.get(w.total.remote([ref]))
                rec.time_op(key("xproc_get", nbytes), xproc_get, nbytes)
            for nbytes, t in tensors.items():
                def get_only(t: torch.Tensor = t) -> float:
                    ref = ta.put(t)
                    dt = ta.get(w.get_seconds.remote([ref]))
                    if dt is None:
                        raise RuntimeError("the runtime resolved the ref before the method ran")
                    return dt
                rec.time_op(key("get_only", nbytes), get_only, nbytes, self_timed=True)
            rec.time_op("actor_rtt", lambda: ta.get(w.noop.remote()))
        finally:
            ta.kill(w)

    with rec.guard("actor_learner"):
        learner = Learner(2, cfg.rollout_shape)
        try:
            rec.time_rate("actor_learner", learner.step)
        finally:
            learner.close()

    with rec.guard("leak"):
        rec.add("leak", leak_check(1000 if cfg.tiny else 10_000), section="extra")


def _scaling(cfg: Config, rec: Recorder) -> None:
    """actor_rtt (seconds per call, one call to each of n actors per round) and actor_learner
    (n producers) for 1..4 actors."""
    series: dict[str, dict[str, Any]] = {"actor_rtt": {}, "actor_learner": {}}
    rec.data["scaling"] = series
    for n in SCALING_ACTORS:
        with rec.guard(f"scaling actor_rtt x{n}"):
            workers = [Worker.remote() for _ in range(n)]
            try:
                ta.get([w.noop.remote() for w in workers])
                res = time_op(lambda workers=workers: ta.get([w.noop.remote() for w in workers]), cfg)
                series["actor_rtt"][str(n)] = scale(res, 1.0 / n)
                log.info("scaling actor_rtt x%d: %.3g s per call", n, res["median"] / n)
            finally:
                for w in workers:
                    ta.kill(w)
            rec.flush()
    for n in SCALING_ACTORS:
        with rec.guard(f"scaling actor_learner x{n}"):
            learner = Learner(n, cfg.rollout_shape)
            try:
                res = time_rate(learner.step, cfg)
                series["actor_learner"][str(n)] = res
                log.info("scaling actor_learner x%d: %.1f rollouts/s", n, res["rate"])
            finally:
                learner.close()
            rec.flush()


# -- start-up: actor_start[N], restart_latency, idle memory (each from a fresh ta.init()) -------------

def _start_actors(n: int, start_method: str = "zygote") -> tuple[list, float, float]:
    """ta.init() and n Idle actors answering a no-op call: (handles, seconds to the first
    answer, seconds to the last), the runtime left running."""
    t0 = time.perf_counter()
    ta.init(num_threads=1, start_method=start_method)
    handles = [Idle.remote() for _ in range(n)]
    refs = [h.noop.remote() for h in handles]
    ta.wait(refs, num_returns=1)
    first = time.perf_counter() - t0
    ta.get(refs)
    return handles, first, time.perf_counter() - t0


def _startup(cfg: Config, rec: Recorder) -> None:
    """actor_start[N] and actor_start_next[N] (seconds per actor after the first);
    restart_latency (SIGKILL to the next successful call, the first 3 restarts, default
    back-off); actor_pss (PSS of an idle actor, forked and spawned, in bytes)."""
    reps = startup_reps(cfg)
    for n in start_ns(cfg):
        with rec.guard(f"actor_start[{n}]"):
            totals, nexts = [], []
            for _ in range(reps):
                _, first, last = _start_actors(n)
                ta.shutdown()
                totals.append(last)
                if n > 1:
                    nexts.append((last - first) / (n - 1))
            rec.add(f"actor_start[{n}]", summarize(totals))
            if nexts:
                rec.add(f"actor_start_next[{n}]", summarize(nexts))

    with rec.guard("restart_latency"):
        ta.init(num_threads=1)
        try:
            h = Idle.options(max_restarts=10).remote()
            pid = ta.get(h.pid.remote())
            samples = []
            for _ in range(3):      # the default back-off restarts the first 3 at once
                os.kill(pid, signal.SIGKILL)
                t0 = time.perf_counter()
                old = pid
                while pid == old:
                    try:
                        pid = ta.get(h.pid.remote(), timeout=60)
                    except ta.ActorDiedError:
                        time.sleep(0.001)
                samples.append(time.perf_counter() - t0)
            rec.add("restart_latency", summarize(samples))
        finally:
            ta.shutdown()

    if cfg.tiny:
        return
    for method in ("zygote", "spawn"):
        with rec.guard(f"actor_pss[{method}]"):
            handles, _, _ = _start_actors(8, method)
            try:
                pss = idle_pss(ta.get([h.pid.remote() for h in handles]))
                rec.add(f"actor_pss[{method}]", pss, section="extra")
            finally:
                ta.shutdown()
def _dataplane(cfg: Config, rec: Recorder) -> None:
    """weight_sync (publish until 4 reader actors hold the version) and queue_throughput
    (2 producer actors, the driver consumes)."""
    with rec.guard("weight_sync"):
        sd = make_state_dict(cfg)
        weights = ta.Weights("bench/weights")
        readers = [WeightReader.remote("bench/weights") for _ in range(WEIGHT_READERS)]
        ta.get([r.noop.remote() for r in readers])
        try:
            def sync() -> float:
                v = weights.latest()[0] + 1
                waits = [r.wait_for.remote(v) for r in readers]
                time.sleep(0.002)                   # the readers are asleep in wait_newer
                t0 = time.perf_counter()
                weights.publish(sd)
                got = ta.get(waits)
                dt = time.perf_counter() - t0
                if got != [v] * len(readers):
                    raise RuntimeError(f"readers got versions {got}, not {v}")
                return dt
            rec.time_op(weight_sync_key(cfg), sync, sum(t.nbytes for t in sd.values()), self_timed=True)
        finally:
            for r in readers:
                ta.kill(r)

    with rec.guard("queue_throughput"):
        producers = [QueueProducer.remote() for _ in range(QUEUE_PRODUCERS)]
        ta.get([p.noop.remote() for p in producers])
        q = ta.Queue(maxsize=QUEUE_MAXSIZE)
        try:
            for nbytes in QUEUE_SIZES:
                n = queue_messages(cfg, nbytes)
                item = queue_item(nbytes)

                def rounds(n: int = n, item: Any = item) -> float:
                    t0 = time.perf_counter()
                    done = [p.produce.remote(q, n, item) for p in producers]
                    for _ in range(n * len(producers)):
                        x = q.get()
                    del x
                    ta.get(done)
                    return (time.perf_counter() - t0) / (n * len(producers))
                rec.time_op(queue_key(nbytes), rounds, nbytes, self_timed=True)
        finally:
            for p in producers:
                ta.kill(p)


def run(cfg: Config, rec: Recorder) -> None:
    tensors = {n: make_tensor(n) for n in cfg.sizes}
    memcpy(rec, tensors)
    backend = os.environ.get(BACKEND_ENV, "local")
    if backend == "local":
        _startup(cfg, rec)
    ta.init(backend=backend, num_threads=1)
    try:
        _core(cfg, rec, tensors)
        if backend == "local":
            _dataplane(cfg, rec)
        if cfg.scaling and backend == "local":
            _scaling(cfg, rec)
    finally:
        ta.shutdown()


if __name__ == "__main__":
    from common import system_main

    system_main("torchactors", run)
