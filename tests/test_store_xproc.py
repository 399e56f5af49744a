"""The object store across real processes: a driver (this process) and actor processes.

Gets in another process are views of the owner's shared memory (writes travel, nothing is
copied); call arguments and results travel through the store; an object lives while a ref to
it exists in any process, in flight included; free() is reported in every process. (Owner
death is in test_store_leaks.py, with the checks that share its killed actor.)
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time

import pytest
import torch
from conftest import StoreProcess, wait_for

import torchactors as ta
from torchactors import store
from torchactors.actors.calls import encode_args
from torchactors.errors import ObjectFreedError


def mapping_name(ptr: int) -> str:
    """The file behind the memory mapping of this process that contains address ``ptr``."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                return fields[5].strip() if len(fields) > 5 else "[anonymous]"
    return "[unmapped]"


@dataclasses.dataclass
class Rollout:
    obs: torch.Tensor
    rewards: torch.Tensor
    step: int


@ta.actor(num_threads=1)
class Peer(StoreProcess):
    """Another process of the job, doing to the store what a test asks."""

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    # refs passed nested in a dict stay refs (top-level refs arrive as values)
    def write_into(self, box: dict, index: int, value: float) -> None:
        store.get(box["ref"]).view(-1)[index] = value

    def sum_of(self, box: dict) -> float:
        return float(store.get(box["ref"]).sum())

    def sum_of_nested(self, box: dict) -> float:
        inner = store.get(box["ref"])["inner"]
        return float(store.get(inner).sum())

    def hold(self, box: dict) -> None:
        self.held.append(box["ref"])

    def drop_held(self) -> None:
        self.held.clear()

    def get_held(self) -> str:
        try:
            return repr(store.get(self.held[-1]).tolist())
        except Exception as e:          # the test wants the error's type, not an ActorError
            return type(e).__name__

    def try_get(self, box: dict) -> str:
        try:
            store.get(box["ref"])
            return "ok"
        except Exception as e:
            return type(e).__name__

    def free(self, box: dict) -> None:
        store.free(box["ref"])

    def put_and_return(self, n: int) -> dict:
        """Put an object and return its ref; this process keeps no ref to it."""
        return {"ref": store.put(torch.arange(n, dtype=torch.float32))}

    def objects_after(self, seconds: float) -> int:
        time.sleep(seconds)
        return store.stats()["objects"]       # stats() reclaims what nobody references

    def mapping_of(self, t: torch.Tensor) -> str:
        return mapping_name(t.data_ptr())

    def mappings_of(self, obj: dict) -> list:
        return [mapping_name(obj["a"].data_ptr()), mapping_name(obj["b"][0].data_ptr()),
                mapping_name(obj["rollout"].obs.data_ptr())]

    def write_arg(self, t: torch.Tensor, value: float) -> None:
        t.view(-1)[0] = value

    def write_first_read_second(self, a: torch.Tensor, b: torch.Tensor) -> float:
        a[0] = 42.0
        return float(b[0])

    def echo(self, obj):
        return obj

    def full(self, n: int, value: float) -> torch.Tensor:
        return torch.full((n,), value)

    def check_sharing(self, box: dict) -> dict:
        new = store.get(box["ref"])
        ptr = new[0].data_ptr()
        shared = [t.untyped_storage().data_ptr() == ptr for t in new[1:]]
        new[2][1] = 100.0                   # x[2, 1]: also x[:, 1][2]
        return {"shared": shared, "seen_in_x": float(new[1][2, 1]), "seen_in_col": float(new[3][2])}

    def views_of_one_storage(self) -> list:
        x = torch.arange(25.0).reshape(5, 5)
        return [x, x[2], x[:, 1]]

    def same_memory_twice(self, box: dict) -> tuple:
        before = store.stats()["mapped_segments"]
        a = store.get(box["ref"])
        b = store.get(box["ref"])
        return a.data_ptr() == b.data_ptr(), store.stats()["mapped_segments"] - before


@pytest.fixture(scope="module")
def peer():
    ta.init(num_threads=1)
    h = Peer.remote()
    # Meet each other once (tables, first mapping), so tests see steady state.
    warm = store.put(torch.zeros(4))
    assert ta.get(h.sum_of.remote({"ref": warm})) == 0.0
    ta.get(h.put_and_return.remote(4))
    yield h
    ta.kill(h)


