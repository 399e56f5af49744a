"""The object store in one process: what put takes, what get gives back, snapshots and aliases,
capacity, lifetime, stats, and errors that survive pickling.

Cross-process promises are in test_store_xproc.py; leak soaks and SIGKILLs in test_store_leaks.py.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import pickle
import threading
import time
import warnings

import pytest
import torch
from conftest import wait_for

import torchactors as ta
from torchactors import errors, store
from torchactors.errors import GetTimeoutError, ObjectFreedError, StoreFullError
from torchactors.store import core

MiB = 1 << 20

@dataclasses.dataclass
class Batch:
    """A user's structure holding tensors (module level: importable by name)."""
    obs: torch.Tensor
    actions: torch.Tensor
    info: dict


Transition = collections.namedtuple("Transition", "state reward")


def objects() -> int:
    return store.stats()["objects"]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality for any dtype (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# -- put takes tensors and structures; refs stay small ----------------------------------------

def test_put_returns_a_small_picklable_ref_whose_size_does_not_grow_with_the_data():
    small = store.put(torch.zeros(4))
    big = store.put(torch.zeros(4 * MiB))           # 16 MiB
    nested_big = store.put({"a": [torch.zeros(MiB), (torch.ones(MiB, 3),)]})
    sizes = [len(pickle.dumps(r)) for r in (small, big, nested_big)]
    assert isinstance(small, ta.ObjectRef)
    assert max(sizes) < 1024, sizes
    assert max(sizes) - min(sizes) < 64, sizes
    # A ref that went through pickle still names the same object.
    again = pickle.loads(pickle.dumps(big))
    assert again == big
    assert torch.equal(store.get(again), torch.zeros(4 * MiB))


def test_put_and_get_are_also_exported_as_ta_put_and_ta_get():
    ref = ta.put(torch.arange(3))
    assert torch.equal(ta.get(ref), torch.arange(3))
    assert ta.get([ref, ref])[1].tolist() == [0, 1, 2]


def test_put_takes_lists_dicts_tuples_dataclasses_namedtuples_holding_tensors():
    obj = {
        "list": [torch.arange(3), 5, "text"],
        "tuple": (torch.ones(2, 2), None),
        "batch": Batch(torch.randn(4, 3), torch.tensor([1, 0, 1, 1]), {"step": 7, "mask": torch.ones(4).bool()}),
        "nt": Transition(torch.zeros(2), 1.5),
        "nested": {"deep": [[torch.full((2,), 9.0)]]},
    }
    got = store.get(store.put(obj))
    assert torch.equal(got["list"][0], obj["list"][0]) and got["list"][1:] == [5, "text"]
    assert torch.equal(got["tuple"][0], obj["tuple"][0]) and got["tuple"][1] is None
    assert isinstance(got["batch"], Batch)
    assert torch.equal(got["batch"].obs, obj["batch"].obs)
    assert torch.equal(got["batch"].actions, obj["batch"].actions)
    assert got["batch"].info["step"] == 7 and torch.equal(got["batch"].info["mask"], obj["batch"].info["mask"])
    assert isinstance(got["nt"], Transition) and got["nt"].reward == 1.5
    assert torch.equal(got["nested"]["deep"][0][0], torch.full((2,), 9.0))


def test_put_takes_plain_python_values_without_tensors():
    for value in (None, 3, "text", [1, 2, {"a": (3, 4)}], b"\x00" * 5000):
        assert store.get(store.put(value)) == value


def test_module_state_dict_round_trips():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    sd = model.state_dict()
    got = store.get(store.put(sd))
    assert list(got) == list(sd)
    for k in sd:
        assert same_bytes(got[k], sd[k]), k
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    fresh.load_state_dict(got)
    x = torch.randn(3, 4)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))


# -- snapshot and alias -----------------------------------------------------------------------

def test_put_is_a_snapshot_later_writes_to_the_source_do_not_change_the_object():
    t = torch.zeros(5)
    ref = store.put(t)
    t.fill_(7.0)
    assert torch.equal(store.get(ref), torch.zeros(5))


def test_put_of_a_structure_is_a_snapshot_too():
    t = torch.zeros(5)
    ref = store.put({"t": t, "view": t[1:3]})
    t.fill_(7.0)
    got = store.get(ref)
    assert torch.equal(got["t"], torch.zeros(5))
    assert torch.equal(got["view"], torch.zeros(2))


