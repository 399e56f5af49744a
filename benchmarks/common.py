"""Shared pieces of the benchmark: sizes, tensors, timing loops, and the JSON recorder.

Every system (torchactors, each peer, the hand-written reference) runs in its own fresh
process through `system_main`, so that one system's threads, shared memory and daemons never
leak into another's numbers. They all time their operations with the same loops defined here,
on the same tensors, with one intra-op thread per process.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

KB = 1 << 10
MB = 1 << 20
GB = 1 << 30

ROLLOUT_SHAPE = (80, 8, 4, 84, 84)  # uint8, 18 MB: one actor_learner rollout (BENCH.md)
TINY_ROLLOUT_SHAPE = (8, 8, 4, 84, 84)  # 1.8 MB, for --tiny

# Env for every benchmark process and its children (actors, Ray workers, spawned queues):
# oversubscribed intra-op threads cost 30x on this 2-core machine.
BACKEND_ENV = "TORCHACTORS_BENCH_BACKEND"   # "ray": torchactors' workloads on its Ray backend
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

_UNITS = {"B": 1, "KB": KB, "MB": MB, "GB": GB, "KIB": KB, "MIB": MB, "GIB": GB}


def parse_size(text: str) -> int:
    """'4KB' -> 4096 (binary units, as in BENCH.md)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS | {"": 1}:
        raise ValueError(f"bad size {text!r}; use e.g. 4KB, 1MB, 256MB")
    return int(m.group(1)) * _UNITS.get(m.group(2).upper(), 1)