def driver_objects() -> int:
    return store.stats()["objects"]


def peer_objects(peer) -> int:
    return ta.get(peer.stats.remote())["objects"]


# -- get in another process is a view, not a copy ----------------------------------------------

def test_get_in_other_process_is_a_view_not_a_copy(peer):
    ref = store.put(torch.zeros(8))
    mine = store.get(ref)
    ta.get(peer.write_into.remote({"ref": ref}, 3, 7.0))
    assert mine[3].item() == 7.0                  # the view I already had
    assert store.get(ref)[3].item() == 7.0        # and a fresh get


def test_large_object_in_its_own_segment_is_a_view_in_another_process_too(peer):
    ref = store.put(torch.zeros(6 << 20))            # 24 MiB: a dedicated segment, not an arena block
    mine = store.get(ref)
    ta.get(peer.write_into.remote({"ref": ref}, (6 << 20) - 1, 1.5))
    assert mine[-1].item() == 1.5
    assert ta.get(peer.sum_of.remote({"ref": ref})) == 1.5


def test_get_in_driver_of_an_actor_owned_object_is_a_view_of_the_actors_memory(peer):
    box = ta.get(peer.put_and_keep.remote(6))
    pid = ta.get(peer.pid.remote())
    mine = store.get(box["ref"])
    assert f"memfd:torchactors-{pid}-" in mapping_name(mine.data_ptr())
    mine[0] = -5.0
    assert ta.get(peer.get_held.remote()) == repr([-5.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    ta.get(peer.drop_held.remote())


def test_two_gets_of_one_ref_share_memory_and_map_each_segment_once(peer):
    box = ta.get(peer.put_and_keep.remote(1000))
    box2 = ta.get(peer.put_and_keep.remote(1000))    # same arena segment
    a = store.get(box["ref"])
    mapped = store.stats()["mapped_segments"]
    views = [store.get(box["ref"]) for _ in range(20)] + [store.get(box2["ref"]) for _ in range(20)]
    assert all(v.data_ptr() == a.data_ptr() for v in views[:20])
    assert store.stats()["mapped_segments"] == mapped
    # and the same in the actor, for an object this process owns
    same, grew = ta.get(peer.same_memory_twice.remote({"ref": store.put(torch.ones(100))}))
    assert same and grew == 0
    ta.get(peer.drop_held.remote())


def test_views_of_one_storage_come_back_as_views_of_one_storage_in_another_process(peer):
    x = torch.randn(5, 5)
    ref = store.put([x.untyped_storage(), x, x[2], x[:, 1]])
    result = ta.get(peer.check_sharing.remote({"ref": ref}))
    assert result == {"shared": [True, True, True], "seen_in_x": 100.0, "seen_in_col": 100.0}
    mine = store.get(ref)                          # the actor's write is in my views too
    assert mine[1][2, 1].item() == 100.0 and mine[3][2].item() == 100.0
    assert x[2, 1].item() != 100.0                 # put was a snapshot of x


# -- call arguments and results travel through the store -------------------------------------

def test_tensor_argument_arrives_as_a_view_of_the_callers_segment(peer):
    t = torch.arange(16.0)
    where = ta.get(peer.mapping_of.remote(t))
    assert f"memfd:torchactors-{os.getpid()}-" in where


def test_tensors_nested_in_arguments_arrive_as_views_of_the_callers_segments(peer):
    arg = {"a": torch.ones(3), "b": [torch.zeros(2, 2)], "rollout": Rollout(torch.randn(4, 2), torch.ones(4), 3)}
    where = ta.get(peer.mappings_of.remote(arg))
    assert all(f"memfd:torchactors-{os.getpid()}-" in w for w in where), where


def test_call_arguments_carry_refs_not_tensor_bytes():
    big = torch.zeros(1 << 20)                     # 4 MiB
    body, held = encode_args((big, {"nested": [big[:10]]}), {"kw": torch.ones(1000)}, store.put)
    assert len(body) < 2048, len(body)
    assert held and all(isinstance(r, ta.ObjectRef) for r in held)


def test_actor_writes_through_a_shared_memory_argument_and_the_caller_sees_it(peer):
    t = torch.zeros(4).share_memory_()
    ta.get(peer.write_arg.remote(t, 3.5))
    assert t[0].item() == 3.5


def test_one_tensor_passed_twice_in_a_call_arrives_as_one_object(peer):
    t = torch.zeros(3)
    assert ta.get(peer.write_first_read_second.remote(t, t)) == 42.0


def test_tensor_result_is_a_view_of_the_actors_segment(peer):
    pid = ta.get(peer.pid.remote())
    out = ta.get(peer.full.remote(1000, 2.5))
    assert torch.equal(out, torch.full((1000,), 2.5))
    assert f"memfd:torchactors-{pid}-" in mapping_name(out.data_ptr())


def test_views_of_one_storage_in_a_result_come_back_as_views_of_one_storage(peer):
    x, row, col = ta.get(peer.views_of_one_storage.remote())
    assert torch.equal(x, torch.arange(25.0).reshape(5, 5))
    assert row.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() == col.untyped_storage().data_ptr()
    x[2, 1] = -1.0
    assert row[1].item() == -1.0 and col[2].item() == -1.0


def test_every_kind_of_tensor_survives_a_trip_through_an_actor_and_back(peer):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 5, generator=g)
    i = torch.tensor([[0, 2], [1, 0]])
    obj = {
        "dtypes": {str(dt): (torch.randn(3, 4, generator=g) * 100).to(dt)
                   for dt in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                              torch.float16, torch.bfloat16, torch.float32, torch.float64,
                              torch.complex64, torch.complex128)},
        "zero_d": torch.tensor(1.25),
        "empty": torch.empty(0, 7),
        "transposed": base.t(),
        "strided": base[::2, 1::2],
        "expanded": torch.arange(3.0).expand(4, 3),
        "param": torch.nn.Parameter(torch.ones(2)),
        "int_param": torch.nn.Parameter(torch.arange(3), requires_grad=False),
        "leaf": torch.ones(2, requires_grad=True),
        "meta": torch.empty(2, 3, device="meta"),
        "sparse": torch.sparse_coo_tensor(i, torch.tensor([1.0, 2.0]), (3, 3), check_invariants=True),
        "rollout": Rollout(torch.ones(2), torch.zeros(2), 5),
    }
    back = ta.get(peer.echo.remote(obj))
    for name, t in obj["dtypes"].items():
        assert back["dtypes"][name].dtype == t.dtype and torch.equal(back["dtypes"][name], t), name
    assert back["zero_d"].dim() == 0 and back["zero_d"].item() == 1.25
    assert back["empty"].shape == (0, 7)
    for name in ("transposed", "strided", "expanded"):
        assert torch.equal(back[name], obj[name]), name
    assert isinstance(back["param"], torch.nn.Parameter) and back["param"].requires_grad
    assert isinstance(back["int_param"], torch.nn.Parameter) and not back["int_param"].requires_grad
    assert back["leaf"].requires_grad and back["leaf"].is_leaf
    assert back["meta"].is_meta and back["meta"].shape == (2, 3)
    assert back["sparse"].layout == torch.sparse_coo and torch.equal(back["sparse"].to_dense(),
                                                                    obj["sparse"].to_dense())
    assert isinstance(back["rollout"], Rollout) and back["rollout"].step == 5