def test_put_of_a_view_snapshots_the_view_values():
    base = torch.arange(20.0).reshape(4, 5)
    view = base[1:3, ::2]
    ref = store.put(view)
    base.zero_()
    assert torch.equal(store.get(ref), torch.tensor([[5.0, 7.0, 9.0], [10.0, 12.0, 14.0]]))


def test_already_shared_tensor_is_registered_without_copy_and_aliases():
    t = torch.zeros(6).share_memory_()
    assert t.is_shared()
    ref = store.put(t)
    got = store.get(ref)
    t[2] = 5.0                                   # write after put: visible through get
    assert got[2].item() == 5.0
    assert store.get(ref)[2].item() == 5.0
    got[3] = 4.0                                 # and the other way round
    assert t[3].item() == 4.0


def test_already_shared_view_aliases_its_shared_storage():
    base = torch.zeros(4, 4).share_memory_()
    view = base[1]
    ref = store.put(view)
    base[1, 2] = 3.0
    assert store.get(ref).tolist() == [0.0, 0.0, 3.0, 0.0]


def test_already_shared_tensor_stays_valid_after_the_source_is_gone():
    t = torch.arange(6.0).share_memory_()
    ref = store.put(t)
    del t
    gc.collect()
    assert store.get(ref).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_get_with_copy_true_gives_a_private_copy():
    ref = store.put(torch.zeros(4))
    private = store.get(ref, copy=True)
    private.fill_(1.0)
    assert torch.equal(store.get(ref), torch.zeros(4))


def test_writes_through_a_get_view_are_seen_by_every_later_get():
    ref = store.put(torch.zeros(4))
    store.get(ref)[1] = 2.5
    assert store.get(ref)[1].item() == 2.5


def test_two_gets_of_one_ref_alias_the_same_memory_and_map_nothing_new():
    ref = store.put(torch.arange(1000.0))
    a = store.get(ref)
    mapped = store.stats()["mapped_segments"]
    for _ in range(50):
        b = store.get(ref)
    assert a.data_ptr() == b.data_ptr()
    assert store.stats()["mapped_segments"] == mapped


# -- views of one storage stay views of one storage (torch's _test_preserve_sharing) ---------

def _sharing_data():
    x = torch.randn(5, 5)
    return x, [x.untyped_storage(), x, x[2], x[:, 1]]


def test_views_of_one_storage_put_together_come_back_as_views_of_one_storage():
    x, data = _sharing_data()
    new = store.get(store.put(data))
    assert isinstance(new[0], torch.UntypedStorage)
    assert bytes(new[0]) == bytes(data[0])
    for orig, got in zip(data[1:], new[1:], strict=False):
        assert torch.equal(got, orig)
        assert got.stride() == orig.stride() and got.storage_offset() == orig.storage_offset()
    ptr = new[0].data_ptr()
    assert all(t.untyped_storage().data_ptr() == ptr for t in new[1:])
    new[1][2, 1] = 100.0                         # x[2, 1] is both x[2][1] and x[:, 1][2]
    assert new[2][1].item() == 100.0
    assert new[3][2].item() == 100.0


def test_typed_storage_and_its_tensor_keep_sharing():
    x = torch.arange(10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)       # TypedStorage is deprecated
        ts = x.storage()
        new = store.get(store.put([ts, x, x[3:]]))
        assert isinstance(new[0], torch.TypedStorage) and new[0].dtype == torch.float32
        assert new[0].tolist() == x.tolist()
        assert new[0]._untyped_storage.data_ptr() == new[1].untyped_storage().data_ptr()
    new[1][4] = -1.0
    assert new[2][1].item() == -1.0


def test_a_bare_device_storage_is_refused_not_read_from_its_address():
    # A storage off the host (meta here, CUDA on a GPU) has no bytes we can copy: reading its
    # address from the host crashed the process for TypedStorage before this check.
    meta = torch.empty(4, device="meta").untyped_storage()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)       # TypedStorage is deprecated
        typed = torch.TypedStorage(wrap_storage=meta, dtype=torch.float32, _internal=True)
    for bare in (meta, typed):
        with pytest.raises(TypeError, match="cannot store a bare meta storage; store a tensor viewing it"):
            store.put({"s": bare})


