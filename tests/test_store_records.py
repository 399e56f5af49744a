"""The store's named records, its one table of object kinds, the one current store, and sizes.

A ref's place and meta are named records in the process and plain tuples on the wire (as
small as before they had names); a kind of object is one entry of ``records.KINDS``; reading a
ref never starts a store; "4KB" means 4096 bytes wherever a size is read.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

import torchactors
from torchactors import _util, store
from torchactors.store import core, records
from torchactors.store.records import CudaMeta, Location, PickledMeta, TensorMeta, ValueMeta

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def test_a_tensor_ref_carries_named_records_and_pickles_as_plain_tuples():
    ref = store.put(torch.rand(1024))
    assert type(ref.loc) is Location and type(ref.meta) is TensorMeta
    assert ref.meta.nbytes == ref.loc.nbytes == 4096 and ref.meta.shape == (1024,)
    blob = pickle.dumps(ref, protocol=pickle.HIGHEST_PROTOCOL)
    assert b"records" not in blob and b"TensorMeta" not in blob and b"Location" not in blob
    # The wire form is exactly the positional tuples refs carried before records had names.
    assert len(blob) <= 170, len(blob)
    back = pickle.loads(blob)
    assert type(back.loc) is Location and type(back.meta) is TensorMeta and back.meta == ref.meta
    assert torch.equal(store.get(back), store.get(ref))


def test_each_kind_of_object_is_one_entry_of_the_kind_table():
    assert set(records.KINDS) == {TensorMeta, PickledMeta, ValueMeta, CudaMeta}
    assert {d: k.meta for d, k in records.BY_DEVICE.items()} == {"cpu": TensorMeta, "cuda": CudaMeta}
    assert {records.tag_of(m) for m in records.KINDS} == {"t", "p", "v", "c"}
    small, big = store.put({"k": [1, 2]}), store.put({"x": torch.ones(1000)})
    assert type(small.meta) is ValueMeta and small.loc is None and store.get(small) == {"k": [1, 2]}
    assert type(big.meta) is PickledMeta and big.meta.block_nbytes == big.loc.nbytes
    assert store.get(big)["x"].sum() == 1000


@pytest.mark.parametrize("meta", [("t", torch.float32), ("zz", 1, 2), (7,), ()])
def test_a_wire_meta_that_names_no_record_stays_as_it_came_and_get_refuses_it(meta):
    assert records.meta_from_wire(meta) is meta
    ref = store.put(torch.arange(4.0))
    fn, args = ref.__reduce__()
    bad = fn(*args[:5], meta, args[6])
    with pytest.raises(ValueError, match="not a ref this store made"):
        store.get(bad)


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_reading_a_message_of_tensors_with_no_store_says_what_to_call_instead_of_starting_one():
    code = ("import pickle, sys, torch; from torchactors.store import _current, core, serialize; "
            "blob = serialize.dumps_message([torch.ones(3)], core.current().put); "
            "core.current().close(); _current.install(None)\n"
            "try:\n    pickle.loads(blob)\nexcept RuntimeError as e:\n"
            "    sys.stdout.write(str(e) + '|' + str(core.active() is None))\n")
    out = _run(code)
    assert out.returncode == 0, out.stderr[-2000:]
    message, no_store = out.stdout.split("|")
    assert "ta.init()" in message and "attach" in message and no_store == "True"


def test_a_store_that_is_not_the_current_one_counts_its_own_refs():
    other = core.Store()
    try:
        ref = other.put(torch.ones(4))
        assert ref._holder is other and other.membership.holders(ref.slot) == 1
        del ref
        assert other.stats()["objects"] == 0
    finally:
        other.close()


# -- sizes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (4096, 4096), ("4096", 4096), ("4KB", 4 * KiB), ("4kb", 4 * KiB), ("4K", 4 * KiB), ("4KiB", 4 * KiB),
    ("512MB", 512 * MiB), ("512MiB", 512 * MiB), ("1.5G", 3 * GiB // 2), ("4 GiB", 4 * GiB), ("1TB", 1 << 40),
    ("0", 0), (" 2m ", 2 * MiB), ("100b", 100)])
def test_sizes_are_binary_whichever_spelling(text, expected):
    assert _util.parse_size(text) == expected


@pytest.mark.parametrize("bad", [True, -1, "-1k", "inf", "nan", "1e999", "4XB", "", "GiB", None, [4]])
def test_a_size_that_is_not_one_is_a_value_error_saying_how_to_write_it(bad):
    with pytest.raises(ValueError, match="size"):
        _util.parse_size(bad)


def test_the_store_and_the_job_config_read_sizes_with_the_one_parser():
    assert store.parse_size is _util.parse_size and core.parse_size is _util.parse_size
    s = core.Store(capacity=store.parse_size("96MB"))
    try:
        assert s.stats()["capacity"] == 96 * MiB
    finally:
        s.close()
    assert torchactors.store.parse_size("4KB") == 4096
