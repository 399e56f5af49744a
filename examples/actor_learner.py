"""IMPALA on CartPole with the plain Python API: the main job's pattern, without YAML.

Two rollout actors act with lagging copies of the policy; each finished unroll goes to the
learner as a ref (its tensors stay in shared memory, the driver never copies them), and new
weights go back to the actors as one ref that both map. V-trace corrects for the lag.

    python examples/actor_learner.py
"""

import collections
import time

import torchactors as ta
from torchactors.rl import impala

# Actor classes at module level, made from the plain classes the job uses.
RolloutActor = ta.actor(num_threads=1, max_restarts=1)(impala.RolloutActor)
Learner = ta.actor(num_threads=1)(impala.Learner)

TARGET, MAX_SECONDS, MAX_PENDING = 195.0, 45.0, 2


def main() -> None:
    ta.init(num_threads=1, store_capacity="512MiB")
    learner = Learner.remote(lr=1e-3)
    actors = [RolloutActor.remote(num_envs=64, unroll_length=20, actor_index=i) for i in range(2)]

    weights, version = learner.weights.remote(), 0  # a ref: the learner's state dict in the store
    ta.wait([weights])
    for a in actors:
        a.set_weights.remote(weights, version)  # a top-level ref arrives resolved (a view)
    in_flight = {a.rollout.remote(): a for a in actors}
    sent = {a: version for a in actors}
    pending = collections.deque()  # (stats ref, weights ref, version) of submitted updates
    returns = collections.deque(maxlen=100)
    frames = submitted = 0
    stats = {"updates": 0}
    start = time.monotonic()
    mean = 0.0

    while mean < TARGET and time.monotonic() - start < MAX_SECONDS:
        [ready], _ = ta.wait(list(in_flight), num_returns=1)
        actor = in_flight.pop(ready)
        unroll = ta.get(ready)  # views: read the small fields, leave the rest to the learner
        frames += unroll["actions"].numel()
        returns.extend(unroll["episode_returns"].tolist())
        del unroll
        submitted += 1
        pending.append((learner.update.remote(ready), learner.weights.remote(), submitted))
        # Take the newest finished version; wait only if the learner falls MAX_PENDING behind.
        while pending and (len(pending) > MAX_PENDING or ta.wait([pending[0][1]], timeout=0)[0]):
            stats_ref, weights, version = pending.popleft()
            stats = ta.get(stats_ref)
        if sent[actor] < version:
            actor.set_weights.remote(weights, version)
            sent[actor] = version
        in_flight[actor.rollout.remote()] = actor
        if len(returns) == returns.maxlen:
            mean = sum(returns) / len(returns)

    elapsed = time.monotonic() - start
    ta.shutdown()
    print(f"actor_learner: mean return {mean:.1f} over the last 100 episodes after {frames:,} frames "
          f"in {elapsed:.1f}s ({frames / elapsed:,.0f} frames/s, {stats['updates']} updates)"
          + (" - solved" if mean >= TARGET else " - NOT solved"))


if __name__ == "__main__":
    main()
