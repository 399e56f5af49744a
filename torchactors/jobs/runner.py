"""The job runner: start a validated job's actors, run its program, and always clean up.

Box: what ``torchactors run`` calls. ``run_job`` does, in order:

    ta.init(...)  ->  each role: ta.actor(**role options)(cls).options(name=...).remote(**args)
                  ->  ta.get([h.ready() ...], timeout=start_timeout)
                  ->  program(job)            a JobContext: roles, config, report, should_stop
                  ->  summary.json, ta.shutdown()   whatever happened (end, stop, Ctrl-C, error)

While the program runs, the progress ticker (progress.py) writes metrics.csv and a progress
line each second, and Ctrl-C follows interrupts.py. Only the public API of torchactors is used.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import torch
import yaml

import torchactors as ta
from torchactors._util import import_string
from torchactors.jobs import summary as job_summary
from torchactors.jobs.config import JobConfig, RoleConfig
from torchactors.jobs.context import JobContext
from torchactors.jobs.imports import plain_class, runner_args
from torchactors.jobs.interrupts import EXIT_INTERRUPTED, Interrupts
from torchactors.jobs.progress import Ticker
from torchactors.jobs.schema import ROLE_OPTIONS

logger = logging.getLogger(__name__)


class StartTimeoutError(RuntimeError):
    """A role's actors did not finish their constructors within the role's ``start_timeout``."""

    def __init__(self, role: str, timeout: float, waiting: int) -> None:
        super().__init__(f"role {role}: {waiting} actor(s) did not finish the constructor within "
                         f"{timeout:g}s (roles.{role}.start_timeout); the job was stopped. Raise "
                         f"start_timeout (null waits for ever) if the constructor is slow, or find where it hangs")
        self.role, self.timeout, self.waiting = role, timeout, waiting


def default_out_dir(config: JobConfig, root: str | Path = "runs") -> Path:
    """``runs/<job name>-<YYYYmmdd-HHMMSS>``, with a ``-N`` suffix if that exists already."""
    base = Path(root) / f"{config.job.name}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def _actor_class(role: RoleConfig) -> tuple[Any, frozenset[str]]:
    """The role's class as an actor class with the role's options (they win over a decorator's), and
    the constructor parameters the runner fills in (``imports.runner_args``)."""
    obj = import_string(role.class_path)
    cls = plain_class(obj)
    if cls is None:
        logger.warning("%s is an actor class whose plain class cannot be found; the options of role %s (%s) are "
                       "not applied", role.class_path, role.name, ", ".join(ROLE_OPTIONS))
        return obj, frozenset()
    return ta.actor(**role.actor_options())(cls), runner_args(cls)


def start_roles(config: JobConfig) -> dict[str, list]:
    """Start every replica of every role; handles by role name, in replica order."""
    handles: dict[str, list] = {}
    for role in config.roles.values():
        actor_cls, filled = _actor_class(role)
        handles[role.name] = []
        for i in range(role.replicas):
            kwargs = dict(role.args)
            if "replica_index" in filled:
                kwargs["replica_index"] = i
            if "seed" in filled:
                kwargs.setdefault("seed", config.job.seed)
            handles[role.name].append(actor_cls.options(name=f"{role.name}-{i}").remote(**kwargs))
        logger.info("started role %s: %d x %s", role.name, role.replicas, role.class_path)
    return handles


def wait_started(config: JobConfig, roles: dict[str, list]) -> None:
    """Block until every actor has run its constructor; StartTimeoutError naming the first
    role whose actors are still constructing ``start_timeout`` seconds after now (the roles
    were all started just before)."""
    t0 = time.monotonic()
    for role in sorted(config.roles.values(), key=lambda r: r.start_timeout or math.inf):
        # Ray's spelling of h.ready(), which a user's method named `ready` would shadow
        ready = [h.__ray_ready__.remote() for h in roles[role.name]]
        if role.start_timeout is None:
            ta.get(ready)
            continue
        try:
            ta.get(ready, timeout=max(0.0, t0 + role.start_timeout - time.monotonic()))
        except ta.GetTimeoutError:
            _, waiting = ta.wait(ready, num_returns=len(ready), timeout=0)
            raise StartTimeoutError(role.name, role.start_timeout, len(waiting)) from None


def _init(config: JobConfig) -> None:
    """``ta.init`` with the job's runtime section (only the keys it sets: init's defaults otherwise)."""
    rt = config.runtime
    kwargs: dict[str, Any] = {"backend": rt.backend, "num_threads": rt.num_threads}
    if rt.backend == "local":
        kwargs["start_method"] = rt.start_method
    if rt.store_capacity is not None:
        kwargs["store_capacity"] = rt.store_capacity
    if rt.address is not None:
        kwargs["address"] = rt.address
    ta.init(**kwargs)


def _shutdown() -> None:
    try:
        ta.shutdown()
    except Exception:
        logger.exception("ta.shutdown() failed")


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
    interrupts = Interrupts(ctx, grace_s, sys.stderr)
    metrics = open(out / "metrics.csv", "w", newline="")
    ticker = Ticker(ctx, metrics, stream, interrupts.check_overdue)
    error: BaseException | None = None
    done = threading.Lock()  # the summary is written once: by the main thread, or by the emergency exit

    def finish(join_ticker: bool = True) -> dict:
        ctx._end()
        ticker.finish(join=join_ticker)
        summary = job_summary.summarize(config, ctx, time.monotonic() - t0, error)
        path = job_summary.write(ctx, summary)
        job_summary.show(summary, path, stream)
        _shutdown()
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
        random.seed(config.job.seed)
        torch.manual_seed(config.job.seed)
        _init(config)
        ctx.roles = start_roles(config)
        # The clock (max_seconds, fps) starts once every actor has run its constructor: process
        # start-up is not the program's time.
        wait_started(config, ctx.roles)
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
        logger.debug("job failed", exc_info=True)
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