def test_one_tensor_twice_in_a_structure_comes_back_as_one_storage():
    t = torch.ones(3)
    a, b = store.get(store.put([t, t]))
    a[0] = 9.0
    assert b[0].item() == 9.0


# -- every dtype and shape --------------------------------------------------------------------

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128]
DTYPES += [getattr(torch, name) for name in ("uint16", "uint32", "uint64", "complex32", "float8_e4m3fn",
                                              "float8_e5m2") if hasattr(torch, name)]


def random_tensor(dtype: torch.dtype, shape=(3, 5), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    es = torch.empty(0, dtype=dtype).element_size()
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * es,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips_bit_for_bit(dtype):
    t = random_tensor(dtype)
    got = store.get(store.put(t))
    assert got.dtype == dtype and got.shape == t.shape
    assert same_bytes(got, t)
    got_nested = store.get(store.put({"t": t}))["t"]
    assert same_bytes(got_nested, t)


@pytest.mark.parametrize("make", [
    lambda: torch.tensor(3.5),
    lambda: torch.tensor(7, dtype=torch.int64),
    lambda: torch.tensor(True),
], ids=["0d-float", "0d-int", "0d-bool"])
def test_zero_dim_tensors_round_trip(make):
    t = make()
    got = store.get(store.put(t))
    assert got.dim() == 0 and got.dtype == t.dtype and got.item() == t.item()
    assert store.get(store.put([t]))[0].item() == t.item()


@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0, 2)], ids=str)
def test_empty_tensors_round_trip(shape):
    t = torch.empty(shape, dtype=torch.float64)
    for got in (store.get(store.put(t)), store.get(store.put({"e": t}))["e"]):
        assert got.shape == t.shape and got.dtype == t.dtype and got.numel() == 0


NONCONTIG = {
    "transposed": lambda: torch.arange(12.0).reshape(3, 4).t(),
    "strided-slice": lambda: torch.arange(60.0).reshape(6, 10)[1::2, 2::3],
    "negative-offset-slice": lambda: torch.arange(30).reshape(5, 6)[3:, 1:4],
    "expand": lambda: torch.arange(3.0).expand(4, 3),
    "expand-0d": lambda: torch.tensor(2.0).expand(5, 2),
    "permuted-3d": lambda: torch.arange(24, dtype=torch.int16).reshape(2, 3, 4).permute(2, 0, 1),
    "diagonal": lambda: torch.arange(16.0).reshape(4, 4).diagonal(),
}


@pytest.mark.parametrize("name", list(NONCONTIG))
def test_non_contiguous_tensors_round_trip(name):
    t = NONCONTIG[name]()
    assert not t.is_contiguous()
    single = store.get(store.put(t))
    nested = store.get(store.put([t]))[0]
    for got in (single, nested):
        assert got.shape == t.shape and got.dtype == t.dtype
        assert torch.equal(got, t)


def test_expanded_tensor_is_not_materialized():
    t = torch.arange(4.0).expand(1000, 4)
    got = store.get(store.put(t))
    assert got.stride() == t.stride()
    assert got.untyped_storage().nbytes() < 1000 * 4 * 4


def test_parameter_class_and_requires_grad_are_kept():
    p = torch.nn.Parameter(torch.randn(3, 2))
    for got in (store.get(store.put(p)), store.get(store.put({"w": p}))["w"]):
        assert isinstance(got, torch.nn.Parameter)
        assert got.requires_grad and got.is_leaf
        assert torch.equal(got.detach(), p.detach())


def test_integer_parameter_round_trips_with_requires_grad_false():
    p = torch.nn.Parameter(torch.arange(5), requires_grad=False)
    for got in (store.get(store.put(p)), store.get(store.put([p]))[0]):
        assert isinstance(got, torch.nn.Parameter)
        assert not got.requires_grad
        assert got.dtype == torch.int64 and got.tolist() == [0, 1, 2, 3, 4]


def test_frozen_float_parameter_keeps_requires_grad_false():
    p = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    got = store.get(store.put(p))
    assert isinstance(got, torch.nn.Parameter) and not got.requires_grad


def test_leaf_tensor_requiring_grad_keeps_requires_grad():
    t = torch.randn(4, requires_grad=True)
    for got in (store.get(store.put(t)), store.get(store.put({"t": t}))["t"]):
        assert type(got) is torch.Tensor
        assert got.requires_grad and got.is_leaf
        assert torch.equal(got.detach(), t.detach())
        got.sum().backward()                     # usable as a leaf
        assert torch.equal(got.grad, torch.ones(4))


