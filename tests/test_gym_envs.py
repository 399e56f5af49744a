"""Gymnasium environments in actor/learner jobs: envs built from a job file's ``env:`` spec
(vector, pixel, envpool), its validation errors with file:line, the model the spaces choose,
a real rollout actor stepping a real gymnasium env into a real learner, and the CartPole-gym
job learning. Skips cleanly where gymnasium (``pip install -e ".[envs]"``), ale-py or envpool
is not installed."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import torch

import torchactors as ta
from torchactors.errors import ConfigError
from torchactors.jobs.config import load_config
from torchactors.rl.gym_env import GymVecEnv, check_spec
from torchactors.rl.impala import Learner, RolloutActor
from torchactors.rl.model import NatureCNN, PolicyValueNet, build_model

gym = pytest.importorskip("gymnasium", reason='gymnasium is not installed (pip install -e ".[envs]")')

REPO = Path(__file__).resolve().parents[1]


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


needs_atari = pytest.mark.skipif(not (_has("ale_py") and _has("cv2")), reason='needs ale-py and opencv ([envs])')
needs_envpool = pytest.mark.skipif(not _has("envpool"), reason='envpool is not installed (pip install -e ".[envpool]")')

ATARI = {"id": "BreakoutNoFrameskip-v4", "num_envs": 2,
         "wrappers": [{"AtariPreprocessing": {"frame_skip": 4, "screen_size": 84, "noop_max": 30}},
                      {"FrameStackObservation": {"stack_size": 4}}]}


def _cartpole_returns(env: GymVecEnv, steps: int) -> tuple[int, torch.Tensor]:
    """Step with alternating actions; the number of episode ends seen and the returns recorded."""
    dones = 0
    for t in range(steps):
        step = env.step(torch.full((env.num_envs,), t % 2, dtype=torch.int64) if t % 7 else
                        torch.ones(env.num_envs, dtype=torch.int64))
        done = step.terminated | step.truncated
        dones += int(done.sum())
        if done.any():  # same-step reset: the final observation is not the one returned
            assert not torch.equal(step.final_obs[done], step.obs[done])
        torch.testing.assert_close(step.final_obs[~done], step.obs[~done])
    return dones, env.pop_episode_returns()


# --------------------------------------------------------------------------- envs from a spec


def test_sync_vector_env_is_gymnasiums_own_cartpole():
    env = GymVecEnv({"id": "CartPole-v1", "num_envs": 4}, seed=5)
    ref = gym.make_vec("CartPole-v1", num_envs=4, vectorization_mode="sync",
                       vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    try:
        assert env.spaces.obs_shape == (4,) and env.spaces.obs_dtype == torch.float32 and env.spaces.num_actions == 2
        obs = env.reset()
        ref_obs, _ = ref.reset(seed=5)
        assert obs.shape == (4, 4) and obs.dtype == torch.float32
        torch.testing.assert_close(obs, torch.from_numpy(ref_obs))
        lengths = torch.zeros(4)
        ended = []
        for t in range(80):
            a = torch.tensor([t % 2, 1, 0, (t // 3) % 2])
            step = env.step(a)
            ref_obs, ref_r, ref_term, ref_trunc, _ = ref.step(a.numpy())
            torch.testing.assert_close(step.obs, torch.from_numpy(ref_obs))
            assert step.reward.dtype == torch.float32 and step.reward.tolist() == ref_r.tolist()
            assert step.terminated.tolist() == ref_term.tolist() and step.truncated.tolist() == ref_trunc.tolist()
            lengths += 1
            done = step.terminated | step.truncated
            ended += lengths[done].tolist()
            lengths[done] = 0
        # RecordEpisodeStatistics' returns are CartPole's lengths (reward 1 a step), in step order per env.
        assert sorted(env.pop_episode_returns().tolist()) == sorted(ended) and len(ended) >= 8
        assert env.pop_episode_returns().numel() == 0
    finally:
        env.close()
        ref.close()


@needs_atari
def test_pixel_env_from_config_is_84x84x4_uint8_and_gets_the_nature_cnn():
    env = GymVecEnv(ATARI, seed=0)
    try:
        obs = env.reset()
        assert obs.shape == (2, 4, 84, 84) and obs.dtype == torch.uint8 and int(obs.max()) > 0
        assert env.spaces.pixels and env.spaces.num_actions == 4
        step = env.step(torch.tensor([1, 3]))
        assert step.obs.shape == (2, 4, 84, 84) and step.reward.shape == (2,)
        # Stacked frames shift by one each step: the newest of the last step is the second newest now.
        torch.testing.assert_close(step.obs[:, 2], obs[:, 3])
    finally:
        env.close()
    model = build_model(env.spaces)
    assert isinstance(model, NatureCNN)
    logits, value = model(torch.zeros(3, 2, 4, 84, 84, dtype=torch.uint8))
    assert logits.shape == (3, 2, 4) and value.shape == (3, 2)


@needs_envpool
def test_envpool_backend_steps_with_same_step_reset_and_gymnasium_episode_stats():
    env = GymVecEnv({"id": "CartPole-v1", "num_envs": 4, "vectorization": "envpool", "kwargs": {"num_threads": 1}},
                    seed=3)
    try:
        assert env.reset().shape == (4, 4)
        dones, returns = _cartpole_returns(env, 100)
        assert dones == len(returns) >= 4
        assert all(r == int(r) and 8 <= r <= 100 for r in returns.tolist())
    finally:
        env.close()


@needs_envpool
def test_envpool_atari_spec_gives_pixels():
    spaces = check_spec({"id": "Breakout-v5", "num_envs": 2, "vectorization": "envpool"})
    assert spaces.obs_shape == (4, 84, 84) and spaces.obs_dtype == torch.uint8 and spaces.num_actions == 4


def test_vector_observations_get_an_mlp_sized_to_the_spaces():
    spaces = check_spec({"id": "Acrobot-v1"})
    assert spaces.obs_shape == (6,) and spaces.num_actions == 3
    model = build_model(spaces, hidden=32)
    assert isinstance(model, PolicyValueNet)
    logits, value = model(torch.zeros(5, 7, 6))
    assert logits.shape == (5, 7, 3) and value.shape == (5, 7)


# --------------------------------------------------------------------------- validation


JOB = textwrap.dedent("""\
    job: {name: gymtest}
    roles:
      rollout:
        class: "torchactors.rl.impala:RolloutActor"
        args:
          env: &env
            id: CartPole-v1
            num_envs: 4
            vectorization: sync
            kwargs: {}
            wrappers: []
      learner:
        class: "torchactors.rl.impala:Learner"
        args: {env: *env}
    program: "torchactors.rl.impala:train"
    """)
ID_LINE, VEC_LINE, KWARGS_LINE, WRAPPERS_LINE = 7, 9, 10, 11


def _job(tmp_path: Path, **replace: str) -> Path:
    text = JOB
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def _error(path: Path, *overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value


def test_the_shipped_gym_configs_validate():
    cfg = load_config(REPO / "configs" / "impala_cartpole_gym.yaml")
    env = cfg.roles["rollout"].args["env"]
    assert env == cfg.roles["learner"].args["env"] == {"id": "CartPole-v1", "num_envs": 64, "vectorization": "sync",
                                                       "kwargs": {}, "wrappers": []}
    if _has("ale_py") and _has("cv2"):
        atari = load_config(REPO / "configs" / "impala_atari.yaml")
        assert atari.roles["rollout"].args["env"]["wrappers"][1] == {"FrameStackObservation": {"stack_size": 4}}


def test_defaults_are_filled_for_a_minimal_spec(tmp_path):
    minimal = {f"        {line}\n": "" for line in ("num_envs: 4", "vectorization: sync", "kwargs: {}", "wrappers: []")}
    cfg = load_config(_job(tmp_path, **minimal))
    assert cfg.roles["rollout"].args["env"] == {"id": "CartPole-v1", "num_envs": 1, "vectorization": "sync",
                                                "kwargs": {}, "wrappers": []}


@pytest.mark.parametrize("replace, line, words", [
    ({"id: CartPole-v1": "id: CartPol-v1"}, ID_LINE, ["'CartPol-v1' is not registered", "did you mean CartPole-v1"]),
    ({"kwargs: {}": "kwargs: {gravity: 3}"}, KWARGS_LINE, ["does not accept env.kwargs", "gravity"]),
    ({"wrappers: []": "wrappers: [NoSuchWrapper]"}, WRAPPERS_LINE, ["unknown wrapper 'NoSuchWrapper'",
                                                                  "FrameStackObservation"]),
    ({"wrappers: []": "wrappers:\n        - TimeAwareObservation: {flaten: true}"}, WRAPPERS_LINE + 1,
     ["TimeAwareObservation takes no argument 'flaten'", "flatten"]),
    ({"wrappers: []": "wrappers: [{'nosuchmodule:Wrapper': {}}]"}, WRAPPERS_LINE, ["cannot import module"]),
    ({"vectorization: sync": "vectorization: threads"}, VEC_LINE, ["vectorization", "sync, async, envpool"]),
    ({"num_envs: 4": "num_env: 4"}, 8, ["unknown key 'num_env' in roles.rollout.args.env", "num_envs"]),
    ({"id: CartPole-v1": "id: Pendulum-v1"}, ID_LINE, ["only discrete actions are supported", "Box"]),
    ({"id: CartPole-v1": "id: FrozenLake-v1"}, WRAPPERS_LINE, ["observation space is Discrete",
                                                               "vectors (an MLP)"]),
])
def test_a_bad_env_spec_is_a_config_error_at_its_line(tmp_path, replace, line, words):
    err = _error(_job(tmp_path, **replace))
    assert err.line == line, str(err)
    assert str(err).startswith(f"{tmp_path / 'job.yaml'}:{line}: ") and "roles.rollout.args.env" in str(err), str(err)
    for w in words:
        assert w in str(err)


def test_an_override_of_the_env_is_named_in_the_error(tmp_path):
    err = _error(_job(tmp_path), "roles.rollout.args.env.id=NoSuchEnv-v0")
    assert "override 'roles.rollout.args.env.id=NoSuchEnv-v0'" in str(err) and "not registered" in str(err)


def test_the_learner_env_is_checked_too(tmp_path):
    err = _error(_job(tmp_path, **{"args: {env: *env}": "args: {env: {id: CartPole-v1, num_envs: 0}}"}))
    assert err.line == 14 and "roles.learner.args.env.num_envs" in str(err) and "int >= 1" in str(err)


def test_roles_whose_envs_would_give_different_models_are_refused(tmp_path):
    err = _error(_job(tmp_path), "roles.learner.args.env.id=Acrobot-v1")
    assert err.line == 14  # the learner's env
    assert "gives observations (6,)" in str(err) and "roles.rollout.args.env gives (4,)" in str(err)
    assert "env: &env" in str(err)


def test_missing_gymnasium_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # `import gymnasium` now fails as if not installed
    err = _error(_job(tmp_path))
    assert err.line == ID_LINE and "gymnasium is not installed" in str(err) and 'pip install -e ".[envs]"' in str(err)


def test_missing_ale_py_for_an_atari_id_says_how_to_install_it(tmp_path):
    """In a fresh process: once ale_py has registered its games in this one, they stay registered."""
    job = _job(tmp_path, **{"id: CartPole-v1": "id: ALE/Pong-v5"})
    code = ("import sys; sys.modules['ale_py'] = None\n"
            "from torchactors.jobs.config import load_config\n"
            f"load_config({str(job)!r})")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "ConfigError" in r.stderr
    assert f"job.yaml:{ID_LINE}:" in r.stderr and "needs ale-py" in r.stderr and 'pip install -e ".[envs]"' in r.stderr


def test_missing_envpool_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "envpool", None)
    err = _error(_job(tmp_path, **{"vectorization: sync": "vectorization: envpool"}))
    assert err.line == VEC_LINE and "needs envpool" in str(err) and 'pip install -e ".[envpool]"' in str(err)


@needs_envpool
def test_envpool_refuses_gymnasium_wrappers_and_unknown_options(tmp_path):
    err = _error(_job(tmp_path, **{"vectorization: sync": "vectorization: envpool",
                                   "wrappers: []": "wrappers: [FlattenObservation]"}))
    assert err.line == WRAPPERS_LINE and "takes no gymnasium wrappers" in str(err)
    err = _error(_job(tmp_path, **{"vectorization: sync": "vectorization: envpool", "kwargs: {}": "kwargs: {bogus: 1}"}))
    assert err.line == KWARGS_LINE and "bogus" in str(err)


# --------------------------------------------------------------------------- actor -> learner


@pytest.fixture(scope="module")
def runtime():
    ta.init(num_threads=1)
    yield
    ta.shutdown()


def test_a_gym_rollout_travels_from_a_real_actor_into_the_learner(runtime):
    spec = {"id": "CartPole-v1", "num_envs": 8}
    T = 25
    actor = ta.actor(num_threads=1)(RolloutActor).remote(env=spec, unroll_length=T, seed=1, replica_index=0)
    learner = ta.actor(num_threads=1)(Learner).remote(env=spec)
    try:
        ta.get(actor.set_weights.remote(learner.weights.remote(), 0))
        last_obs, episodes, dones, version = None, 0, 0, 0
        for i in range(4):
            ref = actor.rollout.remote()
            u = ta.get(ref)
            assert u["obs"].shape == (T + 1, 8, 4) and u["obs"].dtype == torch.float32
            assert u["final_obs"].shape == (int(u["truncated"].sum()), 4) and u["behaviour_logits"].shape == (T, 8, 2)
            assert u["actions"].dtype == torch.int64 and set(u["actions"].unique().tolist()) <= {0, 1}
            assert u["rewards"].dtype == torch.float32 and bool((u["rewards"] == 1).all())  # CartPole: 1 a step
            assert u["dones"].dtype == torch.bool and u["truncated"].dtype == torch.bool
            assert u["version"] == version  # the weights it was last sent
            # Observations stay within CartPole's bounds; consecutive unrolls continue the same episodes.
            assert float(u["obs"][..., 2].abs().max()) < 0.25
            if last_obs is not None:
                torch.testing.assert_close(u["obs"][0], last_obs)
            last_obs = u["obs"][-1].clone()
            # Every episode that ended is in gymnasium's statistics, with a CartPole-sized return.
            assert u["episode_returns"].numel() == int(u["dones"].sum())
            assert all(r == int(r) and 8 <= r <= 500 for r in u["episode_returns"].tolist())
            episodes += u["episode_returns"].numel()
            dones += int(u["dones"].sum())
            del u
            stats = ta.get(learner.update.remote(ref))
            assert math.isfinite(stats["loss"]) and stats["updates"] == i + 1
            version = stats["version"]
            ta.get(actor.set_weights.remote(learner.weights.remote(), version))
        assert episodes == dones >= 4  # a random policy ends CartPole episodes in ~20 steps
    finally:
        ta.kill(actor)
        ta.kill(learner)


def test_async_vectorization_runs_the_copies_in_processes_of_the_actor(runtime):
    """Async workers are the actor's children (spawned: the actor runs threads), and go with it."""
    actor = ta.actor(num_threads=1)(RolloutActor).remote(
        env={"id": "CartPole-v1", "num_envs": 2, "vectorization": "async"}, unroll_length=40, seed=2)
    try:
        u = ta.get(actor.rollout.remote())
        assert u["obs"].shape == (41, 2, 4) and u["episode_returns"].numel() == int(u["dones"].sum()) > 0
        del u
        workers = [p for p in psutil.Process().children(recursive=True)
                   if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]
        assert len(workers) >= 2, [p.cmdline() for p in workers]
    finally:
        ta.kill(actor)
    # Orphaned workers would leave this process tree (re-parented), out of the leak check's sight.
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, [p.pid for p in alive]


