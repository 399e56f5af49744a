"""Tests of the learning code: torch CartPole vs a scalar gym-style reference, V-trace vs a
direct loop, and a short single-process learning smoke."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchactors.rl import vtrace
from torchactors.rl.cartpole import MAX_EPISODE_STEPS, VecCartPole, cartpole_dynamics
from torchactors.rl.impala import Learner, RolloutActor, _concat_unrolls, train
from torchactors.rl.model import CHANNELS_LAST_MIN_BATCH, NatureCNN, sample_actions

torch.set_num_threads(1)


def scalar_cartpole_step(state, action):
    """gym CartPole-v1's step, transcribed with Python floats (the reference)."""
    gravity, masscart, masspole, length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    total_mass = masspole + masscart
    polemass_length = masspole * length
    x, x_dot, theta, theta_dot = state
    force = force_mag if action == 1 else -force_mag
    costheta, sintheta = math.cos(theta), math.sin(theta)
    temp = (force + polemass_length * theta_dot**2 * sintheta) / total_mass
    thetaacc = (gravity * sintheta - costheta * temp) / (length * (4.0 / 3.0 - masspole * costheta**2 / total_mass))
    xacc = temp - polemass_length * thetaacc * costheta / total_mass
    x = x + tau * x_dot
    x_dot = x_dot + tau * xacc
    theta = theta + tau * theta_dot
    theta_dot = theta_dot + tau * thetaacc
    terminated = x < -2.4 or x > 2.4 or theta < -12 * 2 * math.pi / 360 or theta > 12 * 2 * math.pi / 360
    return (x, x_dot, theta, theta_dot), terminated


