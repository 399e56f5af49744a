"""Smoke test of the benchmark harness: `bench.py --tiny` runs and reports every workload.

It checks only that each torchactors workload produced a median; it asserts no timing
(these machines are shared and noisy; BENCH.md targets are read from a full run).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_WORKLOADS = [f"{w}[{s}]" for w in ("memcpy", "put_get", "xproc_get") for s in ("4KB", "64KB")]
TINY_WORKLOADS += ["actor_rtt", "actor_learner"]
TINY_WORKLOADS += ["actor_start[1]", "actor_start[8]", "actor_start_next[8]", "restart_latency"]
TINY_WORKLOADS += ["weight_sync[1MB, 100 tensors, 4 readers]", "queue_throughput[64B]", "queue_throughput[1MB]"]


@pytest.mark.timeout(330)  # the run's own limit is 300 s; the suite default (180 s) is lower
def test_bench_tiny_reports_every_torchactors_workload(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--tiny",
                           "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "torchactors" in proc.stdout
    doc = json.loads(out.read_text())
    ta = doc["systems"]["torchactors"]
    assert ta["status"] == "ok", (ta["status"], ta.get("errors"))
    for name in TINY_WORKLOADS:
        res = ta["results"].get(name)
        assert res is not None, f"no result for {name}; errors: {ta.get('errors')}"
        assert isinstance(res["median"], float) and math.isfinite(res["median"]), (name, res)
    assert "rate" in ta["results"]["actor_learner"]
    assert {t["target"] for t in doc["targets"]}, "no BENCH.md targets evaluated"