@needs_atari
def test_an_atari_rollout_is_uint8_frames_into_the_cnn_learner(runtime):
    actor = ta.actor(num_threads=1)(RolloutActor).remote(env=ATARI, unroll_length=6, seed=0, replica_index=1)
    learner = ta.actor(num_threads=1)(Learner).remote(env=ATARI, reward_clip=1.0, reward_scale=1.0)
    try:
        ta.get(actor.set_weights.remote(learner.weights.remote(), 0))
        ref = actor.rollout.remote()
        u = ta.get(ref)
        assert u["obs"].shape == (7, 2, 4, 84, 84) and u["obs"].dtype == torch.uint8
        assert u["behaviour_logits"].shape == (6, 2, 4) and u["final_obs"].dtype == torch.uint8
        assert u["final_obs"].shape == (int(u["truncated"].sum()), 4, 84, 84)
        torch.testing.assert_close(u["obs"][1:, :, 2], u["obs"][:-1, :, 3])  # frames stacked in order
        del u
        stats = ta.get(learner.update.remote(ref))
        assert math.isfinite(stats["loss"]) and stats["updates"] == 1
    finally:
        ta.kill(actor)
        ta.kill(learner)


# --------------------------------------------------------------------------- the job


@pytest.mark.timeout(170)
def test_cartpole_gym_job_reaches_195_within_2_minutes(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "torchactors.jobs.cli", "run",
                        str(REPO / "configs" / "impala_cartpole_gym.yaml"), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=160)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["reached_target"] and s["mean_return"] >= 195 and s["program_s"] < 120, s
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert rows and int(rows[-1]["episodes"]) == s["episodes"] >= 100
    assert [int(r["episodes"]) for r in rows] == sorted(int(r["episodes"]) for r in rows)


