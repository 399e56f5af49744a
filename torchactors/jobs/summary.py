"""The end of a job: ``summary.json`` (why it stopped, its counters, the store, restarts) and the line printed for it.

Box: the runner's last step, whatever happened (end, stop, Ctrl-C, error). Everything in it is
read through the public API: ``ta.store.stats()`` and ``ta.actor_status(handle).restarts``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, TextIO

import torchactors as ta
from torchactors.jobs.config import JobConfig
from torchactors.jobs.context import JobContext

logger = logging.getLogger(__name__)

STOP_REASONS = ("target_return", "max_frames", "max_seconds", "program_end", "interrupted", "error")


def jsonable(obj: Any) -> Any:
    """Store stats and extras as JSON: dataclasses and named tuples as dicts, NaN as null."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "_asdict"):
        return jsonable(obj._asdict())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "item"):  # tensors and numpy scalars
        try:
            return jsonable(obj.item())
        except Exception:
            pass
    return str(obj)


def _restarts(handle: Any) -> int | None:
    """How often the actor behind ``handle`` was restarted, or None where the backend cannot say."""
    if not ta.is_initialized():
        return None
    try:
        status = ta.actor_status(handle)
    except Exception:       # the runtime went down with the job
        logger.debug("no status for %r", handle, exc_info=True)
        return None
    return None if status is None else status.restarts


def _actors(roles: dict[str, list]) -> dict[str, dict]:
    out = {}
    for name, handles in roles.items():
        counts = [_restarts(h) for h in handles]
        known = [c for c in counts if c is not None]
        out[name] = {"count": len(handles),
                     "restarts": sum(known) if handles and len(known) == len(counts) else None}
    return out


def _store_stats() -> Any:
    try:
        return jsonable(ta.store.stats())
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def summarize(config: JobConfig, ctx: JobContext, wall_s: float, error: BaseException | None) -> dict:
    """The summary of a job that ended now, ``error`` being what stopped it, if anything did."""
    m = ctx._snapshot()
    ret = m["mean_return"]
    target = config.stop.target_return
    stopped_by = "error" if error is not None else ctx._check() or "program_end"
    program_s = ctx.elapsed
    return {
        "job": config.job.name,
        "mean_return": ret,
        "episodes": m["episodes"],
        "frames": m["frames"],
        "fps": m["frames"] / program_s if program_s > 0 else 0.0,
        "updates": m["updates"],
        "wall_s": wall_s,
        "program_s": program_s,
        "reached_target": bool(target is not None and ret is not None and not math.isnan(ret) and ret >= target),
        "stopped_by": stopped_by,
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "store": _store_stats(),
        "actors": _actors(ctx.roles),
        "extra": jsonable(ctx._extra),
        "out_dir": str(ctx.out_dir),
    }


def write(ctx: JobContext, summary: dict) -> Path:
    """``out_dir/summary.json``, through a temporary file."""
    path = ctx.out_dir / "summary.json"
    tmp = path.with_name("summary.json.tmp")
    tmp.write_text(json.dumps(jsonable(summary), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def show(summary: dict, path: Path, stream: TextIO) -> None:
    """The summary in one line (and the error, and where the file is)."""
    ret = summary["mean_return"]
    stream.write(
        f"job {summary['job']} stopped by {summary['stopped_by']} after {summary['wall_s']:.1f}s: "
        f"frames {summary['frames']:,} ({summary['fps']:,.0f}/s), episodes {summary['episodes']:,}, "
        f"mean return {'-' if ret is None else f'{ret:.2f}'}, updates {summary['updates']:,}"
        + (" (target reached)" if summary["reached_target"] else "") + "\n")
    if summary["error"]:
        stream.write(f"error: {summary['error']}\n")
    stream.write(f"summary: {path}\n")
    stream.flush()
