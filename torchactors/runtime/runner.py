"""The job runner: start a validated job's actors, run its program, and always clean up.

Box: top layer, what ``torchactors run`` calls. ``run_job`` does, in order:

    ta.init(...)  ->  each role: ta.actor(**options)(cls).options(name=...).remote(**args)
                  ->  program(job)            a JobContext: roles, config, report, should_stop
                  ->  summary.json, ta.shutdown()   whatever happened (end, stop, Ctrl-C, error)

While the program runs, a ticker thread turns the program's latest ``job.report(...)`` into one
row of ``metrics.csv`` and one progress line per second. Ctrl-C is cooperative first: the
first one only makes ``job.should_stop()`` true; if the program has not returned ``grace_s``
later (or on a second Ctrl-C) the main thread gets ``KeyboardInterrupt``; if even that does not
bring it back (stuck in C code), the ticker writes the summary, shuts down and exits 130.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import yaml

from torchactors.runtime.config import ROLE_OPTIONS, JobConfig, RoleConfig, import_string, plain_class, runner_args

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0
METRICS_COLUMNS = ("time_s", "frames", "fps", "episodes", "mean_return", "updates")
STOP_REASONS = ("target_return", "max_frames", "max_seconds", "program_end", "interrupted", "error")
EXIT_INTERRUPTED = 130


class StartTimeoutError(RuntimeError):
    """A role's actors did not finish their constructors within the role's ``start_timeout``."""

    def __init__(self, role: str, timeout: float, waiting: int) -> None:
        super().__init__(f"role {role}: {waiting} actor(s) did not finish the constructor within "
                         f"{timeout:g}s (roles.{role}.start_timeout); the job was stopped. Raise "
                         f"start_timeout (null waits for ever) if the constructor is slow, or find where it hangs")
        self.role, self.timeout, self.waiting = role, timeout, waiting


class JobContext:
    """What a job's program gets: its actors, its config, and the report/stop/save hooks.

    ``report`` takes cumulative counters and may be called from any thread; the runner keeps
    only the latest values, so calling it often is cheap.
    """

    def __init__(self, config: JobConfig, out_dir: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.config: dict = config.to_dict()
        self.out_dir: Path = out_dir
        self.roles: dict[str, list] = {}
        self.name: str = config.job.name
        self.seed: int = config.job.seed
        self._stop = config.stop
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: dict[str, Any] = {"frames": 0, "episodes": 0, "mean_return": None, "updates": 0}
        self._extra: dict[str, Any] = {}
        self._started: float | None = None
        self._ended: float | None = None
        self._interrupted = threading.Event()
        self._reason: str | None = None

    # -- the program's side

    def should_stop(self) -> bool:
        """True once Ctrl-C was pressed or a ``stop:`` condition holds; the program should return."""
        return self._check() is not None

    def report(self, frames: int | None = None, episodes: int | None = None,
               mean_return: float | None = None, updates: int | None = None, **extra: Any) -> None:
        """Record the job's cumulative progress; a counter left out keeps its last value."""
        with self._lock:
            for key, value in (("frames", frames), ("episodes", episodes), ("updates", updates)):
                if value is not None:
                    self._latest[key] = int(value)
            if mean_return is not None:
                self._latest["mean_return"] = float(mean_return)
            self._extra.update(extra)
        self._check()

    def save_model(self, state_dict: Any, name: str = "policy.pt") -> Path:
        """``torch.save`` to ``out_dir/name`` through a temporary file, so a crash leaves no half file."""
        import torch

        path = self.out_dir / name
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state_dict, tmp)
        os.replace(tmp, path)
        log.info("saved %s", path)
        return path

    @property
    def elapsed(self) -> float:
        """Seconds since the program started (0 before)."""
        if self._started is None:
            return 0.0
        return (self._ended if self._ended is not None else self._clock()) - self._started

    # -- the runner's side

    def _begin(self) -> None:
        """The program starts now: ``max_seconds`` and the metrics' ``time_s`` count from here."""
        self._started = self._clock()

    def _end(self) -> None:
        """The program is over (returned, raised or abandoned): freeze ``elapsed``."""
        if self._started is not None and self._ended is None:
            self._ended = self._clock()

    def _check(self) -> str | None:
        """The first stop reason that holds, latched: later calls keep the first reason."""
        if self._reason is not None:
            return self._reason
        if self._interrupted.is_set():
            reason = "interrupted"
        else:
            with self._lock:
                frames, ret = self._latest["frames"], self._latest["mean_return"]
            s = self._stop
            if s.target_return is not None and ret is not None and not math.isnan(ret) and ret >= s.target_return:
                reason = "target_return"
            elif s.max_frames is not None and frames >= s.max_frames:
                reason = "max_frames"
            elif s.max_seconds is not None and self._started is not None and self.elapsed >= s.max_seconds:
                reason = "max_seconds"
            else:
                return None
        with self._lock:
            if self._reason is None:
                self._reason = reason
                log.info("stop: %s", reason)
            return self._reason

    def _interrupt(self) -> None:
        self._interrupted.set()
        with self._lock:
            self._reason = "interrupted"  # Ctrl-C wins over a condition seen at the same time

    def _snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._latest)


