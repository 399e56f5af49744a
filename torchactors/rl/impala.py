"""IMPALA: rollout actors (torch CartPole or any gymnasium env), a V-trace learner and the driver program.

Roles (see ``configs/impala_cartpole.yaml``):

- ``RolloutActor`` steps ``num_envs`` vectorized CartPoles (or, given ``env``, any gymnasium
  env through its vector API: ``torchactors.rl.gym_env``) with its copy of the policy and
  returns one unroll of ``unroll_length`` steps per ``rollout()`` call. Consecutive unrolls
  continue the same episodes (obs[T] of one unroll is obs[0] of the next). The env's spaces
  choose the model (``torchactors.rl.model.build_model``); the learner is given the same
  ``env`` so that it builds the same one.
- ``Learner`` runs one actor-critic update with V-trace correction per ``update()`` call;
  V-trace makes the updates correct although the rollout actors act a few versions behind.
- ``train(job)`` keeps one rollout in flight per actor and hands each finished unroll's ref to
  the learner without fetching its bytes. Weights go through a ``ta.Weights`` channel: the
  learner publishes after every update, each rollout starts from the newest version.

Both classes are plain: the job runner makes actors of them (``ta.actor(RolloutActor)``), and
``examples/single_process_impala.py`` calls their methods directly as a reference.

Seeds: the runner passes ``seed=<job.seed>`` and ``replica_index=<i>`` to constructors that
take those keywords. ``RolloutActor`` mixes both, so that replicas explore different episodes
and another job seed gives other episodes; when ``replica_index`` is absent (direct
construction) ``actor_index`` is used instead.

The driver's own knobs are the keyword arguments of ``train`` (the job file's ``program_args``);
the learning hyperparameters are the ``args`` of the two roles.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from torchactors.rl import vtrace
from torchactors.rl.cartpole import VecCartPole
from torchactors.rl.gym_env import EnvSpec, GymVecEnv, check_spec
from torchactors.rl.model import build_model, sample_actions

logger = logging.getLogger(__name__)

UNROLL_LENGTH = 20
HIDDEN = 64

# A non-blocking poll of finished calls.
POLL_S = 0.0
# How long a rollout actor waits for the learner's first weights.
WEIGHTS_WAIT_S = 120.0
# The job's weights channel (one job, one learner: one name).
WEIGHTS_NAME = "impala/policy"


def _lower_priority(nice: int) -> None:
    """Run every thread of this process (and what they start later) ``nice`` steps below the CPU
    priority it has (as ``os.nice``); Linux keeps a nice value per thread, so ``os.nice`` would lower one."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), min(os.getpriority(os.PRIO_PROCESS, int(tid)) + nice, 19))
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