def test_non_leaf_tensor_requiring_grad_is_refused_with_a_hint_to_detach():
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    with pytest.raises(RuntimeError, match=r"detach\(\)"):
        store.put(y)
    with pytest.raises(Exception, match=r"detach\(\)"):
        store.put({"nested": [y]})
    assert torch.equal(store.get(store.put(y.detach())), y.detach())


def test_meta_tensors_come_back_as_meta_tensors():
    t = torch.empty(3, 4, device="meta", dtype=torch.float16)
    for got in (store.get(store.put(t)), store.get(store.put({"m": t}))["m"]):
        assert got.is_meta
        assert got.shape == (3, 4) and got.dtype == torch.float16
    p = torch.nn.Parameter(torch.empty(2, device="meta"))
    got = store.get(store.put(p))
    assert got.is_meta and isinstance(got, torch.nn.Parameter)


def test_sparse_coo_tensors_round_trip():
    i = torch.tensor([[0, 1, 1, 3], [2, 0, 2, 1]])
    v = torch.tensor([3.0, 4.0, 5.0, -1.0])
    s = torch.sparse_coo_tensor(i, v, (4, 3), check_invariants=True)
    for got in (store.get(store.put(s)), store.get(store.put({"s": s}))["s"]):
        assert got.layout == torch.sparse_coo
        assert got.shape == s.shape and got.dtype == s.dtype
        assert torch.equal(got.to_dense(), s.to_dense())
    c = s.coalesce()
    got = store.get(store.put(c))
    assert got.is_coalesced() and torch.equal(got.to_dense(), c.to_dense())


# -- capacity -----------------------------------------------------------------------------------

BIG = 24 * MiB          # a dedicated-segment object; four of them do not fit in 80 MiB


def big_tensor() -> torch.Tensor:
    return torch.empty(BIG, dtype=torch.uint8)


def init_with_capacity(capacity: str) -> None:
    """``ta.init(store_capacity=...)`` on an empty store: a store this process already
    started standalone (a put before init) would be adopted with its pooled memory."""
    standalone = core.active()
    if standalone is not None and not ta.is_initialized():
        standalone.close()
    ta.init(store_capacity=capacity)


def test_put_that_does_not_fit_raises_store_full_naming_used_requested_and_capacity():
    init_with_capacity("80MiB")
    assert store.stats()["capacity"] == 80 * MiB
    held = [store.put(big_tensor()) for _ in range(3)]
    with pytest.raises(StoreFullError) as info:
        store.put(big_tensor())
    err = info.value
    assert err.capacity == 80 * MiB
    assert err.requested >= BIG
    assert err.used >= 3 * BIG
    msg = str(err)
    for number in (err.requested, err.used, err.capacity):
        assert str(number) in msg, msg
    assert len(held) == 3 and store.stats()["objects"] == 3


def test_store_capacity_accepts_plain_bytes_and_a_core_store_takes_capacity():
    s = core.Store(capacity=96 * MiB)
    try:
        assert s.stats()["capacity"] == 96 * MiB
    finally:
        s.close()
    assert core.parse_size("80MiB") == 80 * MiB and core.parse_size(1234) == 1234


def test_dropping_refs_makes_room_for_the_next_put():
    init_with_capacity("80MiB")
    held = [store.put(big_tensor()) for _ in range(3)]
    with pytest.raises(StoreFullError):
        store.put(big_tensor())
    del held[0]
    ref = store.put(big_tensor())                 # reclaimed without an explicit free
    assert store.stats()["objects"] == 3
    del ref, held
    gc.collect()
    assert store.stats()["objects"] == 0


def test_free_makes_room_for_the_next_put():
    init_with_capacity("80MiB")
    held = [store.put(big_tensor()) for _ in range(3)]
    store.free(held[1])
    store.put(big_tensor())


def test_dropping_an_outer_ref_makes_room_taken_by_the_objects_it_refers_to():
    init_with_capacity("80MiB")
    inner = store.put(big_tensor())
    middle = store.put({"inner": inner})          # no tensor bytes of its own
    outer = store.put([middle])
    del inner, middle
    held = [store.put(big_tensor()) for _ in range(2)]
    with pytest.raises(StoreFullError):
        store.put(big_tensor())
    del outer                                     # nobody references the inner object any more
    gc.collect()
    store.put(big_tensor())
    assert len(held) == 2