@needs_atari
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_atari_job_short_run(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "torchactors.jobs.cli", "run", str(REPO / "configs" / "impala_atari.yaml"),
                        "stop.max_frames=3000", "stop.max_seconds=60", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["frames"] >= 3000 and s["updates"] > 0 and (out / "policy.pt").exists(), s


# --------------------------------------------------------------------------- the benchmark's own plumbing


def test_rl_fps_measures_the_raw_env_after_its_warmup():
    """benchmarks/rl_fps.py, smallest run: the raw env limit in its own process group, rate after the warm-up."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import rl_fps
    finally:
        sys.path.pop(0)
    row = rl_fps.run_one("raw", "CartPole-v1", seconds=2.0, warmup=1.5, venv_dir=Path("/nonexistent"), grace=40)
    assert (row["rc"] == 0 or row["stopped_after_window"]) and not row["timed_out"] and row["fps"] > 1000, row
    assert 1.0 <= row["seconds"] <= 2.5 and row["frames"] > 0
    text = rl_fps.report([row, {**row, "system": "torchactors", "fps": row["fps"] / 2}])
    assert "rl_fps[CartPole-v1]" in text and "0.50 of its raw env limit" in text


def test_the_builtin_cartpole_job_needs_no_gymnasium(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    cfg = load_config(REPO / "configs" / "impala_cartpole.yaml")
    assert "env" not in cfg.roles["rollout"].args
    actor = RolloutActor(num_envs=4, unroll_length=3)
    assert actor.spaces is None and actor.rollout()["obs"].shape == (4, 4, 4)
    assert isinstance(Learner().model, PolicyValueNet)