def test_non_leaf_argument_is_refused_with_a_hint_to_detach(peer):
    y = torch.ones(2, requires_grad=True) * 2
    with pytest.raises(Exception, match=r"detach\(\)"):
        peer.echo.remote(y)


# -- lifetime across processes -------------------------------------------------------------------

def test_a_borrowed_ref_keeps_the_object_alive_after_its_owner_dropped_its_own(peer):
    before = peer_objects(peer)
    box = ta.get(peer.put_and_return.remote(50))   # the actor kept no ref
    assert ta.get(peer.objects_after.remote(0.0)) == before + 1
    assert torch.equal(store.get(box["ref"]), torch.arange(50, dtype=torch.float32))
    del box
    gc.collect()
    assert wait_for(lambda: peer_objects(peer) == before, 5.0)


def test_a_result_ref_in_flight_keeps_its_object_alive(peer):
    before = peer_objects(peer)
    result = peer.put_and_return.remote(30)        # reply sent, not read by us yet
    count = peer.objects_after.remote(0.3)        # the actor reclaims while the ref is in flight
    assert ta.get(count) >= before + 1             # the object (and the reply holding its ref)
    assert torch.equal(store.get(ta.get(result)["ref"]), torch.arange(30, dtype=torch.float32))
    del result
    gc.collect()
    assert wait_for(lambda: peer_objects(peer) == before, 5.0)