def test_memory_of_dropped_small_objects_does_not_count_against_capacity():
    init_with_capacity("80MiB")
    small = store.put(torch.zeros(16))
    del small
    gc.collect()
    assert store.stats()["bytes_used"] == 0
    held = [store.put(big_tensor()) for _ in range(3)]      # 72 MiB of an empty 80 MiB store
    st = store.stats()
    assert st["objects"] == 3 and st["bytes_used"] <= st["capacity"]
    del held


def test_put_with_timeout_waits_for_another_thread_to_drop_a_ref():
    init_with_capacity("80MiB")
    held = [store.put(big_tensor()) for _ in range(3)]

    def drop_one_later():
        time.sleep(0.2)
        held.pop()

    dropper = threading.Thread(target=drop_one_later)
    dropper.start()
    try:
        ref = store.put(big_tensor(), timeout=30)
    finally:
        dropper.join()
    assert isinstance(ref, ta.ObjectRef)
    assert store.stats()["objects"] == 3


def test_put_with_timeout_gives_up_when_nothing_is_dropped():
    init_with_capacity("80MiB")
    held = [store.put(big_tensor()) for _ in range(3)]
    with pytest.raises((StoreFullError, GetTimeoutError)):
        store.put(big_tensor(), timeout=0.3)
    assert len(held) == 3


def test_small_capacity_store_accepts_small_objects():
    """A 1 MiB store must hold a 1 KiB tensor: 'does not fit' may only mean used + requested > capacity."""
    init_with_capacity("1MiB")
    ref = store.put(torch.zeros(256))
    assert store.get(ref).shape == (256,)
    st = store.stats()
    assert st["bytes_used"] <= st["capacity"] == MiB


# -- lifetime in one process -------------------------------------------------------------------

def test_dropping_the_last_python_reference_releases_the_object():
    before = objects()
    ref = store.put(torch.ones(100))
    assert objects() == before + 1
    del ref
    gc.collect()
    assert objects() == before


def test_every_copy_of_a_ref_keeps_the_object_alive():
    before = objects()
    ref = store.put(torch.arange(10))
    copy = pickle.loads(pickle.dumps(ref))
    del ref
    gc.collect()
    assert objects() == before + 1
    assert store.get(copy).tolist() == list(range(10))
    del copy
    gc.collect()
    assert objects() == before


def test_a_ref_inside_another_stored_object_keeps_its_object_alive():
    before = objects()
    inner = store.put(torch.arange(5.0))
    outer = store.put({"inner": inner, "note": "holds a ref"})
    del inner
    gc.collect()
    assert objects() == before + 2
    got = store.get(outer)["inner"]
    assert torch.equal(store.get(got), torch.arange(5.0))
    del got, outer
    gc.collect()
    assert objects() == before


def test_a_ref_inside_another_stored_object_keeps_it_alive_until_the_outer_object_goes():
    """The same promise as above, without asserting how many reclaim passes it takes."""
    before = objects()
    inner = store.put(torch.arange(5.0))
    outer = store.put([inner])
    del inner
    gc.collect()
    for _ in range(3):
        assert objects() == before + 2
    assert torch.equal(store.get(store.get(outer)[0]), torch.arange(5.0))
    del outer
    gc.collect()
    assert wait_for(lambda: objects() == before, 2.0)


def test_nested_refs_do_not_keep_a_cycle_of_objects_alive_after_the_last_outer_ref_goes():
    before = objects()
    chain = store.put(torch.zeros(3))
    for i in range(5):
        chain = store.put({"next": chain, "i": i})
    gc.collect()
    assert objects() == before + 6
    del chain
    gc.collect()
    assert wait_for(lambda: objects() == before, 2.0)


def test_a_tensor_from_get_keeps_its_memory_valid_after_the_ref_is_dropped():
    ref = store.put(torch.arange(1000.0))
    view = store.get(ref)
    del ref
    gc.collect()
    store.put(torch.zeros(1000))                 # would reuse the block if it had been released
    assert torch.equal(view, torch.arange(1000.0))


