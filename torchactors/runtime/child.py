"""The first code of an actor process: join the job, then call the target.

Box in the data flow: supervisor -> (fresh interpreter, or a fork of the zygote) -> here ->
target(payload, ctx). The boot record arrives on stdin (spawned) or on a pipe (forked), so
nothing secret is in argv or the environment.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import pickle
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torchactors.runtime.job import Job
    from torchactors.store.core import Store

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
DRIVER_PID_VAR = "TORCHACTORS_DRIVER_PID"   # set for every child of the job: its driver's pid
JOB_WATCH_S = 0.5                           # how often a detached process looks for its job's end


@dataclass
class ChildContext:
    """What the target learns about its place in the job: the job it joined and its store
    there (passed, not kept in a process global), and who it is."""

    key: str
    incarnation: int
    device: str
    num_threads: int
    job: Job
    store: Store


def _end_with_job(job_dir: str) -> None:
    """A detached process (no PDEATHSIG: it outlives the actor that started it) ends when the
    job does: its driver exits or removes the job's directory (``ta.shutdown``)."""
    driver = int(os.environ.get(DRIVER_PID_VAR) or 0)
    try:
        pidfd = os.pidfd_open(driver) if driver else -1
    except ProcessLookupError:
        os._exit(1)
    while os.path.isdir(job_dir):
        if pidfd >= 0 and select.select([pidfd], [], [], JOB_WATCH_S)[0]:
            break
        if pidfd < 0:
            time.sleep(JOB_WATCH_S)
    logger.info("the job ended (its driver exited or shut down): a detached actor ends with it")
    os._exit(0)


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the thread that started it exits (``PR_SET_PDEATHSIG``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:      # the parent died before prctl took effect
        os._exit(1)


def select_device(device: str) -> None:
    """Make ``cuda:N`` this process's current device before the actor's constructor runs.
    ``cuda`` names the current device, already device 0 in a fresh process (and
    ``torch.cuda.set_device`` refuses a device without an index); ``cpu`` needs nothing."""
    import torch

    d = torch.device(device)
    if d.type == "cuda" and d.index is not None:
        torch.cuda.set_device(d.index)


def use_path(sys_path: list[str]) -> None:
    """Put the driver's import path in front of this process's."""
    for entry in reversed(sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)


def enter_process(sys_path: list[str], num_threads: int, device: str) -> None:
    """Make this process ready for an actor's code: the driver's import path, the torch
    thread count and the current device (shared by our children and Ray-hosted actors)."""
    use_path(sys_path)
    import torch

    torch.set_num_threads(num_threads)
    select_device(device)


def main() -> None:
    """Entry point of a spawned process (``python -c``): the boot record is on stdin."""
    boot = pickle.loads(sys.stdin.buffer.read())
    if not boot.get("detached"):
        die_with_parent(boot["parent_pid"])
    sys.stdin.close()
    run(boot)


def run(boot: dict) -> None:
    """Set the process up as the boot record says, join the job and call the target (in a
    spawned process and in a child of the zygote alike)."""
    os.chdir(boot["cwd"])
    logging.basicConfig(level=os.environ.get("TORCHACTORS_LOG_LEVEL", "WARNING"),
                        format=f"%(asctime)s {boot['key']} %(levelname)s %(name)s: %(message)s")
    enter_process(boot["sys_path"], boot["num_threads"], boot["device"])

    from torchactors.runtime import job as job_module

    info = boot["job"]
    job, store = job_module.Job.join(info["dir"], info["secret"], info["capacity"])
    if boot.get("detached"):
        threading.Thread(target=_end_with_job, args=(job.dir,), daemon=True, name="torchactors-job-watch").start()
    module, _, name = boot["target"].partition(":")
    target = getattr(importlib.import_module(module), name)
    target(boot["payload"], ChildContext(boot["key"], boot["incarnation"], boot["device"], boot["num_threads"],
                                         job, store))
