"""IMPALA on CartPole in one process: the reference for the actor runtime's numbers.

Runs the same RolloutActor and Learner classes as the job, with plain method calls and one
thread, so what it prints is what the learning code costs without any runtime: frames/s
(the bar the multi-process job's throughput is compared with) and the time and frames to a
mean return of 195 over the last 100 episodes. ``--lag`` makes each actor act with weights
that many updates old, imitating the policy lag of the asynchronous job.

    python examples/single_process_impala.py --seeds 0 1 2
"""

import argparse
import collections
import time

import torch

from torchactors.rl.impala import Learner, RolloutActor


def run(seed: int, args: argparse.Namespace, max_seconds: float,
        stop_at_target: bool = True) -> tuple[float, int, float, bool]:
    """Train until the mean return of the last 100 episodes reaches the target (or time is up)."""
    torch.manual_seed(seed)
    actors = [RolloutActor(args.num_envs, args.unroll_length, seed=seed, actor_index=i) for i in range(args.actors)]
    learner = Learner(lr=args.lr, seed=seed)
    history = collections.deque([learner.weights()], maxlen=args.lag + 1)
    for a in actors:
        a.set_weights(history[0], 0)
    returns: collections.deque = collections.deque(maxlen=100)
    frames = 0
    start = time.perf_counter()
    while True:
        for a in actors:
            unroll = a.rollout()
            frames += unroll["actions"].numel()
            returns.extend(unroll["episode_returns"].tolist())
            stats = learner.update(unroll)
            history.append(learner.weights())
            a.set_weights(history[0], stats["version"] - len(history) + 1)
        elapsed = time.perf_counter() - start
        mean = sum(returns) / len(returns) if len(returns) == 100 else 0.0
        if (stop_at_target and mean >= args.target) or elapsed > max_seconds:
            return elapsed, frames, mean, mean >= args.target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--unroll-length", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lag", type=int, default=1)
    p.add_argument("--target", type=float, default=195.0)
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--fps-seconds", type=float, default=5.0, help="length of the steady-state frames/s run")
    args = p.parse_args()
    torch.set_num_threads(1)
    for seed in args.seeds:
        sec, frames, mean, ok = run(seed, args, args.max_seconds)
        status = f"reached {args.target:g}" if ok else f"did NOT reach {args.target:g}"
        print(f"seed {seed}: {status} in {sec:.1f}s, {frames} frames, {frames / sec:,.0f} frames/s, "
              f"mean return {mean:.1f}")
    if args.fps_seconds > 0:
        sec, frames, mean, _ = run(args.seeds[0], args, args.fps_seconds, stop_at_target=False)
        print(f"steady state: {frames / sec:,.0f} frames/s over {sec:.1f}s (learning included, mean return {mean:.1f})")


if __name__ == "__main__":
    main()