def test_free_releases_now_and_a_later_get_raises_object_freed_error():
    before = objects()
    ref = store.put(torch.ones(8))
    copy = pickle.loads(pickle.dumps(ref))
    store.free(ref)
    assert objects() == before
    with pytest.raises(ObjectFreedError) as info:
        store.get(ref)
    assert info.value.object_id == ref.id
    with pytest.raises(ObjectFreedError):
        store.get(copy)
    store.free(ref)                              # freeing twice is harmless


def test_freed_object_stays_freed_when_its_slot_is_reused():
    ref = store.put(torch.ones(8))
    store.free(ref)
    others = [store.put(torch.full((8,), float(i))) for i in range(50)]
    with pytest.raises(ObjectFreedError):
        store.get(ref)
    assert [store.get(o)[0].item() for o in others] == [float(i) for i in range(50)]


def test_a_loop_of_put_get_drop_runs_in_constant_memory():
    ref = store.put(torch.zeros(1000))
    del ref
    gc.collect()
    base = store.stats()
    for i in range(2000):
        ref = store.put(torch.full((1000,), float(i)))
        assert store.get(ref)[0].item() == float(i)
        del ref
    gc.collect()
    after = store.stats()
    assert after["objects"] == base["objects"]
    assert after["bytes_used"] == base["bytes_used"]
    assert after["segments"] <= base["segments"] + 1


# -- stats ---------------------------------------------------------------------------------------

def test_stats_reports_objects_bytes_used_capacity_segments_and_mapped_segments():
    init_with_capacity("256MiB")
    st = store.stats()
    for key in ("objects", "bytes_used", "capacity", "segments", "mapped_segments"):
        assert isinstance(st[key], int), key
    assert st["capacity"] == 256 * MiB
    ref = store.put(torch.zeros(MiB, dtype=torch.uint8))
    st2 = store.stats()
    assert st2["objects"] == st["objects"] + 1
    assert st2["bytes_used"] >= st["bytes_used"] + MiB
    assert st2["segments"] >= 1
    assert st2["bytes_used"] <= st2["capacity"]
    assert ta.stats() == store.stats()
    del ref
    gc.collect()
    st3 = store.stats()
    assert st3["objects"] == st["objects"] and st3["bytes_used"] == st["bytes_used"]


# -- errors survive pickling ---------------------------------------------------------------------

ERROR_EXAMPLES = {
    "TorchActorsError": lambda: errors.TorchActorsError("plain"),
    "ActorError": lambda: errors.ActorError("KeyError", "'k'", "Traceback ...\nKeyError: 'k'\n", "Learner-1", "step"),
    "RemoteTraceback": lambda: errors.RemoteTraceback("Traceback ...\nKeyError: 'k'\n"),
    "ActorDiedError": lambda: errors.ActorDiedError("Learner-1", exit_code=None, signal_name="SIGKILL",
                                                    restarts_left=2, detail="oom"),
    "GetTimeoutError": lambda: errors.GetTimeoutError("get timed out after 0.5s", 0.5),
    "OwnerDiedError": lambda: errors.OwnerDiedError("1.2.3", "process 1 (pid 42)"),
    "ObjectFreedError": lambda: errors.ObjectFreedError("0.5.1", "freed by its owner"),
    "StoreFullError": lambda: errors.StoreFullError(3 * MiB, 5 * MiB, 6 * MiB, "detail"),
    "ConfigError": lambda: errors.ConfigError("job.yaml:3: bad key", file="job.yaml", line=3, key="replica",
                                              allowed=["replicas"]),
}


def test_every_public_error_class_has_a_pickling_example():
    assert set(errors.__all__) == set(ERROR_EXAMPLES)
    for name in errors.__all__:
        assert getattr(ta, name) is getattr(errors, name)


@pytest.mark.parametrize("name", sorted(ERROR_EXAMPLES))
def test_error_survives_pickling_with_its_attributes(name):
    err = ERROR_EXAMPLES[name]()
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err)
    assert str(again) == str(err)
    assert again.args == err.args
    for field in type(err)._fields:
        assert getattr(again, field) == getattr(err, field), field
    assert isinstance(again, errors.TorchActorsError)


def test_errors_are_also_the_builtin_kinds_callers_catch():
    assert issubclass(GetTimeoutError, TimeoutError)
    assert issubclass(errors.ConfigError, ValueError)
