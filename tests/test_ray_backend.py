"""The Ray backend (torchactors/actors/ray_backend.py) on a real local Ray cluster.

Ray starts a cluster of processes of its own, so each scenario runs as a driver script in a
fresh interpreter, as a user's program would; the script reports what it saw as JSON and the
tests assert on it. Skipped where Ray is not installed (``pip install -e ".[test,ray]"``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
MAIN_JOB = REPO / "configs" / "impala_cartpole.yaml"

ACTORS = textwrap.dedent('''
    import os
    import time

    import torch

    import torchactors as ta


    @ta.actor(num_threads=1)
    class Worker:
        def __init__(self, scale, weights=None):
            self.scale = scale
            self.weights = weights
            self.kept = []

        def where(self):
            import ray
            return os.getpid(), ray.get_runtime_context().get_actor_id() is not None

        def env(self, name):
            return os.environ.get(name), torch.get_num_threads()

        def total(self, t):
            return float(t.sum()) * self.scale

        def fill(self, box, value):
            ta.get(box["ref"]).fill_(value)

        def make_and_keep(self, n):
            ref = ta.put(torch.zeros(n))
            self.kept.append(ref)
            return {"ref": ref}

        def read_kept(self):
            return ta.get(self.kept[-1]).tolist()

        def weights_sum(self):
            return float(self.weights.sum())

        def boom(self):
            raise ValueError("bad value on purpose")

        def call_other(self, other, t):
            return ta.get(other.total.remote(t))

        async def later(self, x):
            return x + 1

        def crash(self):
            os._exit(5)


    @ta.actor(max_restarts=1, max_task_retries=1)
    class Fragile:
        def __init__(self, marker):
            self.marker = marker

        def work(self, x):
            if not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os._exit(3)
            return x * 2
''')

SCENARIOS = textwrap.dedent('''
    import json, os, sys, time
    import torch
    import torchactors as ta
    from rayactors import Worker, Fragile

    out = {}
    ta.init(backend="ray", num_threads=1)
    out["driver_pid"] = os.getpid()
    h = Worker.remote(2.0, weights=ta.put(torch.ones(5)))     # a top-level ref arrives as its value
    out["where"] = ta.get(h.where.remote(), timeout=120)
    out["total"] = ta.get(h.total.remote(torch.ones(10)), timeout=60)
    out["ctor_weights"] = ta.get(h.weights_sum.remote(), timeout=60)
    out["status"] = ta.actor_status(h)      # Ray's state API is a dashboard round trip: not offered

    buf = torch.zeros(4)
    ref = ta.put(buf)
    ta.get(h.fill.remote({"ref": ref}, 7.0), timeout=60)
    out["driver_sees_actor_write"] = ta.get(ref).tolist()

    box = ta.get(h.make_and_keep.remote(3), timeout=60)
    ta.get(box["ref"]).fill_(5.0)
    out["actor_sees_driver_write"] = ta.get(h.read_kept.remote(), timeout=60)

    try:
        ta.get(h.boom.remote(), timeout=60)
    except ta.ActorError as e:
        out["error"] = [e.remote_type, e.remote_message, "Traceback" in e.remote_traceback, str(e).splitlines()[0]]

    other = Worker.options(name="other", env={"TA_FLAG": "on"}, num_threads=2).remote(10.0)
    out["env"] = ta.get(other.env.remote("TA_FLAG"), timeout=120)
    out["nested"] = ta.get(h.call_other.remote(other, torch.ones(2)), timeout=120)
    same = ta.get_actor("other")
    out["named"] = ta.get(same.total.remote(torch.ones(1)), timeout=60)
    out["async"] = ta.get(h.later.remote(41), timeout=60)

    refs = [h.total.remote(torch.full((2,), float(i))) for i in range(5)]
    ready, rest = ta.wait(refs, num_returns=5, timeout=60)
    out["wait"] = [len(ready), len(rest), ta.get(refs)]

    doomed = Worker.remote(1.0)
    try:
        ta.get(doomed.crash.remote(), timeout=120)
        out["crash"] = "answered"
    except ta.ActorDiedError as e:
        out["crash"] = [str(e), e.restarting]

    f = Fragile.remote(sys.argv[1])
    out["retried"] = ta.get(f.work.remote(21), timeout=120)

    ta.kill(h)
    try:
        ta.get(h.total.remote(torch.ones(1)), timeout=30)
        out["after_kill"] = "answered"
    except ta.ActorDiedError as e:
        out["after_kill"] = str(e)
    ta.shutdown()
    print("RESULT " + json.dumps(out))
''')


def _run(script: str, tmp: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    (tmp / "rayactors.py").write_text(ACTORS)
    (tmp / "scenario.py").write_text(script)
    return subprocess.run([sys.executable, "scenario.py", *args], cwd=tmp, capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "PYTHONPATH": f"{tmp}:{REPO}"})


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("ray")
    r = _run(SCENARIOS, tmp, str(tmp / "fragile-died-once"))
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"the scenario script failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_actors_are_ray_actors_in_processes_of_their_own(seen):
    pid, in_ray_actor = seen["where"]
    assert pid != seen["driver_pid"] and in_ray_actor


def test_actor_status_is_unknown_on_the_ray_backend(seen):
    assert seen["status"] is None


def test_tensor_arguments_and_constructor_arguments_arrive(seen):
    assert seen["total"] == 20.0 and seen["ctor_weights"] == 5.0


def test_refs_on_one_node_alias_the_same_memory_both_ways(seen):
    assert seen["driver_sees_actor_write"] == [7.0] * 4     # the actor wrote into the driver's object
    assert seen["actor_sees_driver_write"] == [5.0] * 3     # and the driver into the actor's


def test_a_method_error_comes_back_as_actor_error(seen):
    remote_type, message, has_traceback, first_line = seen["error"]
    assert (remote_type, message, has_traceback) == ("ValueError", "bad value on purpose", True)
    assert "boom" in first_line


def test_handles_names_async_and_wait_work_as_on_the_local_backend(seen):
    assert seen["env"] == ["on", 2]
    assert seen["nested"] == 20.0 and seen["named"] == 10.0 and seen["async"] == 42
    assert seen["wait"] == [5, 0, [0.0, 4.0, 8.0, 12.0, 16.0]]


def test_a_death_without_restarts_is_an_actor_died_error_with_rays_word(seen):
    message, restarting = seen["crash"]
    assert "will not be restarted" in message and "Ray says" in message and restarting is False


def test_a_call_pending_at_a_death_is_retried_by_ray(seen):
    assert seen["retried"] == 42


def test_calls_after_kill_raise_actor_died_error(seen):
    assert "killed with ta.kill()" in seen["after_kill"]


@pytest.mark.timeout(300)
def test_the_main_job_runs_on_the_ray_backend(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torchactors.jobs.cli", "run", str(MAIN_JOB), "runtime.backend=ray",
                        "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["reached_target"] is True and summary["stopped_by"] == "target_return"


TWO_NODES = textwrap.dedent('''
    import json
    import torch
    from ray.cluster_utils import Cluster
    import torchactors as ta
    from rayactors import Worker

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"near": 1}})
    cluster.add_node(num_cpus=1, resources={"far": 1})
    out = {}
    try:
        ta.init(backend="ray", address=cluster.address, num_threads=1)
        far = Worker.options(ray_options={"resources": {"far": 1}}).remote(3.0)
        near = Worker.options(ray_options={"resources": {"near": 1}}).remote(1.0)      # the driver's node
        out["total"] = ta.get(far.total.remote(torch.ones(10)), timeout=120)
        ref = ta.put(torch.zeros(4))
        ta.get(far.fill.remote({"ref": ref}, 7.0), timeout=60)
        out["driver_object_after_far_write"] = ta.get(ref).tolist()
        box = ta.get(far.make_and_keep.remote(3), timeout=60)
        out["far_result"] = [type(box["ref"]).__name__, ta.get(box["ref"]).tolist()]
        ta.get(near.fill.remote({"ref": ref}, 5.0), timeout=120)
        out["driver_object_after_near_write"] = ta.get(ref).tolist()
        out["far_calls_near"] = ta.get(far.call_other.remote(near, torch.ones(2)), timeout=120)
    finally:
        ta.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(out))
''')


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_across_nodes_messages_travel_by_value_and_on_one_node_by_ref(tmp_path):
    """Two Ray nodes on this machine (ray.cluster_utils.Cluster): an actor placed on the other
    node gets copies; one on the driver's node aliases the driver's objects."""
    r = _run(TWO_NODES, tmp_path, timeout=380)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"the scenario script failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    seen = json.loads(lines[-1][len("RESULT "):])
    assert seen["total"] == 30.0
    assert seen["driver_object_after_far_write"] == [0.0] * 4, "the far actor wrote into a copy"
    assert seen["far_result"] == ["ObjectRef", [0.0, 0.0, 0.0]], "a far ref arrives as a ref to a copy"
    assert seen["driver_object_after_near_write"] == [5.0] * 4, "a near actor aliases the object"
    assert seen["far_calls_near"] == 2.0


def test_a_message_for_another_node_carries_values_and_refs_to_copies():
    # Across nodes no process can map our store: tensors travel as bytes, and a ref as its
    # value, put again on arrival (here the receiver is this process, for the sake of the test).
    import pickle

    import torch

    import torchactors as ta
    from torchactors.actors.ray_backend import dumps_by_value

    t = torch.arange(6.0)
    ref = ta.put(t)
    body = dumps_by_value(((t, {"ref": ref}), {"k": [ref]}))
    (t2, box), kwargs = pickle.loads(body)
    assert type(t2) is torch.Tensor and torch.equal(t2, t) and t2.data_ptr() != t.data_ptr()
    for copy in (box["ref"], kwargs["k"][0]):
        assert isinstance(copy, ta.ObjectRef) and copy != ref and torch.equal(ta.get(copy), t)
    ta.get(box["ref"])[0] = 99.0
    assert ta.get(ref)[0].item() == 0.0 and t[0].item() == 0.0, "a copy, not an alias"
    del ref, box, kwargs
    ta.shutdown()
