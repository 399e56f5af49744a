"""Refs that are not what they claim: of another job, of a dead process, forged or edited.

Whatever a ref says, ``get`` returns the object it names or raises a clear error
(``OwnerDiedError``, ``ObjectFreedError``, ``ValueError`` for a malformed ref) — never the
bytes of another object.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch
from conftest import StoreProcess, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchactors as ta
from torchactors import store
from torchactors.errors import ObjectFreedError, OwnerDiedError
from torchactors.store.refs import ObjectRef

ERRORS = (OwnerDiedError, ObjectFreedError, ValueError)


def forge(ref: ObjectRef, **fields) -> ObjectRef:
    """A ref rebuilt as unpickling would, with some fields changed (what a forger can do)."""
    fn, args = ref.__reduce__()
    names = ["owner", "slot", "gen", "owner_pid", "loc", "meta", "job"]
    args = dict(zip(names, args, strict=False))
    args.update(fields)
    return fn(*[args[n] for n in names])


def get_never_other_bytes(ref: ObjectRef, own: torch.Tensor) -> None:
    """get raises one of the clear errors, or returns exactly ``own``."""
    try:
        got = store.get(ref)
    except ERRORS:
        return
    assert isinstance(got, torch.Tensor) and torch.equal(got, own), got


def test_a_ref_of_another_job_is_refused_not_read_as_this_jobs_object(tmp_path):
    code = ("import pickle, sys, torch; from torchactors import store; "
            "r = store.put(torch.full((4,), 42.0)); sys.stdout.buffer.write(pickle.dumps(r))")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    blob = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, env=env).stdout
    mine = store.put(torch.full((4,), -1.0))     # this job's object, likely at the same slot
    foreign = pickle.loads(blob)
    with pytest.raises(OwnerDiedError, match="not of this job"):
        store.get(foreign)
    with pytest.raises(OwnerDiedError):
        store.free(foreign)
    assert store.get(mine).tolist() == [-1.0] * 4


def test_unpickling_a_foreign_ref_counts_nothing_and_starts_no_store():
    code = ("import pickle, sys, torch; from torchactors import store; from torchactors.store import _current, core; "
            "r = store.put(torch.ones(2)); blob = pickle.dumps(r); core.current().close(); _current.install(None); "
            "back = pickle.loads(blob); sys.stdout.write(str(core.active() is None and back._holder is None))")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, env=env, text=True).stdout
    assert out == "True"


def test_a_ref_of_a_closed_store_is_refused_by_the_next_one():
    ta.shutdown()
    old_ref = store.put(torch.full((4,), 42.0))
    blob = pickle.dumps(old_ref)
    del old_ref
    store.current().close()
    mine = store.put(torch.full((4,), -1.0))     # a new store, a new job
    with pytest.raises(OwnerDiedError):
        store.get(pickle.loads(blob))
    assert store.get(mine).tolist() == [-1.0] * 4


@pytest.mark.parametrize("field", ["offset", "size", "fd", "slot", "gen", "other", "meta_split"])
def test_an_edited_ref_to_an_object_of_this_process_never_returns_other_bytes(field):
    a = store.put(torch.arange(64.0))
    b = store.put(torch.full((64,), -7.0))      # a neighbour in the same arena
    c = store.put({"x": torch.ones(8), "y": [1, 2]})
    fd, inode, off, n, *win = a.loc
    edits = {"offset": dict(loc=(fd, inode, off + 256, n, *win)), "size": dict(loc=(fd, inode, off, n + 256, *win)),
             "fd": dict(loc=(fd + 1, inode, off, n, *win)), "slot": dict(slot=b.slot), "gen": dict(gen=a.gen + 1),
             "other": dict(slot=b.slot, gen=b.gen)}
    if field == "meta_split":
        meta = c.meta
        with pytest.raises(ValueError):
            store.get(forge(c, meta=(meta[0], meta[1] - 64, meta[2] + 64, meta[3])))
        return
    get_never_other_bytes(forge(a, **edits[field]), torch.arange(64.0))
    assert store.get(b).tolist() == [-7.0] * 64


@pytest.mark.parametrize("fields", [dict(slot=-3), dict(slot=1 << 20), dict(owner=5000), dict(owner=-1),
                                    dict(meta=("zz",)), dict(meta=None), dict(loc=(1, 2)), dict(gen="x")])
def test_a_malformed_ref_raises_value_error_not_an_internal_error(fields):
    ref = store.put(torch.arange(8.0))
    bad = forge(ref, **fields)
    with pytest.raises(ERRORS):
        store.get(bad)
    assert store.get(ref).tolist() == list(range(8))


@ta.actor(num_threads=1)
class Owner(StoreProcess):
    def put_small(self) -> dict:
        s = store.put({"k": [1, 2]})
        self.held.append(s)
        return {"s": s}

    def put_shared(self) -> dict:
        shared = torch.full((64,), 3.0).share_memory_()
        s = store.put({"x": shared, "y": torch.arange(4.0)})
        self.held += [s, shared]
        return {"s": s}

    def put_two(self) -> dict:
        a = store.put(torch.arange(64.0))
        b = store.put(torch.full((64,), -7.0))
        self.held += [a, b]
        return {"a": a, "b": b}


@pytest.fixture(scope="module")
def owner():
    ta.init(num_threads=1)
    h = Owner.remote()
    ta.get(h.pid.remote())
    yield h
    ta.kill(h)


def test_an_edited_ref_to_another_processs_object_never_returns_other_bytes(owner):
    refs = ta.get(owner.put_two.remote())
    a, b = refs["a"], refs["b"]
    assert store.get(a).tolist() == list(range(64))
    fd, inode, off, n, *win = a.loc
    for edit in (dict(loc=(fd, inode, off + 256, n, *win)), dict(loc=(fd, inode, off, n + 256, *win)), dict(slot=b.slot),
                 dict(gen=a.gen + 1), dict(gen=a.gen - 1), dict(owner_pid=os.getpid()), dict(slot=b.slot, gen=b.gen),
                 dict(loc=(fd, inode, off, n, win[0] + 4096, win[1])), dict(loc=(fd, inode, off, n, win[0], win[1] * 4)),
                 dict(loc=(fd, inode, off + 256, n, win[0] - 256, win[1])), dict(loc=(fd, inode + 1, off, n, *win)),
                 dict(meta=("t", torch.float64) + a.meta[2:]), dict(job="another-job")):
        get_never_other_bytes(forge(a, **edit), torch.arange(64.0))
    assert store.get(b).tolist() == [-7.0] * 64


def test_an_edited_list_of_aliased_storages_never_maps_another_file_of_the_owner(owner):
    refs = ta.get(owner.put_two.remote())
    s = ta.get(owner.put_shared.remote())["s"]
    assert store.get(s)["x"].tolist() == [3.0] * 64
    arena_fd, arena_inode = refs["a"].loc[:2]
    meta = s.meta
    forged = forge(s, meta=meta[:3] + (((arena_fd, arena_inode, 4096),),))
    with pytest.raises(ERRORS):
        got = store.get(forged)
        assert got["x"].tolist() == [3.0] * 64       # only ever its own bytes


EDITS = st.fixed_dictionaries({}, optional={
    "slot": st.integers(-5, 70_000), "gen": st.integers(-1, 1 << 60), "owner": st.integers(-2, 2000),
    "offset": st.integers(-4096, 1 << 27), "nbytes": st.integers(-1, 1 << 27), "fd": st.integers(-1, 64),
    "file_off": st.integers(-1, 1 << 28), "size": st.integers(0, 1 << 28), "dtype": st.sampled_from(
        [torch.float64, torch.uint8, torch.int32]), "shape": st.lists(st.integers(0, 1 << 20), max_size=3)})


def apply_edits(ref: ObjectRef, edits: dict) -> ObjectRef:
    fd, inode, off, n, file_off, size = ref.loc
    loc = (edits.get("fd", fd), inode, edits.get("offset", off), edits.get("nbytes", n),
           edits.get("file_off", file_off), edits.get("size", size))
    meta = ref.meta
    if "dtype" in edits:
        meta = (meta[0], edits["dtype"]) + meta[2:]
    if "shape" in edits:
        shape = tuple(edits["shape"])
        meta = meta[:2] + (shape, tuple(1 for _ in shape)) + meta[4:]
    fields = {k: edits[k] for k in ("slot", "gen", "owner") if k in edits}
    return forge(ref, loc=loc, meta=meta, **fields)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(edits=EDITS)
def test_any_edit_of_a_ref_gives_its_own_value_or_a_clear_error(owner, edits):
    refs = getattr(test_any_edit_of_a_ref_gives_its_own_value_or_a_clear_error, "refs", None)
    if refs is None:
        refs = test_any_edit_of_a_ref_gives_its_own_value_or_a_clear_error.refs = {
            "local": (store.put(torch.arange(64.0)), store.put(torch.full((64,), -7.0))),
            "remote": (lambda r: (r["a"], r["b"]))(ta.get(owner.put_two.remote()))}
    for a, _ in refs.values():
        get_never_other_bytes(apply_edits(a, edits), torch.arange(64.0))


# Kills the module's owner actor: keep it last.
def test_a_small_value_with_no_bytes_outlives_its_owner_but_not_its_free(owner):
    small = ta.get(owner.put_small.remote())["s"]
    assert small.loc is None and store.get(small) == {"k": [1, 2]}
    store.free(small)
    with pytest.raises(ObjectFreedError):
        store.get(small)
    again = ta.get(owner.put_small.remote())["s"]
    pid = ta.get(owner.pid.remote())
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}/stat") or "Z" in open(f"/proc/{pid}/stat").read().split()[2], 10)
    assert store.get(again) == {"k": [1, 2]}          # self-contained: nothing of the dead owner is read