class _Ticker(threading.Thread):
    """Once a second: a metrics.csv row, a progress line, and the Ctrl-C watchdog."""

    def __init__(self, ctx: JobContext, metrics_file: TextIO, stream: TextIO, on_overdue: Callable[[], None]) -> None:
        super().__init__(name="torchactors-progress", daemon=True)
        self.ctx = ctx
        self.writer = csv.writer(metrics_file)
        self.metrics_file = metrics_file
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.on_overdue = on_overdue
        self.stopping = threading.Event()
        self.last_t, self.last_frames = 0.0, 0
        self.line_open = False
        self.writer.writerow(METRICS_COLUMNS)
        metrics_file.flush()

    def run(self) -> None:
        while not self.stopping.wait(PROGRESS_INTERVAL_S):
            try:
                self.tick()
                self.on_overdue()
            except Exception:  # progress must never take the job down
                log.exception("progress tick failed")

    def tick(self) -> None:
        """Append one row and print one progress line from the latest report."""
        t = self.ctx.elapsed
        m = self.ctx._snapshot()
        dt = t - self.last_t
        fps = (m["frames"] - self.last_frames) / dt if dt > 0 else 0.0
        self.last_t, self.last_frames = t, m["frames"]
        ret = m["mean_return"]
        self.writer.writerow([f"{t:.3f}", m["frames"], f"{fps:.1f}", m["episodes"],
                              "" if ret is None else f"{ret:.4f}", m["updates"]])
        self.metrics_file.flush()
        line = (f"{t:7.1f}s  frames {m['frames']:>11,}  fps {fps:>9,.0f}  episodes {m['episodes']:>8,}"
                f"  return {'-' if ret is None else f'{ret:.2f}':>8}  updates {m['updates']:>7,}")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.line_open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self, join: bool = True) -> None:
        """Stop ticking, write the last row (a short run still gets one) and end the progress line."""
        self.stopping.set()
        if join and self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)
        try:
            self.tick()
        except Exception:
            log.exception("final progress tick failed")
        if self.line_open:
            self.stream.write("\n")
            self.stream.flush()


class _Interrupts:
    """SIGINT policy: before the program, stop at once; during it, ask first; during cleanup, finish."""

    def __init__(self, ctx: JobContext, grace_s: float, stream: TextIO) -> None:
        self.ctx = ctx
        self.grace_s = grace_s
        self.stream = stream
        self.phase = "starting"  # starting -> program -> cleanup
        self.count = 0
        self.first_at: float | None = None
        self.forced_at: float | None = None
        self.old_handler: Any = None
        self.installed = False
        self.emergency: Callable[[], None] = lambda: None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.old_handler = signal.signal(signal.SIGINT, self._handle)
            self.installed = True

    def restore(self) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.old_handler)
            self.installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.phase == "starting":
            self.ctx._interrupt()
            raise KeyboardInterrupt
        if self.phase == "cleanup":
            if self.count >= 3 or self.forced_at is not None:
                os._exit(EXIT_INTERRUPTED)  # the user insists; actors die with us (PDEATHSIG)
            self._say("still shutting down; press Ctrl-C again to exit at once")
            return
        if self.first_at is None:
            self.first_at = time.monotonic()
            self.ctx._interrupt()
            self._say(f"stopping: the program has {self.grace_s:.0f}s to return (Ctrl-C again to stop now)")
            return
        raise KeyboardInterrupt

    def check_overdue(self) -> None:
        """Called by the ticker thread: enforce the grace period on a program that does not return."""
        if self.phase != "program" or self.first_at is None or not self.installed:
            return
        now = time.monotonic()
        if self.forced_at is None and now - self.first_at >= self.grace_s:
            self.forced_at = now
            self._say(f"the program did not return within {self.grace_s:.0f}s; stopping it")
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # wakes a blocked syscall too
        elif self.forced_at is not None and now - self.forced_at >= self.grace_s:
            self._say("the program is stuck and does not take KeyboardInterrupt; exiting")
            self.emergency()

    def _say(self, text: str) -> None:
        try:
            self.stream.write(f"\n{text}\n")
            self.stream.flush()
        except Exception:
            pass