class RolloutActor:
    """Acts in ``num_envs`` CartPoles (or the gymnasium ``env``) with the last weights it was
    sent; returns unrolls. With ``env``, its ``num_envs`` counts and ``num_envs`` here is unused.

    ``nice`` (0-19) lowers the actor's CPU priority by that many steps: with more busy
    processes than cores (2 rollout actors and a learner on 2), a learner that waits for a core
    stalls every actor's next unroll; at a lower priority the actors take what the learner leaves.
    """

    def __init__(
        self,
        num_envs: int = 64,
        unroll_length: int = UNROLL_LENGTH,
        seed: int = 0,
        actor_index: int = 0,
        replica_index: int | None = None,
        hidden: int = HIDDEN,
        env: EnvSpec | Mapping[str, Any] | None = None,
        nice: int = 0,
    ) -> None:
        if not isinstance(nice, int) or not 0 <= nice <= 19:
            raise ValueError(f"nice is {nice!r}: give an int from 0 (the priority the actor starts with) to 19 steps lower")
        if nice:
            _lower_priority(nice)
        if replica_index is not None:
            actor_index = replica_index
        self.actor_index = actor_index
        self.unroll_length = unroll_length
        env_seed = seed * 10_007 + actor_index * 7_919 + 1
        self.env = VecCartPole(num_envs, seed=env_seed) if env is None else GymVecEnv(env, seed=env_seed)
        self.spaces = getattr(self.env, "spaces", None)  # None: the built-in CartPole
        self.generator = torch.Generator().manual_seed(env_seed + 1)
        self.model = build_model(self.spaces, hidden=hidden)
        self.model.requires_grad_(False)
        self.version = -1
        self.obs = self.env.reset()

    def sync_weights(self, weights: Any) -> None:
        """Load the newest version of the ``ta.Weights`` channel if it is newer than ours
        (waiting for the first one). Weights version ``v`` is learner version ``v - 1``: the
        learner publishes once before its first update."""
        v = weights.latest()[0]
        if v == 0:
            v = weights.wait_newer(0, timeout=WEIGHTS_WAIT_S)[0]
        if v - 1 > self.version:
            self.version = weights.load_into(self.model) - 1     # copies; drops the views at once

    def set_weights(self, ref_or_state: Any, version: int) -> None:
        """Load weights given as a state dict (a ref passed top-level arrives resolved) or a ref."""
        state = ref_or_state
        if not isinstance(state, Mapping):
            import torchactors as ta  # only a ref needs the runtime

            state = ta.get(state)
        # load_state_dict copies, so the store's object may be freed right after.
        self.model.load_state_dict(state)
        self.version = int(version)

    def rollout(self, weights: Any = None) -> dict[str, Any]:
        """Step every env ``unroll_length`` times with the current policy; tensors are [T(+1), B, ...],
        except ``final_obs`` [N, ...]: the observations the N time-limit cuts (``truncated``, in
        its row-major order) ended in, all the learner needs of final observations.
        With ``weights`` (a ``ta.Weights``), act with its newest version."""
        if weights is not None:
            self.sync_weights(weights)
        T, B = self.unroll_length, self.env.num_envs
        shape, dtype, A = ((4,), torch.float32, 2) if self.spaces is None else (
            self.spaces.obs_shape, self.spaces.obs_dtype, self.spaces.num_actions)
        obs = torch.empty(T + 1, B, *shape, dtype=dtype)
        actions = torch.empty(T, B, dtype=torch.int64)
        rewards = torch.empty(T, B)
        terminated = torch.empty(T, B, dtype=torch.bool)
        truncated = torch.empty(T, B, dtype=torch.bool)
        logits = torch.empty(T, B, A)
        finals = []
        obs[0] = self.obs
        policy = self.model.policy
        for t in range(T):
            # Inference mode for the model alone: what it makes must not reach autograd, and the
            # env's tensors (the built-in CartPole's state) must stay ordinary ones.
            with torch.inference_mode():
                logits[t] = policy(obs[t])
                actions[t] = sample_actions(logits[t], self.generator)
            step = self.env.step(actions[t])
            obs[t + 1] = step.obs
            rewards[t] = step.reward
            terminated[t] = step.terminated
            truncated[t] = step.truncated
            if step.truncated.any():
                finals.append(step.final_obs[step.truncated])
        self.obs = obs[T].clone()
        return {
            "obs": obs,
            "actions": actions,
            "rewards": rewards,
            "dones": terminated | truncated,
            "truncated": truncated,
            "final_obs": torch.cat(finals) if finals else obs.new_empty((0, *shape)),
            "behaviour_logits": logits,
            "episode_returns": self.env.pop_episode_returns(),
            "version": self.version,
        }


