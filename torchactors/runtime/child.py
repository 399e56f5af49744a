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
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torchactors.runtime.job import Job
    from torchactors.store.core import Store

PR_SET_PDEATHSIG = 1


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
    module, _, name = boot["target"].partition(":")
    target = getattr(importlib.import_module(module), name)
    target(boot["payload"], ChildContext(boot["key"], boot["incarnation"], boot["device"], boot["num_threads"],
                                         job, store))