def default_out_dir(config: JobConfig, root: str | Path = "runs") -> Path:
    """``runs/<job name>-<YYYYmmdd-HHMMSS>``, with a ``-N`` suffix if that exists already."""
    base = Path(root) / f"{config.job.name}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def _actor_class(ta: Any, role: RoleConfig) -> tuple[Any, frozenset[str]]:
    """The role's class as an actor class with the role's options (they win over a decorator's), and
    the constructor parameters the runner fills in (``config.runner_args``)."""
    obj = import_string(role.class_path)
    cls = plain_class(obj)
    if cls is None:
        log.warning("%s is an actor class whose plain class cannot be found; the options of role %s (%s) are not "
                    "applied", role.class_path, role.name, ", ".join(ROLE_OPTIONS))
        return obj, frozenset()
    return ta.actor(**role.actor_options())(cls), runner_args(cls)


def start_roles(ta: Any, config: JobConfig) -> dict[str, list]:
    """Start every replica of every role; handles by role name, in replica order."""
    handles: dict[str, list] = {}
    for role in config.roles.values():
        actor_cls, filled = _actor_class(ta, role)
        handles[role.name] = []
        for i in range(role.replicas):
            kwargs = dict(role.args)
            if "replica_index" in filled:
                kwargs["replica_index"] = i
            if "seed" in filled:
                kwargs.setdefault("seed", config.job.seed)
            handles[role.name].append(actor_cls.options(name=f"{role.name}-{i}").remote(**kwargs))
        log.info("started role %s: %d x %s", role.name, role.replicas, role.class_path)
    return handles


def wait_started(ta: Any, config: JobConfig, roles: dict[str, list]) -> None:
    """Block until every actor has run its constructor; StartTimeoutError naming the first
    role whose actors are still constructing ``start_timeout`` seconds after now (the roles
    were all started just before)."""
    from torchactors.actors import api

    t0 = time.monotonic()
    for role in sorted(config.roles.values(), key=lambda r: r.start_timeout or math.inf):
        pings = [api.runtime().ping(h) for h in roles[role.name]]
        left = None if role.start_timeout is None else max(0.0, t0 + role.start_timeout - time.monotonic())
        try:
            ta.get(pings, timeout=left)
        except ta.GetTimeoutError:
            raise StartTimeoutError(role.name, role.start_timeout,
                                    sum(1 for p in pings if not ta.wait([p], timeout=0)[0])) from None


