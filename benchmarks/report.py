"""Turns the systems' results into the one comparison table and the BENCH.md target checks.

Ratios are always peer time / torchactors time, so > 1 means torchactors is faster; for
actor_learner (shown in rollouts/s) that is torchactors rate / peer rate.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import START_NS, fmt_size, key

SYSTEMS = ("torchactors", "ray", "ray-zerocopy", "ta-on-ray", "torchmp", "mpqueue", "reference")
SHORT = {"ray": "ray", "ray-zerocopy": "ray-zc", "ta-on-ray": "ta-ray", "torchmp": "torchmp", "mpqueue": "mpq",
         "reference": "ref"}
SIZED = ("memcpy", "put_get", "xproc_get", "get_only")
RATE_WORKLOADS = ("actor_learner",)
STARTUP_WORKLOADS = tuple(f"{w}[{n}]" for n in START_NS
                          for w in ("actor_start", "actor_start_forkserver", "actor_start_next")) + ("restart_latency",)

Results = dict[str, dict[str, Any]]  # system label -> that system's JSON


def median(results: Results, system: str, name: str) -> float | None:
    """Median seconds per operation of one workload, or None if not measured."""
    r = results.get(system, {}).get("results", {}).get(name)
    if not r or "median" not in r or not math.isfinite(r["median"]):
        return None
    return float(r["median"])


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# The data plane's rows (their names carry their own sizes; see common.py).
DATAPLANE = ("weight_sync[100MB, 100 tensors, 4 readers]", "weight_sync[1MB, 100 tensors, 4 readers]",
             "queue_throughput[64B]", "queue_throughput[1MB]")
WEIGHT_SYNC = DATAPLANE[0]


def workload_names(sizes: list[int]) -> list[str]:
    return ([key(w, n) for w in SIZED for n in sizes] + ["actor_rtt", "actor_learner"] + list(STARTUP_WORKLOADS)
            + list(DATAPLANE))


def build_rows(results: Results, sizes: list[int]) -> list[dict[str, Any]]:
    """One row per workload: value per system (s, or rollouts/s) and ratio per peer."""
    systems = [s for s in SYSTEMS if s in results]
    rows = []
    for name in workload_names(sizes):
        meds = {s: median(results, s, name) for s in systems}
        if all(v is None for v in meds.values()) and not any(
                name in results[s].get("errors", {}) for s in systems):
            continue
        is_rate = name in RATE_WORKLOADS
        values = {s: (None if v is None else (1.0 / v if is_rate else v)) for s, v in meds.items()}
        ratios = {s: _div(meds[s], meds.get("torchactors")) for s in systems if s != "torchactors"}
        failed = [s for s in systems if meds[s] is None
                  and name in results[s].get("errors", {})]
        rows.append({"workload": name, "unit": "rollouts/s" if is_rate else "s",
                     "values": values, "ratios": ratios, "failed": failed})
    return rows


def _fmt(v: float | None, rate: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if rate else f"{v:.3g}"


def _grid(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths, strict=False)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body])


def render_table(rows: list[dict[str, Any]], systems: list[str]) -> str:
    peers = [s for s in systems if s != "torchactors"]
    header = ["workload"] + systems + [f"{SHORT[p]}/ta" for p in peers]
    body = []
    for row in rows:
        rate = row["unit"] != "s"
        name = row["workload"] + (" (rollouts/s)" if rate else "")
        body.append([name] + ["err" if s in row["failed"] else _fmt(row["values"].get(s), rate)
                              for s in systems]
                    + [_fmt(row["ratios"].get(p)) for p in peers])
    legend = ("median seconds per operation (actor_learner: rollouts per second); "
              "x/ta = peer time / torchactors time, > 1 means torchactors is faster")
    return legend + "\n" + _grid(header, body)


def render_scaling(results: Results) -> str:
    series = results.get("torchactors", {}).get("scaling") or {}
    rtt, learner = series.get("actor_rtt", {}), series.get("actor_learner", {})
    ns = sorted({int(n) for n in list(rtt) + list(learner)})
    if not ns:
        return ""
    body = []
    for n in ns:
        r, lr = rtt.get(str(n)), learner.get(str(n))
        body.append([str(n), _fmt(r and r["median"]), _fmt(r and 1.0 / r["median"], True),
                     _fmt(lr and lr["rate"], True)])
    return "torchactors scaling\n" + _grid(
        ["actors", "actor_rtt s/call", "calls/s", "actor_learner rollouts/s"], body)


@dataclass
class Target:
    """One target of BENCH.md: a measured figure compared with a bound."""

    text: str
    measure: Callable[[Results], float | None]
    op: str  # "<=" or ">="
    bound: float
    unit: str = "x"

    def check(self, results: Results) -> dict[str, Any]:
        value = self.measure(results)
        met = None if value is None else (value <= self.bound if self.op == "<=" else value >= self.bound)
        return {"target": self.text, "value": value, "op": self.op, "bound": self.bound,
                "unit": self.unit, "met": met}


def _m(system: str, name: str) -> Callable[[Results], float | None]:
    return lambda r: median(r, system, name)


def _ratio(num: tuple[str, str], den: tuple[str, str]) -> Callable[[Results], float | None]:
    return lambda r: _div(median(r, *num), median(r, *den))


def _leak_growth(results: Results) -> float | None:
    leak = results.get("torchactors", {}).get("extra", {}).get("leak")
    return None if not leak else float(max(leak["growth"].values()))


TA = "torchactors"
TARGETS = [
    Target("actor_rtt within 1.5x of a raw pipe round trip (ta/ref)",
           _ratio((TA, "actor_rtt"), ("reference", "actor_rtt")), "<=", 1.5),
    Target("actor_rtt at least 8x faster than Ray as shipped (ray/ta)",
           _ratio(("ray", "actor_rtt"), (TA, "actor_rtt")), ">=", 8),
    Target("actor_rtt at least 8x faster than Ray zero-copy (ray-zc/ta)",
           _ratio(("ray-zerocopy", "actor_rtt"), (TA, "actor_rtt")), ">=", 8),
    Target("put_get[256MB] within 1.3x of memcpy[256MB] (put_get/memcpy)",
           _ratio((TA, "put_get[256MB]"), (TA, "memcpy[256MB]")), "<=", 1.3),
    Target("get alone of 256MB in another process under 1 ms (get_only[256MB])",
           _m(TA, "get_only[256MB]"), "<=", 0.001, "s"),
    Target("xproc_get[256MB] within 1.3x of hand-written shm + pipe (ta/ref)",
           _ratio((TA, "xproc_get[256MB]"), ("reference", "xproc_get[256MB]")), "<=", 1.3),
    Target("xproc_get[4KB] under 0.2 ms", _m(TA, "xproc_get[4KB]"), "<=", 0.0002, "s"),
    Target("put_get[4KB] under 0.02 ms", _m(TA, "put_get[4KB]"), "<=", 0.00002, "s"),
    Target("actor_learner at least 5x Ray as shipped (ta/ray rollouts/s)",
           _ratio(("ray", "actor_learner"), (TA, "actor_learner")), ">=", 5),
    Target("actor_learner at least 1.2x Ray zero-copy (ta/ray-zc rollouts/s)",
           _ratio(("ray-zerocopy", "actor_learner"), (TA, "actor_learner")), ">=", 1.2),
    Target("actor_learner at least 1.5x torch.multiprocessing (ta/torchmp rollouts/s)",
           _ratio(("torchmp", "actor_learner"), (TA, "actor_learner")), ">=", 1.5),
    Target("actor_learner at least 0.8 of the two-core copy limit (ta/limit rollouts/s)",
           _ratio(("reference", "actor_learner"), (TA, "actor_learner")), ">=", 0.8),
    Target("weight_sync within 1.3x of hand-written memcpy + pipe messages (ta/ref)",
           _ratio((TA, WEIGHT_SYNC), ("reference", WEIGHT_SYNC)), "<=", 1.3),
    Target("weight_sync at least 10x faster than Ray as shipped (ray/ta)",
           _ratio(("ray", WEIGHT_SYNC), (TA, WEIGHT_SYNC)), ">=", 10),
    Target("weight_sync at least 2x faster than Ray zero-copy (ray-zc/ta)",
           _ratio(("ray-zerocopy", WEIGHT_SYNC), (TA, WEIGHT_SYNC)), ">=", 2),
    Target("queue_throughput[64B] at least torch.mp Queue's (torchmp/ta)",
           _ratio(("torchmp", "queue_throughput[64B]"), (TA, "queue_throughput[64B]")), ">=", 1),
    Target("queue_throughput[1MB] at least 5x torch.mp Queue's (torchmp/ta)",
           _ratio(("torchmp", "queue_throughput[1MB]"), (TA, "queue_throughput[1MB]")), ">=", 5),
    Target("queue_throughput[64B] at least 100x ray.util.queue (ray/ta)",
           _ratio(("ray", "queue_throughput[64B]"), (TA, "queue_throughput[64B]")), ">=", 100),
    Target("queue_throughput[1MB] at least 100x ray.util.queue (ray/ta)",
           _ratio(("ray", "queue_throughput[1MB]"), (TA, "queue_throughput[1MB]")), ">=", 100),
    Target("no growth of fds, mapped segments, /dev/shm after put/get/free cycles (max growth)",
           _leak_growth, "<=", 0, "count"),
]


def _pss(results: Results, system: str, method: str) -> float | None:
    r = results.get(system, {}).get("extra", {}).get(f"actor_pss[{method}]")
    return None if not r else float(r["median"])


# Start-up (issue 14): actor_start, restart_latency, idle memory.
TARGETS.extend([
    Target("actor_start[8] within 1.5x of forkserver + preload, server start included (ta/torchmp-fs)",
           _ratio((TA, "actor_start[8]"), ("torchmp", "actor_start_forkserver[8]")), "<=", 1.5),
    Target("each actor after the first ready within 50 ms (actor_start_next[8])",
           _m(TA, "actor_start_next[8]"), "<=", 0.05, "s"),
    Target("each actor after the first ready within 50 ms (actor_start_next[32])",
           _m(TA, "actor_start_next[32]"), "<=", 0.05, "s"),
    Target("restart_latency median of the first 3 restarts <= 0.2 s", _m(TA, "restart_latency"), "<=", 0.2, "s"),
    Target("PSS of an idle actor at most half of a spawned one's (zygote/spawn, 8 actors)",
           lambda r: _div(_pss(r, TA, "zygote"), _pss(r, TA, "spawn")), "<=", 0.5),
])


def render_pss(results: Results) -> str:
    """Median PSS of an idle process, MB, for each system and start method measured."""
    parts = [f"{system} {method} {_pss(results, system, method) / 2**20:.0f}"
             for system in SYSTEMS for method in ("zygote", "spawn", "forkserver")
             if _pss(results, system, method) is not None]
    return "" if not parts else "PSS per idle actor process, MB (8 processes): " + ", ".join(parts)


def check_targets(results: Results) -> list[dict[str, Any]]:
    return [t.check(results) for t in TARGETS]


def render_targets(checks: list[dict[str, Any]], results: Results) -> str:
    body = []
    for c in checks:
        v = c["value"]
        shown = "-" if v is None else (f"{v:.3g} s" if c["unit"] == "s" else
                                       f"{v:g}" if c["unit"] == "count" else f"{v:.3g}x")
        need = f"{c['op']} {c['bound']:g}{' s' if c['unit'] == 's' else ''}"
        verdict = "n/a" if c["met"] is None else ("MET" if c["met"] else "MISSED")
        body.append([c["target"], shown, need, verdict])
    text = "targets (BENCH.md)\n" + _grid(["target", "measured", "need", "verdict"], body)
    leak = results.get(TA, {}).get("extra", {}).get("leak")
    if leak:
        text += f"\n  (leak check: {leak['cycles']} put/get/free cycles of 4KB, growth {leak['growth']})"
    fresh = results.get("reference", {}).get("extra", {}).get("copy_limit_fresh_pages")
    if fresh:
        ta = median(results, TA, "actor_learner")
        vs = f"; torchactors reaches {fresh['median'] / ta:.2f} of it" if ta else ""
        text += (f"\n  (two-core copy limit above: copies into reused memory. At {fresh['from']}'s "
                 f"speed (fresh pages, BENCH.md's way to ~300/s) it is {fresh['rate']:.0f} "
                 f"rollouts/s{vs})")
    return text


def render(results: Results, sizes: list[int]) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """The whole printed report, plus the rows and target checks for the JSON."""
    systems = [s for s in SYSTEMS if s in results]
    rows = build_rows(results, sizes)
    checks = check_targets(results)
    parts = [f"sizes: {', '.join(fmt_size(n) for n in sizes)}", render_table(rows, systems)]
    scaling = render_scaling(results)
    if scaling:
        parts.append(scaling)
    pss = render_pss(results)
    if pss:
        parts.append(pss)
    parts.append(render_targets(checks, results))
    return "\n\n".join(parts), rows, checks
