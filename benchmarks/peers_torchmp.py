"""Peer: plain torch.multiprocessing, written the way its docs suggest.

Each message carries a fresh shared tensor (allocated in shared memory and filled with one
copy: `torch.empty_like(t).share_memory_().copy_(t)`, cheaper than letting the queue move a
clone) through an `mp.Queue`; answers come back through a second queue. Processes use the
spawn context, like torchactors. There is no object store, so put_get does not apply.

Run as `python -m peers_torchmp --config JSON --out FILE`.
"""
from __future__ import annotations

import multiprocessing.forkserver
import os
import queue as queue_mod
import time
from typing import Any

import torch
import torch.multiprocessing as mp
from common import (
    QUEUE_MAXSIZE,
    QUEUE_PRODUCERS,
    QUEUE_SIZES,
    WEIGHT_READERS,
    Config,
    Recorder,
    idle_pss,
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

MPQUEUE_ENV = "TORCHACTORS_BENCH_MPQUEUE"   # "1": run queue_throughput on multiprocessing.Queue only


def fresh_shared(t: torch.Tensor) -> torch.Tensor:
    """A new shared-memory tensor holding a copy of t."""
    return torch.empty_like(t).share_memory_().copy_(t)


def _worker(requests: Any, answers: Any) -> None:
    """The 'actor': ('sum', tensor) -> float(x.sum()); ('noop', None) -> None."""
    torch.set_num_threads(1)
    while True:
        op, x = requests.get()
        if op == "sum":
            answers.put(float(x.sum()))
        elif op == "noop":
            answers.put(None)
        else:
            break
        del x


def _producer(idx: int, shape: tuple[int, ...], credits: Any, rollouts: Any) -> None:
    """Sends a fresh shared snapshot of its buffer each time the learner hands it a credit."""
    torch.set_num_threads(1)
    buf = make_rollout_buffer(shape, seed=idx)
    while credits.get() is not None:
        rollouts.put((idx, fresh_shared(buf)))


class _Learner:
    """Driver side of actor_learner: one rollout in flight per producer."""

    def __init__(self, ctx: Any, n: int, shape: tuple[int, ...]) -> None:
        self.rollouts = ctx.Queue()
        self.credits = [ctx.Queue() for _ in range(n)]
        self.procs = [ctx.Process(target=_producer, args=(i, shape, self.credits[i], self.rollouts),
                                  daemon=True) for i in range(n)]
        for p in self.procs:
            p.start()
        for c in self.credits:
            c.put(1)
        self.outstanding = n

    def step(self) -> None:
        idx, x = self.rollouts.get()
        self.credits[idx].put(1)  # the producer may snapshot the next while we read this one
        touch(x)

    def close(self) -> None:
        for _ in range(self.outstanding):
            try:
                self.rollouts.get(timeout=10)
            except queue_mod.Empty:
                break
        for c in self.credits:
            c.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


# -- start-up: actor_start[N] with spawn, and with forkserver + set_forkserver_preload(["torch"]) -------

def _idle(conn: Any) -> None:
    """The 'actor' of actor_start: answers no-op requests until told to stop."""
    while conn.recv() == "noop":
        conn.send(None)


def _start_procs(ctx: Any, n: int) -> tuple[list, list, float]:
    """n processes answering a no-op request: (processes, pipes, seconds from nothing)."""
    t0 = time.perf_counter()
    pipes = [ctx.Pipe() for _ in range(n)]
    procs = [ctx.Process(target=_idle, args=(child,), daemon=True) for _, child in pipes]
    for p in procs:
        p.start()
    for parent, _ in pipes:
        parent.send("noop")
    for parent, _ in pipes:
        parent.recv()
    return procs, pipes, time.perf_counter() - t0


def _stop_procs(procs: list, pipes: list) -> None:
    for parent, child in pipes:
        parent.send("exit")
        parent.close()
        child.close()
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()


def _startup(cfg: Config, rec: Recorder) -> None:
    """actor_start[N] (spawn: each process imports torch) and actor_start_forkserver[N] (the
    server imports torch once; each rep starts a fresh server, so its start is counted, as
    torchactors' zygote is); actor_pss of idle processes of both (bytes)."""
    reps = startup_reps(cfg)
    for method, name in (("spawn", "actor_start"), ("forkserver", "actor_start_forkserver")):
        ctx = mp.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(["torch"])
        for n in start_ns(cfg):
            with rec.guard(f"{name}[{n}]"):
                samples = []
                # spawn x32 costs a torch import per process (about 30 s here): one sample.
                for _ in range(1 if method == "spawn" and n >= 32 else reps):
                    procs, pipes, seconds = _start_procs(ctx, n)
                    samples.append(seconds)
                    if n == 8 and len(samples) == 1:
                        rec.add(f"actor_pss[{method}]", idle_pss([p.pid for p in procs]), section="extra")
                    _stop_procs(procs, pipes)
                    if method == "forkserver":
                        # A private helper CPython's own tests use: the next rep starts a new server.
                        multiprocessing.forkserver._forkserver._stop()
                rec.add(f"{name}[{n}]", summarize(samples))
# -- data plane: weight_sync and queue_throughput ------------------------------------------------

def _weight_reader(shared: dict, versions: Any, answers: Any) -> None:
    """weight_sync: holds the shared tensors; answers each version number it is sent."""
    torch.set_num_threads(1)
    while True:
        v = versions.get()
        if v is None:
            break
        answers.put(v if len(shared) else -1)


def _queue_producer(ctrl: Any, data: Any, as_bytes: bool) -> None:
    """queue_throughput: on ('go', n, nbytes) puts n items; 1 MB ones are fresh shared tensors
    (torch.mp) or bytes pickled by value (plain multiprocessing, which has no tensor sharing)."""
    torch.set_num_threads(1)
    cache: dict[int, Any] = {}
    while True:
        msg = ctrl.get()
        if msg is None:
            break
        _, n, nbytes = msg
        item = cache.setdefault(nbytes, queue_item(nbytes))
        for _ in range(n):
            if isinstance(item, torch.Tensor):
                data.put(bytes(item.numpy()) if as_bytes else fresh_shared(item))
            else:
                data.put(item)


def _weight_sync(ctx: Any, cfg: Config, rec: Recorder) -> None:
    """Copy into shared tensors the readers were given at start, then a version per reader."""
    src = make_state_dict(cfg)
    shared = {k: torch.empty_like(t).share_memory_() for k, t in src.items()}
    versions = [ctx.Queue() for _ in range(WEIGHT_READERS)]
    answers = ctx.Queue()
    procs = [ctx.Process(target=_weight_reader, args=(shared, q, answers), daemon=True) for q in versions]
    for p in procs:
        p.start()
    state = {"v": 0}
    try:
        def sync() -> None:
            state["v"] += 1
            with torch.no_grad():
                for k, t in src.items():
                    shared[k].copy_(t)
            for q in versions:
                q.put(state["v"])
            got = [answers.get() for _ in versions]
            if got != [state["v"]] * len(versions):
                raise RuntimeError(f"readers answered {got}")
        sync()  # every reader is up
        rec.time_op(weight_sync_key(cfg), sync, sum(t.nbytes for t in src.values()))
    finally:
        for q in versions:
            q.put(None)
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


def _queue_throughput(ctx: Any, cfg: Config, rec: Recorder, as_bytes: bool) -> None:
    data = ctx.Queue(maxsize=QUEUE_MAXSIZE)
    ctrls = [ctx.Queue() for _ in range(QUEUE_PRODUCERS)]
    procs = [ctx.Process(target=_queue_producer, args=(c, data, as_bytes), daemon=True) for c in ctrls]
    for p in procs:
        p.start()
    try:
        for nbytes in QUEUE_SIZES:
            n = queue_messages(cfg, nbytes)

            def rounds(n: int = n, nbytes: int = nbytes) -> float:
                t0 = time.perf_counter()
                for c in ctrls:
                    c.put(("go", n, nbytes))
                for _ in range(n * len(ctrls)):
                    x = data.get()
                del x
                return (time.perf_counter() - t0) / (n * len(ctrls))
            rec.time_op(queue_key(nbytes), rounds, nbytes, self_timed=True)
    finally:
        for c in ctrls:
            c.put(None)
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


def run_mpqueue(cfg: Config, rec: Recorder) -> None:
    """The 'mpqueue' system: queue_throughput on the standard library's multiprocessing.Queue."""
    import multiprocessing

    with rec.guard("queue_throughput"):
        _queue_throughput(multiprocessing.get_context("spawn"), cfg, rec, as_bytes=True)


def run(cfg: Config, rec: Recorder) -> None:
    if os.environ.get(MPQUEUE_ENV) == "1":
        run_mpqueue(cfg, rec)
        return
    ctx = mp.get_context("spawn")
    tensors = {n: make_tensor(n) for n in cfg.sizes}
    memcpy(rec, tensors)
    _startup(cfg, rec)

    requests, answers = ctx.Queue(), ctx.Queue()
    worker = ctx.Process(target=_worker, args=(requests, answers), daemon=True)
    worker.start()
    try:
        def xproc_get(t: torch.Tensor) -> float:
            requests.put(("sum", fresh_shared(t)))
            return answers.get()

        def rtt() -> None:
            requests.put(("noop", None))
            answers.get()

        rtt()  # wait for the worker to be up
        for nbytes, t in tensors.items():
            rec.time_op(key("xproc_get", nbytes), lambda t=t: xproc_get(t), nbytes)
        rec.time_op("actor_rtt", rtt)
    finally:
        requests.put(("exit", None))
        worker.join(timeout=10)
        if worker.is_alive():
            worker.terminate()

    with rec.guard("actor_learner"):
        learner = _Learner(ctx, 2, cfg.rollout_shape)
        try:
            rec.time_rate("actor_learner", learner.step)
        finally:
            learner.close()

    with rec.guard("weight_sync"):
        _weight_sync(ctx, cfg, rec)
    with rec.guard("queue_throughput"):
        _queue_throughput(ctx, cfg, rec, as_bytes=False)


if __name__ == "__main__":
    from common import system_main

    system_main("torchmp", run)
