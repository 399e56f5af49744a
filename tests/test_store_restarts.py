"""A long job reuses process indices: processes that die free their index for the next one,
and no stale ref of a dead process can name an object of the process now at its index.

Processes here are forked from this one (they join its job's store and die by SIGKILL), so
that thousands of incarnations take seconds; the actor path is in test_actors' restart tests.
"""

from __future__ import annotations

import os
import pickle
import signal

import pytest
import torch

from torchactors import store
from torchactors.errors import OwnerDiedError
from torchactors.store import core


def incarnation(job_dir: str, value: float) -> tuple[int, int, object]:
    """Fork a process that joins the job, puts a tensor, sends its ref and waits to be killed.
    Returns its pid, its index and the ref."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:            # the child: never returns
        try:
            os.close(r)
            st = core.attach(job_dir, capacity=4 << 20)     # small arenas: a cheap first put
            ref = st.put(torch.full((16,), value))
            blob = pickle.dumps((st.index, ref))
            os.write(w, len(blob).to_bytes(4, "little") + blob)
            signal.pause()
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        n = int.from_bytes(f.read(4), "little")
        index, ref = pickle.loads(f.read(n))
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