def _concat_unrolls(unrolls: tuple[Mapping[str, Any], ...]) -> dict[str, Any]:
    """Join unrolls along the batch dimension (dim 1), episode returns along dim 0, and the final
    observations of the cuts in the row-major order of the joined ``truncated``."""
    for u in unrolls:
        cuts = int(u["truncated"].sum())
        if u["final_obs"].shape[0] != cuts or u["final_obs"].shape[1:] != u["obs"].shape[2:]:
            raise ValueError(f"an unroll with {cuts} truncated steps has final_obs of shape "
                             f"{tuple(u['final_obs'].shape)}; expected ({cuts}, {', '.join(map(str, u['obs'].shape[2:]))}): "
                             "one final observation per truncated step, as RolloutActor.rollout returns them")
    if len(unrolls) == 1:
        return dict(unrolls[0])
    out: dict[str, Any] = {}
    for key in unrolls[0]:
        if key == "version":
            out[key] = min(int(u[key]) for u in unrolls)
        elif key == "episode_returns":
            out[key] = torch.cat([u[key] for u in unrolls])
        elif key == "final_obs":
            # Each unroll's cuts are in (t, b) order: a stable sort by t of them all, unroll after
            # unroll, is the (t, unroll, b) order of the joined mask.
            steps = torch.cat([u["truncated"].nonzero()[:, 0] for u in unrolls])
            out[key] = torch.cat([u[key] for u in unrolls])[torch.sort(steps, stable=True).indices]
        else:
            out[key] = torch.cat([u[key] for u in unrolls], dim=1)
    return out


class Learner:
    """Actor-critic learner with V-trace correction (rho_bar = c_bar = 1).

    The defaults are tuned on CartPole with ``examples/single_process_impala.py`` (5 seeds,
    2.5 M frames, policy lag 3 and 8). ``reward_scale=0.1`` keeps values near 10 instead of
    100: unscaled, the large advantages that follow the first failures of a policy that had
    balanced for a long time knocked it over (return 500 -> 9, never recovered) in 2 of 5
    seeds; scaled, all 5 stayed near 500. Adam at ``lr=3e-3`` reaches 195 sooner but
    collapses the same way; ``1e-3`` still reaches 195 in ~120 k frames.

    ``env`` is the rollout actors' env spec (its spaces choose the same model as theirs; None:
    the built-in CartPole). ``reward_clip`` clips rewards to [-c, c] before scaling (Atari's
    usual 1.0); episode returns are counted by the actors, unclipped.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        seed: int = 0,
        gamma: float = 0.99,
        entropy_cost: float = 0.01,
        baseline_cost: float = 0.5,
        max_grad_norm: float = 0.5,
        reward_scale: float = 0.1,
        hidden: int = HIDDEN,
        env: EnvSpec | Mapping[str, Any] | None = None,
        reward_clip: float | None = None,
    ) -> None:
        torch.manual_seed(seed)
        self.model = build_model(None if env is None else check_spec(env), hidden=hidden)
        self.reward_clip = reward_clip
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, eps=1e-5)
        self.gamma = gamma
        self.entropy_cost = entropy_cost
        self.baseline_cost = baseline_cost
        self.max_grad_norm = max_grad_norm
        self.reward_scale = reward_scale
        self.version = 0
        self.frames = 0
        self.channel: Any = None

    def publish_to(self, weights: Any) -> int:
        """Publish the weights to the ``ta.Weights`` channel now and after every update."""
        self.channel = weights
        return self.channel.publish(self.model.state_dict())

    def update(self, *unrolls: Mapping[str, Any]) -> dict[str, float]:
        """One gradient step on the given unrolls (each a ``RolloutActor.rollout()`` result)."""
        batch = _concat_unrolls(unrolls)
        actions = batch["actions"]
        T = actions.shape[0]
        logits, values = self.model(batch["obs"])
        target_logits, bootstrap, values = logits[:T], values[T], values[:T]
        discounts = (~batch["dones"]).float() * self.gamma
        rewards = batch["rewards"]
        if self.reward_clip is not None:
            rewards = rewards.clamp(-self.reward_clip, self.reward_clip)
        rewards = rewards * self.reward_scale
        truncated = batch["truncated"]
        if truncated.any():
            # A time-limit cut is not an end: bootstrap from the state it was cut in. Treating it
            # as terminal gives states that look alike value targets of 0 and ~100, and the
            # resulting advantages of ~-100 at every cut make the policy collapse.
            with torch.no_grad():
                cut_values = self.model.value(batch["final_obs"]).squeeze(-1)
            rewards = rewards.clone()
            rewards[truncated] += self.gamma * cut_values
        vt = vtrace.from_logits(
            behaviour_logits=batch["behaviour_logits"],
            target_logits=target_logits.detach(),
            actions=actions,
            discounts=discounts,
            rewards=rewards,
            values=values.detach(),
            bootstrap_value=bootstrap.detach(),
        )
        log_probs = F.log_softmax(target_logits, dim=-1)
        action_logp = log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        pg_loss = -(action_logp * vt.pg_advantages).mean()
        baseline_loss = 0.5 * (vt.vs - values).pow(2).mean()
        entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
        loss = pg_loss + self.baseline_cost * baseline_loss - self.entropy_cost * entropy

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.version += 1
        self.frames += actions.numel()
        if self.channel is not None:
            self.channel.publish(self.model.state_dict())
        loss, pg_loss, baseline_loss, entropy = (x.detach() for x in (loss, pg_loss, baseline_loss, entropy))
        return {
            "loss": loss.item(),
            "pg_loss": pg_loss.item(),
            "baseline_loss": baseline_loss.item(),
            "entropy": entropy.item(),
            "grad_norm": float(grad_norm),
            "mean_rho": float(vt.log_rhos.exp().mean()),
            "policy_lag": float(self.version - 1 - int(batch["version"])),
            "updates": self.version,
            "version": self.version,
        }

    def weights(self) -> dict[str, torch.Tensor]:
        """A snapshot of the state dict (cloned, so later updates never show through it)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def get_version(self) -> int:
        return self.version