def test_a_ref_in_a_call_not_yet_read_keeps_its_object_alive(peer):
    before = driver_objects()
    busy = peer.sleep.remote(0.5)                  # the actor reads our next call only later
    ref = store.put(torch.full((100,), 2.0))
    call = peer.sum_of.remote({"ref": ref})
    del ref
    gc.collect()
    assert driver_objects() == before + 1          # stats() reclaims: the ref in flight counts
    assert ta.get(call) == 200.0
    ta.get(busy)
    del call
    gc.collect()
    assert wait_for(lambda: driver_objects() == before, 5.0)


def test_a_ref_inside_a_stored_object_in_flight_keeps_both_alive(peer):
    before = driver_objects()
    busy = peer.sleep.remote(0.3)
    inner = store.put(torch.ones(10))
    outer = store.put({"inner": inner})
    call = peer.sum_of_nested.remote({"ref": outer})
    del inner, outer
    gc.collect()
    driver_objects()
    assert ta.get(call) == 10.0
    ta.get(busy)
    del call
    gc.collect()
    assert wait_for(lambda: driver_objects() == before, 5.0)


def test_a_ref_held_by_another_process_keeps_the_object_alive_until_it_drops_it(peer):
    before = driver_objects()
    ref = store.put(torch.arange(4.0))
    ta.get(peer.hold.remote({"ref": ref}))
    del ref
    gc.collect()
    time.sleep(0.1)
    assert driver_objects() == before + 1
    assert ta.get(peer.get_held.remote()) == repr([0.0, 1.0, 2.0, 3.0])
    ta.get(peer.drop_held.remote())
    assert wait_for(lambda: driver_objects() == before, 5.0)


def test_free_in_the_owner_makes_a_later_get_in_another_process_raise_object_freed(peer):
    ref = store.put(torch.ones(5))
    ta.get(peer.hold.remote({"ref": ref}))
    store.free(ref)
    with pytest.raises(ObjectFreedError):
        store.get(ref)
    assert ta.get(peer.get_held.remote()) == "ObjectFreedError"
    assert ta.get(peer.try_get.remote({"ref": ref})) == "ObjectFreedError"
    ta.get(peer.drop_held.remote())


def test_free_by_the_owner_of_an_object_another_process_borrowed(peer):
    box = ta.get(peer.put_and_keep.remote(5))
    ta.get(peer.free.remote({"ref": box["ref"]}))          # the actor owns it and frees it
    with pytest.raises(ObjectFreedError):
        store.get(box["ref"])
    ta.get(peer.drop_held.remote())


def test_free_by_a_borrower_makes_a_later_get_in_the_owner_raise_object_freed(peer):
    ref = store.put(torch.ones(5))
    ta.get(peer.free.remote({"ref": ref}))                 # the actor borrows it and frees it
    with pytest.raises(ObjectFreedError):
        store.get(ref)


def test_free_by_a_borrower_releases_the_owners_object(peer):
    before = driver_objects()
    ref = store.put(torch.ones(5))
    ta.get(peer.free.remote({"ref": ref}))
    assert ta.get(peer.try_get.remote({"ref": ref})) == "ObjectFreedError"
    assert wait_for(lambda: driver_objects() == before, 5.0)   # the owner acts on it
    with pytest.raises(ObjectFreedError):
        store.get(ref)


def test_dropping_the_last_ref_in_every_process_releases_the_object(peer):
    before = driver_objects()
    ref = store.put(torch.ones(3))
    ta.get(peer.hold.remote({"ref": ref}))
    ta.get(peer.hold.remote({"ref": ref}))
    del ref
    gc.collect()
    assert driver_objects() == before + 1
    ta.get(peer.drop_held.remote())
    assert wait_for(lambda: driver_objects() == before, 5.0)


# Owner death (SIGKILL of an actor that put objects) is tested in test_store_leaks.py, with the
# leak checks that need the same killed actor.