def _jsonable(obj: Any) -> Any:
    """Store stats and extras as JSON: dataclasses and named tuples as dicts, NaN as null."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "_asdict"):
        return _jsonable(obj._asdict())
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "item"):  # tensors and numpy scalars
        try:
            return _jsonable(obj.item())
        except Exception:
            pass
    return str(obj)


def _restarts(handle: Any) -> int | None:
    """How often the actor behind ``handle`` was restarted, or None where the backend cannot say."""
    try:  # TODO: a public per-actor info call; until then the local backend's supervisor knows
        from torchactors.actors import api

        if not api.is_initialized():
            return None
        supervisor = api.runtime()._supervisor
        return None if supervisor is None else int(supervisor.restarts(handle._actor_id))
    except Exception:
        return None


def _actors_summary(roles: dict[str, list]) -> dict[str, dict]:
    out = {}
    for name, handles in roles.items():
        counts = [_restarts(h) for h in handles]
        out[name] = {"count": len(handles),
                     "restarts": sum(counts) if handles and all(c is not None for c in counts) else None}
    return out


def _store_stats(ta: Any) -> Any:
    if ta is None:
        return None
    try:
        return _jsonable(ta.store.stats())
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _summary(config: JobConfig, ctx: JobContext, ta: Any, wall_s: float, error: BaseException | None) -> dict:
    m = ctx._snapshot()
    ret = m["mean_return"]
    target = config.stop.target_return
    if error is not None:
        stopped_by = "error"
    else:
        stopped_by = ctx._check() or "program_end"
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
        "store": _store_stats(ta),
        "actors": _actors_summary(ctx.roles),
        "extra": _jsonable(ctx._extra),
        "out_dir": str(ctx.out_dir),
    }


def _write_summary(ctx: JobContext, summary: dict) -> Path:
    path = ctx.out_dir / "summary.json"
    tmp = path.with_name("summary.json.tmp")
    tmp.write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _print_summary(summary: dict, path: Path, stream: TextIO) -> None:
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


def _shutdown(ta: Any) -> None:
    if ta is None:
        return
    try:
        ta.shutdown()
    except Exception:
        log.exception("ta.shutdown() failed")


def run_job(config: JobConfig, out_dir: str | Path | None = None, *, grace_s: float = 5.0,
            stream: TextIO | None = None) -> dict:
    """Run a validated job to its end and return the summary (also written to ``out_dir/summary.json``).

    The summary's ``stopped_by`` says why it ended; ``interrupted`` means Ctrl-C (the CLI exits
    130). An exception from the runtime or the program is re-raised after the summary is written
    and the runtime shut down.
    """
    stream = stream or sys.stdout
    t0 = time.monotonic()
    out = Path(out_dir) if out_dir is not None else default_out_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    ctx = JobContext(config, out)
    program = import_string(config.program)
    interrupts = _Interrupts(ctx, grace_s, sys.stderr)
    metrics = open(out / "metrics.csv", "w", newline="")
    ticker = _Ticker(ctx, metrics, stream, interrupts.check_overdue)
    ta: Any = None
    error: BaseException | None = None
    done = threading.Lock()  # the summary is written once: by the main thread, or by the emergency exit

    def finish(join_ticker: bool = True) -> dict:
        ctx._end()
        ticker.finish(join=join_ticker)
        summary = _summary(config, ctx, ta, time.monotonic() - t0, error)
        path = _write_summary(ctx, summary)
        _print_summary(summary, path, stream)
        _shutdown(ta)
        return summary

    def emergency() -> None:
        if done.acquire(blocking=False):
            stopper = threading.Thread(target=finish, args=(False,), daemon=True)  # the ticker is calling
            stopper.start()
            stopper.join(timeout=10)
            os._exit(EXIT_INTERRUPTED)

    interrupts.emergency = emergency
    interrupts.install()
    try:
        import torchactors as ta_module

        ta = ta_module
        random.seed(config.job.seed)
        import torch

        torch.manual_seed(config.job.seed)
        init_kwargs: dict[str, Any] = {"backend": config.runtime.backend, "num_threads": config.runtime.num_threads}
        if config.runtime.backend == "local":
            init_kwargs["start_method"] = config.runtime.start_method
        if config.runtime.store_capacity is not None:
            init_kwargs["store_capacity"] = config.runtime.store_capacity
        if config.runtime.address is not None:
            init_kwargs["address"] = config.runtime.address
        ta.init(**init_kwargs)
        ctx.roles = start_roles(ta, config)
        # The clock (max_seconds, fps) starts once every actor has run its constructor: process
        # start-up is not the program's time.
        wait_started(ta, config, ctx.roles)
        ctx._begin()
        ticker.start()
        interrupts.phase = "program"
        if ctx._interrupted.is_set():  # Ctrl-C while starting, swallowed somewhere in start-up
            raise KeyboardInterrupt
        program(ctx, **config.program_args)
    except KeyboardInterrupt:
        ctx._interrupt()
    except Exception as e:
        error = e
        log.debug("job failed", exc_info=True)
    finally:
        interrupts.phase = "cleanup"
        ctx._end()
        try:
            if done.acquire(blocking=False):
                summary = finish()
            else:  # the emergency exit is writing it; it ends the process
                threading.Event().wait()
        finally:
            metrics.close()
            interrupts.restore()
    if error is not None:
        raise error
    return summary
