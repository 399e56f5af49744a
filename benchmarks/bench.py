"""Side-by-side benchmark of torchactors, Ray and torch.multiprocessing (BENCH.md).

    python benchmarks/bench.py [--peers ray,torchmp] [--sizes 4KB,1MB,64MB,256MB] [--reps N]
                               [--json FILE] [--tiny] [--scaling] [--rounds K] [--timeout S]
    python benchmarks/plot.py FILE OUT.png

Each system runs its workloads in its own fresh process (`python -m MODULE`), so that Ray's
daemons and torch.multiprocessing's shared memory never leak into torchactors' numbers; this
driver only collects their JSON, prints one table with the ratios, and checks BENCH.md's
targets. Ray runs twice: as shipped and with RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import report  # noqa: E402
from common import BACKEND_ENV, BENCH_DIR, REPO_ROOT, THREAD_ENV, Config, parse_size  # noqa: E402

log = logging.getLogger("bench")

DEFAULT_SIZES = "4KB,1MB,64MB,256MB"
TINY_SIZES = "4KB,64KB"
ZERO_COPY_ENV = "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"
MPQUEUE_ENV = "TORCHACTORS_BENCH_MPQUEUE"   # peers_torchmp runs multiprocessing.Queue only


Env = dict[str, "str | None"]  # None: remove the variable


def plan_systems(peers: list[str], notes: list[str]) -> list[tuple[str, str, Env]]:
    """(label, module, env changes) of every system to run, torchactors first, reference last."""
    systems: list[tuple[str, str, Env]] = [("torchactors", "workloads_torchactors", {})]
    for peer in peers:
        if peer == "ray":
            if importlib.util.find_spec("ray") is None:
                notes.append("note: ray is not installed (pip install 'torchactors[bench]'); "
                             "skipped ray and ray-zerocopy")
                continue
            systems.append(("ray", "peers_ray", {ZERO_COPY_ENV: None}))
            systems.append(("ray-zerocopy", "peers_ray", {ZERO_COPY_ENV: "1"}))
            # torchactors' own Ray backend: Ray carries the calls, our store the tensors.
            systems.append(("ta-on-ray", "workloads_torchactors", {BACKEND_ENV: "ray"}))
        elif peer == "torchmp":
            systems.append(("torchmp", "peers_torchmp", {}))
            # queue_throughput on the standard library's multiprocessing.Queue (same module).
            systems.append(("mpqueue", "peers_torchmp", {MPQUEUE_ENV: "1"}))
        else:
            raise SystemExit(f"unknown peer {peer!r}; choose from ray, torchmp")
    systems.append(("reference", "reference", {}))
    return systems


def _kill_group(pgid: int, grace: float = 0.0) -> bool:
    """Kill whatever is left of a system's process group after `grace` seconds (helpers such
    as multiprocessing's resource tracker exit on their own shortly after their parent);
    True if something had to be killed."""
    deadline = time.monotonic() + grace
    try:
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)
            time.sleep(0.05)
        os.killpg(pgid, signal.SIGKILL)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def run_system(label: str, module: str, env_changes: Env, cfg: Config,
               timeout: float) -> dict[str, Any]:
    """Run one system in a fresh process and return its results (partial ones on failure)."""
    cfg = Config(**{**cfg.__dict__, "label": label})
    fd, out = tempfile.mkstemp(prefix=f"bench-{label}-", suffix=".json")
    os.close(fd)
    os.unlink(out)
    env = {**os.environ, **THREAD_ENV}
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    env["PYTHONPATH"] = os.pathsep.join(
        [BENCH_DIR, REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", module, "--config", cfg.to_json(), "--out", out]
    log.info("running %s ...", label)
    t0 = time.perf_counter()
    # stdout goes to our stderr: our stdout carries only the table.
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=sys.stderr.fileno(),
                            start_new_session=True)
    status = "ok"
    try:
        rc = proc.wait(timeout=timeout)
        if rc != 0:
            status = f"exited with code {rc}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout:.0f} s (partial results)"
        _kill_group(proc.pid)
        proc.wait()
    if _kill_group(proc.pid, grace=3.0):
        log.warning("%s left processes behind after 3 s; killed them", label)
    try:
        with open(out) as f:
            data = json.load(f)
        os.unlink(out)
    except (OSError, ValueError):
        data = {"system": label, "results": {}, "scaling": {}, "extra": {}, "errors": {}}
        status += "; no results file" if status != "ok" else "no results file"
    data["status"] = status
    data["wall_s"] = time.perf_counter() - t0
    if status != "ok" or data.get("errors"):
        log.warning("%s: %s; errors: %s", label, status, data.get("errors"))
    log.info("%s done in %.0f s", label, data["wall_s"])
    return data


def _merge_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One workload over several rounds: the median of the rounds' medians."""
    meds = [r["median"] for r in results]
    out = {**results[-1], "median": statistics.median(meds), "round_medians": meds,
           "min": min(r["min"] for r in results), "max": max(r["max"] for r in results),
           "n": sum(r.get("n", 1) for r in results),
           "samples": [x for r in results for x in r.get("samples", [])]}
    if "rate" in out:
        out["rate"] = 1.0 / out["median"]
    return out


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """A system's results over --rounds runs (one run: unchanged)."""
    if len(rounds) == 1:
        return rounds[0]
    out = dict(rounds[-1])
    names = {n for r in rounds for n in r.get("results", {})}
    out["results"] = {n: _merge_result([r["results"][n] for r in rounds if n in r.get("results", {})])
                      for n in sorted(names)}
    scaling: dict[str, dict[str, Any]] = {}
    for workload in {w for r in rounds for w in (r.get("scaling") or {})}:
        per_n = [r["scaling"].get(workload, {}) for r in rounds if r.get("scaling")]
        ns = {n for d in per_n for n in d}
        scaling[workload] = {n: _merge_result([d[n] for d in per_n if n in d]) for n in ns}
    out["scaling"] = scaling
    leaks = [r["extra"]["leak"] for r in rounds if "leak" in r.get("extra", {})]
    if leaks:  # the worst round counts
        out["extra"] = {**out.get("extra", {}), "leak": max(leaks, key=lambda x: max(x["growth"].values()))}
    out["errors"] = {k: v for r in rounds for k, v in r.get("errors", {}).items()}
    statuses = {r["status"] for r in rounds}
    out["status"] = "ok" if statuses == {"ok"} else "; ".join(sorted(statuses - {"ok"}))
    out["wall_s"] = sum(r.get("wall_s", 0.0) for r in rounds)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default=None,
                    help="comma list of ray, torchmp ('none' for none); default ray,torchmp "
                         "(none with --tiny)")
    ap.add_argument("--sizes", default=None, help=f"default {DEFAULT_SIZES} ({TINY_SIZES} with --tiny)")
    ap.add_argument("--reps", type=int, default=None,
                    help="exact reps per workload (default: adaptive per size, at least 5)")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--tiny", action="store_true",
                    help="smoke run: 4KB and 64KB, 3 reps, no peers, ~1 s actor_learner")
    ap.add_argument("--scaling", action="store_true",
                    help="also actor_rtt and actor_learner with 1..4 actors (torchactors)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every system this many times, alternating, and report the median "
                         "of the rounds' medians (evens out load drift on shared machines)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds allowed per system (default 480, 150 with --tiny)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="[bench] %(message)s", stream=sys.stderr)
    peers_arg = args.peers if args.peers is not None else ("none" if args.tiny else "ray,torchmp")
    peers = [p.strip() for p in peers_arg.split(",") if p.strip() and p.strip() != "none"]
    sizes = [parse_size(s) for s in (args.sizes or (TINY_SIZES if args.tiny else DEFAULT_SIZES)).split(",")]
    reps = args.reps if args.reps is not None else (3 if args.tiny else None)
    cfg = Config(sizes=sizes, reps=reps, tiny=args.tiny, scaling=args.scaling)
    timeout = args.timeout or (150.0 if args.tiny else 480.0)

    notes: list[str] = []
    systems = plan_systems(peers, notes)
    for n in notes:
        log.info("%s", n)
    t0 = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in systems}
    for r in range(args.rounds):
        if args.rounds > 1:
            log.info("round %d of %d", r + 1, args.rounds)
        for label, module, env in systems:
            runs[label].append(run_system(label, module, env, cfg, timeout))
    results = {label: merge_rounds(rs) for label, rs in runs.items()}
    text, rows, checks = report.render(results, sizes)

    for label, data in results.items():
        if data["status"] != "ok" or data.get("errors"):
            notes.append(f"note: {label}: {data['status']}; errors: {data.get('errors') or 'none'}")
    print("\n".join(notes + [text]) if notes else text, flush=True)
    log.info("total %.0f s", time.perf_counter() - t0)

    if args.json:
        doc = {
            "meta": {"argv": sys.argv, "config": json.loads(cfg.to_json()), "peers": peers,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
                     "cpus": os.cpu_count(), "platform": platform.platform(),
                     "wall_s": time.perf_counter() - t0},
            "systems": results, "table": rows, "targets": checks, "notes": notes,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