def train(job: Any, max_pending_updates: int = 2, rollout_down_s: float = 60.0, retry_interval_s: float = 0.5,
          return_window: int = 100, unrolls_per_update: int = 1) -> None:
    """The driver: keep every rollout actor busy and feed the learner; weights go by ``ta.Weights``.

    ``max_pending_updates`` bounds the updates submitted to the learner and not yet finished
    before the driver waits for one: the learner's queue (memory) and the actors' policy lag.
    A rollout actor may stay down (dead, restarting) ``rollout_down_s`` before the driver goes
    on without it, tried again every ``retry_interval_s`` meanwhile (a restart spawns a process
    and imports torch: seconds on a loaded 2-core machine). The mean return reported is over
    the last ``return_window`` episodes. ``unrolls_per_update`` unrolls (as they arrive, from
    any actors) make one update: a larger batch, fewer updates (CartPole's MLP learner spends
    12-25% less per frame on 2-4 unrolls than on one; the CNN's cost is per frame whatever the batch).

    The learner publishes its weights to the job's ``ta.Weights`` channel after every update;
    each ``rollout`` call starts by loading the newest published version if it is newer than
    the actor's (a restarted actor too), so the driver never moves weights. Each finished
    unroll's ref goes to ``learner.update`` as a top-level argument (the learner maps the
    driver-untouched tensors), and the driver blocks only when more than
    ``max_pending_updates`` updates are queued.

    A rollout actor that dies is relaunched once its restart is done (``max_restarts``); an
    unroll lost with it is skipped. A failing learner, or a rollout method that raises, ends
    the job with the error.
    """
    import torchactors as ta

    if not isinstance(unrolls_per_update, int) or unrolls_per_update < 1:
        raise ValueError(f"program_args.unrolls_per_update is {unrolls_per_update!r}: give an int >= 1 "
                         "(unrolls in one learner update)")
    learner = job.roles["learner"][0]
    actors = list(job.roles["rollout"])
    lost_object = ("OwnerDiedError", "ObjectFreedError")

    weights = ta.Weights(WEIGHTS_NAME)
    ta.get(learner.publish_to.remote(weights))      # version 1 exists before the first rollout
    down_since: dict[int, float] = {}  # actor index -> when it started failing
    retry_at: dict[int, float] = {}
    dropped: set[int] = set()
    pending: collections.deque = collections.deque()  # update refs in call order
    in_flight: dict[Any, int] = {}
    batch: list[Any] = []  # finished unrolls' refs waiting for the next update
    returns: collections.deque = collections.deque(maxlen=return_window)
    frames = episodes = updates = 0
    last_stats: dict[str, float] = {}

    def failed(i: int, exc: BaseException) -> None:
        """Schedule a relaunch of a dead (restarting) actor; give up on it when it stays down."""
        if isinstance(exc, ta.ActorError) and exc.remote_type not in lost_object:
            raise exc  # a bug in rollout(): retrying cannot help
        now = time.monotonic()
        since = down_since.setdefault(i, now)
        if now - since > rollout_down_s:
            # Not restarted in time (or no restarts left): go on with the others, if any.
            logger.error("rollout actor %d is down since %.0fs; going on without it", i, now - since)
            dropped.add(i)
            if len(dropped) == len(actors):
                raise exc
            return
        if since == now:
            logger.warning("rollout actor %d failed (%s); relaunching it", i, exc)
        retry_at[i] = now + retry_interval_s

    def launch(i: int) -> None:
        try:
            in_flight[actors[i].rollout.remote(weights)] = i
        except ta.ActorDiedError as exc:  # raised at once while the actor is restarting
            failed(i, exc)

    def harvest() -> None:
        """Take finished updates in order; block on the oldest while too many are queued."""
        nonlocal updates, last_stats
        while pending:
            if len(pending) <= max_pending_updates and not ta.wait([pending[0]], num_returns=1, timeout=POLL_S)[0]:
                return
            upd = pending.popleft()
            try:
                last_stats = ta.get(upd)  # a learner failure surfaces here
            except ta.ActorError as exc:
                if exc.remote_type not in lost_object:
                    raise
                logger.warning("skipped an update: an unroll of it was lost with its rollout actor: %s", exc.remote_message)
                continue
            updates = int(last_stats["updates"])

    for i in range(len(actors)):
        launch(i)
    start = time.monotonic()
    while not job.should_stop():
        now = time.monotonic()
        for i in [i for i, t in retry_at.items() if t <= now]:
            del retry_at[i]
            launch(i)
        if not in_flight:
            time.sleep(retry_interval_s)
            continue
        ready, _ = ta.wait(list(in_flight), num_returns=1, timeout=retry_interval_s)
        for ref in ready:
            i = in_flight.pop(ref)
            try:
                out = ta.get(ref)
            except (ta.ActorDiedError, ta.ActorError, ta.OwnerDiedError) as exc:
                failed(i, exc)
                continue
            down_since.pop(i, None)
            frames += out["actions"].numel()
            ep = out["episode_returns"].tolist()
            del out  # drop the views; the learner keeps the object alive through the ref
            episodes += len(ep)
            returns.extend(ep)
            batch.append(ref)
            if len(batch) == unrolls_per_update:
                pending.append(learner.update.remote(*batch))
                batch.clear()
                harvest()
            launch(i)
        if ready:
            # CartPole's "solved" is over 100 consecutive episodes: no mean before there are 100.
            full = len(returns) == returns.maxlen
            job.report(
                frames=frames,
                episodes=episodes,
                mean_return=sum(returns) / len(returns) if full else None,
                updates=updates,
                loss=last_stats.get("loss", float("nan")),
                policy_lag=last_stats.get("policy_lag", 0.0),
            )

    for upd in pending:
        try:
            last_stats = ta.get(upd)
        except ta.ActorError as exc:
            if exc.remote_type not in lost_object:
                raise
    final_ref = learner.weights.remote()  # held while its views are read
    job.save_model({k: v.clone() for k, v in ta.get(final_ref).items()})
    del final_ref
    logger.info(
        "trained %d updates on %d frames in %.1fs; mean return %.1f over the last %d episodes",
        int(last_stats.get("updates", updates)),
        frames,
        time.monotonic() - start,
        sum(returns) / max(len(returns), 1),
        len(returns),
    )
