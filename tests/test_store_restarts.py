"""A long job reuses process indices: processes that die free their index for the next one,
and no stale ref of a dead process can name an object of the process now at its index.

Processes here are forked from this one (they join its job's store and die by SIGKILL), so
that thousands of incarnations take seconds; the actor path is in test_actors' restart tests.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import fork_store_process

from torchactors import store
from torchactors.errors import OwnerDiedError


def incarnation(job_dir: str, value: float) -> tuple[int, int, object]:
    """Fork a process that joins the job, puts a tensor, sends its ref and waits to be killed.
    Returns its pid, its index and the ref. Small arenas: a cheap first put."""
    pid, (index, ref) = fork_store_process(job_dir, lambda st: (st.index, st.put(torch.full((16,), value))),
                                           capacity=4 << 20)
    return pid, index, ref


def run_incarnations(n: int) -> None:
    st = store.current()
    seen = set()
    stale: list = []
    for k in range(n):
        pid, index, ref = incarnation(st.job_dir, float(k))
        seen.add(index)
        assert st.get(ref).tolist() == [float(k)] * 16
        # While the new process lives at the reused index, refs of earlier ones are refused.
        for old in stale:
            with pytest.raises(OwnerDiedError):
                st.get(old)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        stale = (stale + [ref])[-3:]
    assert len(seen) <= 2, seen          # indices of dead processes are claimed again


def test_a_dead_process_index_is_reused_and_its_stale_refs_never_name_the_new_objects():
    run_incarnations(60)


@pytest.mark.slow
def test_a_job_survives_10000_process_restarts():
    run_incarnations(10_000)