def fmt_size(nbytes: int) -> str:
    """4096 -> '4KB': the label used in workload names."""
    for unit, scale in (("GB", GB), ("MB", MB), ("KB", KB)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


def key(workload: str, nbytes: int | None = None) -> str:
    """Result name: 'put_get[4KB]', or the bare workload name when it has no size."""
    return workload if nbytes is None else f"{workload}[{fmt_size(nbytes)}]"


def make_tensor(nbytes: int) -> torch.Tensor:
    """The benchmark tensor of one size: torch.rand float32, seeded so every system gets the same."""
    gen = torch.Generator().manual_seed(nbytes)
    return torch.rand(max(nbytes // 4, 1), generator=gen, dtype=torch.float32)


def make_rollout_buffer(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A producer's preallocated uint8 rollout buffer (filled once, snapshotted per rollout)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)


def touch(x: torch.Tensor) -> int:
    """What the learner does with a rollout: read every 4096th byte (one per page)."""
    return int(x.reshape(-1)[::4096].sum())


def single_thread() -> None:
    """One intra-op thread in this process, whatever the library defaults."""
    os.environ.update(THREAD_ENV)
    torch.set_num_threads(1)


@dataclass
class Config:
    """What one system process is asked to run (passed as JSON on its command line)."""

    sizes: list[int] = field(default_factory=lambda: [4 * KB, MB, 64 * MB, 256 * MB])
    reps: int | None = None
    tiny: bool = False
    scaling: bool = False
    label: str = ""

    @property
    def rollout_shape(self) -> tuple[int, ...]:
        return TINY_ROLLOUT_SHAPE if self.tiny else ROLLOUT_SHAPE

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls(**json.loads(text))


WARM_S = 0.3


def plan(cfg: Config, nbytes: int | None) -> tuple[int, int, float]:
    """(warm-up reps, max reps, time budget in s) for one workload.

    Fewer reps for big sizes so the default run stays under 10 minutes even for Ray's 0.7 s
    operations; at least 5 reps are always kept once the budget runs out.
    """
    if cfg.tiny:
        return 1, cfg.reps or 3, math.inf
    if nbytes is None:  # latency workloads (actor_rtt): many cheap reps
        warm, reps = 50, 2000
    elif nbytes <= 64 * KB:
        warm, reps = 20, 500
    elif nbytes <= MB:
        warm, reps = 5, 200
    elif nbytes <= 16 * MB:
        warm, reps = 2, 40
    elif nbytes <= 64 * MB:
        warm, reps = 1, 15
    else:
        warm, reps = 1, 7
    if cfg.reps:  # explicit --reps: exactly that many, no budget cut
        return min(warm, cfg.reps), cfg.reps, math.inf
    return warm, reps, 3.0


def summarize(samples: list[float], unit: str = "s") -> dict[str, Any]:
    """Median (the figure the table uses) plus enough to judge the noise."""
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
        "unit": unit,
        "samples": samples,
    }


def time_op(fn: Callable[[], Any], cfg: Config, nbytes: int | None = None,
            self_timed: bool = False) -> dict[str, Any]:
    """Median seconds of fn() over adaptive reps after warm-up.

    With self_timed, fn returns its own duration (e.g. measured inside an actor).
    """
    warm, reps, budget = plan(cfg, nbytes)
    # At least WARM_S of warm-up for cheap operations: on this VM the first ~200 calls after an
    # idle moment run 2-3x slower (CPU wake-up), whichever system makes them.
    warm_until = time.perf_counter() + (0 if cfg.tiny else WARM_S)
    done = 0
    while done < warm or (done < reps and time.perf_counter() < warm_until):
        fn()
        done += 1
    samples: list[float] = []
    start = time.perf_counter()
    for i in range(reps):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        if self_timed:
            if not isinstance(out, (int, float)):
                raise RuntimeError(f"self-timed operation returned {out!r}, not a duration")
            dt = float(out)
        samples.append(dt)
        if i + 1 >= 5 and time.perf_counter() - start > budget:
            break
    return summarize(samples)


def time_rate(step: Callable[[], Any], cfg: Config) -> dict[str, Any]:
    """Seconds per step() over timed windows after a warm-up; also reports steps per second.

    The median is taken over windows (each window: elapsed / steps), since single steps of a
    pipelined producer/consumer loop are not independent.
    """
    warm_s, window_s, windows = (0.2, 0.2, 4) if cfg.tiny else (1.0, 1.0, 6)
    end = time.perf_counter() + warm_s
    while time.perf_counter() < end:
        step()
    per_window: list[float] = []
    total = 0
    for _ in range(windows):
        t0 = time.perf_counter()
        n = 0
        while True:
            step()
            n += 1
            if time.perf_counter() - t0 >= window_s:
                break
        per_window.append((time.perf_counter() - t0) / n)
        total += n
    res = summarize(per_window)
    res["rate"] = 1.0 / res["median"]
    res["steps"] = total
    return res


def scale(result: dict[str, Any], factor: float) -> dict[str, Any]:
    """A timing result with every duration multiplied by factor (e.g. per call from per round)."""
    out = dict(result)
    for k in ("median", "min", "max"):
        out[k] = result[k] * factor
    out["samples"] = [s * factor for s in result["samples"]]
    if "rate" in result:
        out["rate"] = 1.0 / out["median"]
    return out


class Recorder:
    """Collects one system's results and rewrites its JSON file after each one.

    Rewriting as we go means a run that hangs or crashes and is killed by bench.py still
    hands back everything measured up to that point.
    """

    def __init__(self, system: str, cfg: Config, path: str) -> None:
        self.cfg = cfg
        self.path = path
        self.data: dict[str, Any] = {
            "system": system, "config": json.loads(cfg.to_json()), "results": {},
            "scaling": {}, "extra": {}, "errors": {}, "versions": _versions(),
        }
        self.flush()

    def flush(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)

    def add(self, name: str, result: dict[str, Any], section: str = "results") -> None:
        self.data[section][name] = result
        if "median" in result:
            extra = f" ({result['rate']:.1f}/s)" if "rate" in result else ""
            log.info("%s %s: median %.3g s%s", self.data["system"], name, result["median"], extra)
        self.flush()

    @contextlib.contextmanager
    def guard(self, name: str) -> Iterator[None]:
        """Record an exception under name and carry on with the next workload."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - a failed workload must not stop the others
            log.error("%s %s failed: %s", self.data["system"], name, exc)
            log.debug("%s", traceback.format_exc())
            self.data["errors"][name] = f"{type(exc).__name__}: {exc}"
            self.flush()

    def time_op(self, name: str, fn: Callable[[], Any], nbytes: int | None = None,
                self_timed: bool = False) -> None:
        with self.guard(name):
            self.add(name, time_op(fn, self.cfg, nbytes, self_timed))

    def time_rate(self, name: str, step: Callable[[], Any]) -> None:
        with self.guard(name):
            self.add(name, time_rate(step, self.cfg))


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for mod in ("ray", "torchactors"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


def memcpy(rec: Recorder, tensors: dict[int, torch.Tensor]) -> None:
    """memcpy[size]: t.clone() in this process, the physical reference for one copy."""
    for nbytes, t in tensors.items():
        rec.time_op(key("memcpy", nbytes), t.clone, nbytes)


# -- start-up workloads (actor_start[N], restart_latency, actor_pss) -----------------------------------

START_NS = (1, 8, 32)       # actor_start[N]: from init to N actors answering a no-op call


def start_ns(cfg: Config) -> tuple[int, ...]:
    return START_NS[:2] if cfg.tiny else START_NS


def startup_reps(cfg: Config) -> int:
    """Each start-up sample starts a runtime from nothing: few, and one in a smoke run."""
    return 1 if cfg.tiny else (cfg.reps or 3)


def idle_pss(pids: list[int]) -> dict[str, Any]:
    """PSS in bytes of each idle process (shared pages divided among their sharers)."""
    import psutil

    samples = [float(psutil.Process(pid).memory_full_info().pss) for pid in pids]
    return {**summarize(samples, unit="B"), "processes": len(pids)}


BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)


def _export_path() -> None:
    """Child processes (actors, Ray workers) import this directory's modules by name."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    for p in (REPO_ROOT, BENCH_DIR):
        if p not in parts:
            parts.insert(0, p)
    os.environ["PYTHONPATH"] = os.pathsep.join(parts)


def system_main(system: str, run: Callable[[Config, Recorder], None]) -> None:
    """Entry point of one system's process: `python -m MODULE --config JSON --out FILE`."""
    ap = argparse.ArgumentParser(description=f"benchmark workloads for {system}")
    ap.add_argument("--config", default=Config().to_json(), help="Config as JSON")
    ap.add_argument("--out", required=True, help="where to write this system's results")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=f"[{system}] %(message)s", stream=sys.stderr)
    single_thread()
    _export_path()
    cfg = Config.from_json(args.config)
    rec = Recorder(cfg.label or system, cfg, args.out)
    code = 0
    try:
        run(cfg, rec)
    except Exception as exc:  # noqa: BLE001 - reported in the JSON, bench.py goes on
        log.exception("%s: run failed", system)
        rec.data["errors"]["__run__"] = f"{type(exc).__name__}: {exc}"
        code = 1
    rec.data["versions"] = _versions()
    rec.flush()
    logging.shutdown()
    sys.stdout.flush()
    # Skip interpreter teardown: daemon threads of some runtimes can hang it.
    os._exit(code)


# -- data plane workloads (weight_sync, queue_throughput): shared by every system ----------------

WEIGHT_TENSORS = 100
WEIGHT_READERS = 4
QUEUE_PRODUCERS = 2
QUEUE_MAXSIZE = 1000
QUEUE_SIZES = (64, MB)              # 64-byte messages, 1 MB tensors


def weight_sync_key(cfg: Config) -> str:
    """'weight_sync[100MB, 100 tensors, 4 readers]' (1 MB in total with --tiny)."""
    return f"weight_sync[{fmt_size(weight_bytes(cfg))}, {WEIGHT_TENSORS} tensors, {WEIGHT_READERS} readers]"


def weight_bytes(cfg: Config) -> int:
    return (MB if cfg.tiny else 100 * MB)


def make_state_dict(cfg: Config) -> dict[str, torch.Tensor]:
    """100 float32 tensors of equal size, 100 MB in all (the weight_sync payload)."""
    n = weight_bytes(cfg) // WEIGHT_TENSORS // 4
    gen = torch.Generator().manual_seed(7)
    return {f"layer{i}.weight": torch.rand(n, generator=gen) for i in range(WEIGHT_TENSORS)}


def queue_key(nbytes: int) -> str:
    return key("queue_throughput", nbytes)


def queue_messages(cfg: Config, nbytes: int, slow: bool = False) -> int:
    """Messages per producer in one timed round (fewer for Ray's ~800 msg/s queue)."""
    n = (200 if nbytes <= 64 else 50) if slow else (20_000 if nbytes <= 64 else 1_000)
    return max(10, n // 20) if cfg.tiny else n


def queue_item(nbytes: int) -> Any:
    """64 B: a bytes message; larger: a float32 tensor of that size."""
    return b"x" * nbytes if nbytes <= 64 else make_tensor(nbytes)