def test_dynamics_match_scalar_reference():
    g = torch.Generator().manual_seed(0)
    state = (torch.rand(16, 4, dtype=torch.float64, generator=g) - 0.5) * 0.4
    ref = [tuple(s.tolist()) for s in state]
    for _ in range(10):
        action = torch.randint(0, 2, (16,), generator=g)
        state, term = cartpole_dynamics(state, action)
        for b in range(16):
            ref[b], ref_term = scalar_cartpole_step(ref[b], int(action[b]))
            assert bool(term[b]) == ref_term
        torch.testing.assert_close(state, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_env_matches_reference_until_done_and_resets():
    env = VecCartPole(4, seed=1)
    ref = [tuple(s.tolist()) for s in env.state]
    assert env.state.abs().max() <= 0.05
    for _ in range(30):
        action = torch.ones(4, dtype=torch.int64)  # always push right: falls within ~10 steps
        step = env.step(action)
        assert step.obs.dtype == torch.float32 and step.reward.tolist() == [1.0] * 4
        for b in range(4):
            ref[b], term = scalar_cartpole_step(ref[b], 1)
            assert bool(step.terminated[b]) == term
            if term:
                ref[b] = tuple(env.state[b].tolist())  # the reset state
                assert max(abs(v) for v in ref[b]) <= 0.05
        torch.testing.assert_close(step.obs, torch.tensor(ref, dtype=torch.float32))
    returns = env.pop_episode_returns()
    assert len(returns) >= 4 and all(5 <= r < 30 for r in returns.tolist())
    assert env.pop_episode_returns().numel() == 0


def test_truncation_at_500_and_episode_returns():
    env = VecCartPole(3, seed=2, max_episode_steps=MAX_EPISODE_STEPS)
    truncations = 0
    for t in range(MAX_EPISODE_STEPS):
        env.state.zero_()  # an upright, still pole never falls: only the time limit ends it
        before = env.state.clone()
        step = env.step(torch.tensor([0, 1, 0]) if t % 2 else torch.tensor([1, 0, 1]))
        expected, _ = cartpole_dynamics(before, torch.tensor([0, 1, 0]) if t % 2 else torch.tensor([1, 0, 1]))
        torch.testing.assert_close(step.final_obs, expected.float())  # before any reset
        assert not step.terminated.any()
        truncations += int(step.truncated.sum())
        if t < MAX_EPISODE_STEPS - 1:
            assert not step.truncated.any()
    assert truncations == 3 and step.truncated.all()
    assert not torch.equal(step.obs, step.final_obs)  # obs is already the next episode's start
    assert env.pop_episode_returns().tolist() == [500.0] * 3
    assert env.episode_length.tolist() == [0, 0, 0]


def loop_vtrace(log_rhos, discounts, rewards, values, bootstrap, rho_bar=1.0, c_bar=1.0):
    """V-trace by its definition: v_s = V(x_s) + sum_t gamma^(t-s) (prod c_i) rho_t delta_t."""
    T, B = values.shape
    rhos = log_rhos.exp()
    vs = torch.zeros(T, B, dtype=values.dtype)
    pg = torch.zeros(T, B, dtype=values.dtype)
    next_values = torch.cat([values[1:], bootstrap[None]])
    for b in range(B):
        for s in range(T):
            total = values[s, b].item()
            scale = 1.0  # prod_{i=s}^{t-1} gamma_i c_i
            for t in range(s, T):
                delta = min(rho_bar, rhos[t, b].item()) * (
                    rewards[t, b].item() + discounts[t, b].item() * next_values[t, b].item() - values[t, b].item()
                )
                total += scale * delta
                scale *= discounts[t, b].item() * min(c_bar, rhos[t, b].item())
            vs[s, b] = total
    next_vs = torch.cat([vs[1:], bootstrap[None]])
    for b in range(B):
        for s in range(T):
            pg[s, b] = min(rho_bar, rhos[s, b].item()) * (
                rewards[s, b] + discounts[s, b] * next_vs[s, b] - values[s, b]
            )
    return vs, pg


@pytest.mark.parametrize("seed", [0, 1])
def test_vtrace_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    T, B = 7, 5
    log_rhos = torch.randn(T, B, dtype=torch.float64, generator=g)  # rhos both above and below 1
    discounts = 0.9 * (torch.rand(T, B, dtype=torch.float64, generator=g) > 0.2).double()  # some episode ends
    rewards = torch.randn(T, B, dtype=torch.float64, generator=g)
    values = torch.randn(T, B, dtype=torch.float64, generator=g)
    bootstrap = torch.randn(B, dtype=torch.float64, generator=g)
    out = vtrace.from_importance_weights(log_rhos, discounts, rewards, values, bootstrap)
    vs, pg = loop_vtrace(log_rhos, discounts, rewards, values, bootstrap)
    torch.testing.assert_close(out.vs, vs)
    torch.testing.assert_close(out.pg_advantages, pg)


def test_vtrace_on_policy_is_n_step_return():
    """With pi == mu and no clipping active, v_s is the discounted return bootstrapped at T."""
    T, B = 5, 3
    rewards = torch.rand(T, B, dtype=torch.float64)
    discounts = torch.full((T, B), 0.99, dtype=torch.float64)
    discounts[2, 1] = 0.0
    logits = torch.randn(T, B, 2, dtype=torch.float64)
    actions = torch.randint(0, 2, (T, B))
    values = torch.randn(T, B, dtype=torch.float64)
    bootstrap = torch.randn(B, dtype=torch.float64)
    out = vtrace.from_logits(logits, logits, actions, discounts, rewards, values, bootstrap)
    ret = bootstrap.clone()
    for t in reversed(range(T)):
        ret = rewards[t] + discounts[t] * ret
        torch.testing.assert_close(out.vs[t], ret)


def test_learning_smoke():
    actors = [RolloutActor(num_envs=16, unroll_length=10, actor_index=i) for i in range(2)]
    learner = Learner(lr=3e-3)
    for a in actors:
        a.set_weights(learner.weights(), 0)
    last_obs = None
    for _ in range(5):
        unrolls = [a.rollout() for a in actors]
        u = unrolls[0]
        if last_obs is not None:  # unrolls continue the same episodes
            torch.testing.assert_close(u["obs"][0], last_obs)
        last_obs = u["obs"][-1].clone()
        assert u["obs"].shape == (11, 16, 4) and u["actions"].shape == (10, 16)
        assert u["behaviour_logits"].shape == (10, 16, 2) and u["dones"].dtype == torch.bool
        assert u["episode_returns"].dim() == 1 and isinstance(u["version"], int)
        stats = learner.update(*unrolls)
        assert math.isfinite(stats["loss"])
        for a in actors:
            a.set_weights(learner.weights(), stats["version"])
    assert stats["updates"] == 5 and learner.version == 5
    # The snapshot does not alias the live parameters.
    w = learner.weights()
    learner.update(actors[0].rollout())
    assert not torch.equal(w["policy.0.weight"], learner.model.state_dict()["policy.0.weight"])


def test_sample_actions_follows_the_softmax():
    """Gumbel-max draws: frequencies within 5 standard errors of softmax(logits), never a masked action."""
    logits = torch.tensor([[0.0, 1.0, -1.0, -math.inf], [2.0, 2.0, 0.0, 0.5]])
    n = 100_000
    draws = sample_actions(logits.repeat(n, 1), torch.Generator().manual_seed(3)).view(n, 2)
    assert draws.dtype == torch.int64
    probs = torch.softmax(logits, -1)
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=4).double() / n
        se = (probs[row] * (1 - probs[row]) / n).sqrt().double()
        assert ((freq - probs[row].double()).abs() <= 5 * se + 1e-12).all(), (row, freq, probs[row])
    assert not (draws[:, 0] == 3).any()
    again = sample_actions(logits.repeat(n, 1), torch.Generator().manual_seed(3)).view(n, 2)
    assert torch.equal(draws, again)  # the actor's generator makes its draws reproducible


def _cut_actor(seed: int, max_steps: int) -> RolloutActor:
    """A rollout actor whose built-in CartPoles are cut by a short time limit (so unrolls hold truncations)."""
    actor = RolloutActor(num_envs=4, unroll_length=12, seed=seed)
    actor.env = VecCartPole(4, seed=seed, max_episode_steps=max_steps)
    actor.obs = actor.env.reset()
    return actor


def test_final_obs_holds_one_observation_per_cut_in_the_joined_order():
    learner = Learner()
    actors = [_cut_actor(1, 5), _cut_actor(2, 7)]
    unrolls = []
    for a in actors:
        a.set_weights(learner.weights(), 0)
        u = a.rollout()
        cuts = int(u["truncated"].sum())
        assert cuts > 0 and u["final_obs"].shape == (cuts, 4) and u["final_obs"].dtype == torch.float32
        # A cut's final observation is not the next episode's first (obs[t + 1]), which is a reset state.
        assert not torch.equal(u["final_obs"], u["obs"][1:][u["truncated"]])
        assert u["obs"][1:][u["truncated"]].abs().max() <= 0.05
        unrolls.append(u)
    joined = _concat_unrolls(tuple(unrolls))
    full = []  # the old layout, [T, B, 4] with the final observation at every cut
    for u in unrolls:
        f = torch.zeros(*u["truncated"].shape, 4)
        f[u["truncated"]] = u["final_obs"]
        full.append(f)
    torch.testing.assert_close(joined["final_obs"], torch.cat(full, dim=1)[joined["truncated"]], rtol=0, atol=0)
    assert math.isfinite(learner.update(*unrolls)["loss"])


def test_an_unroll_with_final_obs_in_the_old_layout_is_refused():
    actor = _cut_actor(1, 5)
    u = actor.rollout()
    u["final_obs"] = torch.zeros(12, 4, 4)
    with pytest.raises(ValueError, match=r"one final observation per truncated step"):
        Learner().update(u)


REPO = Path(__file__).resolve().parents[1]


def _run_main_job(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchactors.jobs.cli", "run", str(REPO / "configs" / "impala_cartpole.yaml"),
                           "stop.target_return=null", "--out", str(tmp_path / "out"), *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_unrolls_per_update_batches_that_many_unrolls_into_each_update(tmp_path):
    r = _run_main_job(tmp_path, "stop.max_frames=40000", "program_args.unrolls_per_update=3")
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    per_update = 3 * 64 * 20  # 3 unrolls of 64 envs x 20 steps
    # Updates still queued at the stop (max_pending_updates) and a partial batch are not counted.
    assert s["frames"] // per_update - 4 <= s["updates"] <= s["frames"] // per_update, s


def test_a_bad_unrolls_per_update_says_what_to_give():
    with pytest.raises(ValueError, match=r"unrolls_per_update is 0: give an int >= 1"):
        train(None, unrolls_per_update=0)  # refused before the job is touched


def test_a_bad_nice_says_what_to_give():
    with pytest.raises(ValueError, match=r"nice is 20: give an int from 0"):
        RolloutActor(num_envs=2, nice=20)


def test_nice_lowers_every_thread_of_the_actor_process():
    """In a child process (the priority cannot be raised back): the threads it had, and one started later."""
    code = ("import os, threading, torch; from torchactors.rl.impala import RolloutActor\n"
            "before = os.getpriority(os.PRIO_PROCESS, 0)\n"
            "t = threading.Thread(target=threading.Event().wait, args=(30,), daemon=True); t.start()\n"
            "RolloutActor(num_envs=2, nice=3)\n"
            "late = []; u = threading.Thread(target=lambda: late.append(os.getpriority(os.PRIO_PROCESS, 0))); u.start(); u.join()\n"
            "import json; print(json.dumps([before, sorted({os.getpriority(os.PRIO_PROCESS, int(x))\n"
            "                                        for x in os.listdir('/proc/self/task')}), late]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    before, seen, late = json.loads(r.stdout)
    assert seen == [before + 3] and late == [before + 3], r.stdout


def test_the_cnn_gives_the_same_outputs_in_either_layout_and_leaves_its_input_alone():
    """Batches from CHANNELS_LAST_MIN_BATCH on run channels-last: the same logits and values as in
    small (default-layout) batches, up to float rounding; float frames are not scaled in place."""
    torch.manual_seed(0)
    model = NatureCNN(num_actions=4)
    frames = torch.randint(0, 256, (CHANNELS_LAST_MIN_BATCH, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        logits, values = model(frames)
        parts = [model(frames[i:i + 8]) for i in range(0, len(frames), 8)]
        torch.testing.assert_close(logits, torch.cat([p[0] for p in parts]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(values, torch.cat([p[1] for p in parts]), rtol=1e-4, atol=1e-5)
        as_float = frames[:8].float()
        model(as_float)
        assert torch.equal(as_float, frames[:8].float())
