"""rl_fps: training frames per second of whole actor/learner systems on real envs, side by side.

Workloads (BENCH.md `rl_fps[...]`), the same for every system:

- ``Breakout``: ``BreakoutNoFrameskip-v4`` with the standard preprocessing (AtariPreprocessing:
  frame skip 4 with max-pooling, up to 30 no-ops, 84x84 grey; then 4 frames stacked), the
  Nature CNN, ``workers`` x ``envs`` env copies (2 x 8), unrolls of 20 steps.
- ``CartPole-v1``: gymnasium's CartPole-v1, an MLP, 2 x 64 copies, unrolls of 20 steps.

Systems, each in its own fresh process (peers in their own virtual environments, made by
``--setup`` under ``--venv-dir``; never in the project's dependencies):

- ``torchactors``: ``configs/impala_atari.yaml`` / ``configs/impala_cartpole_gym.yaml`` run by
  ``torchactors run`` with the workload's sizes as overrides; rate from its ``metrics.csv``.
- ``sample_factory``: Sample Factory 2.1.1 APPO with V-trace, async, on the same gymnasium
  env and preprocessing (registered as a custom env), ``convnet_atari`` (the Nature CNN).
  Its reported FPS counts emulator frames (x ``--env_frameskip``); converted to agent steps.
- ``torchrl``: torchrl 0.14 ``MultiAsyncCollector`` (one process per worker, the env copies
  a gymnasium vector env inside it) and an IMPALA learner (A2CLoss + VTrace) in the driver.
- ``raw``: the env alone: ``workers`` processes each stepping its copies through a
  gymnasium sync vector env with random actions (the limit any system has on these cores).
- ``raw_envpool``: the same through envpool (one pool, ``workers`` threads), when installed;
  ``torchactors_envpool`` is torchactors' job on that backend (compared with this limit).

Frames are agent steps (what the network sees; one Breakout step is 4 emulator frames).
Each run has a warm-up (not counted) and a hard timeout, after which the process group is
killed (Sample Factory's run hangs at 0 FPS when its learner dies). The rate is measured
between the first progress sample after the warm-up and the last one.

    python benchmarks/rl_fps.py --setup                                   # peer venvs, once
    python benchmarks/rl_fps.py --seconds 60 --json rl_fps.json           # every system, both workloads
    python benchmarks/rl_fps.py --systems torchactors,raw --workloads CartPole-v1 --seconds 20
    python benchmarks/rl_fps.py --systems torchactors --workloads Breakout --ta-set roles.rollout.args.nice=10

Only the standard library is imported at the top: the children run in the peers' venvs, and the
raw env workers (which import this file) should not pay for torch.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
DEFAULT_VENV_DIR = Path("/work/peers")

WORKLOADS = {
    "Breakout": {"id": "BreakoutNoFrameskip-v4", "envpool_id": "Breakout-v5", "pixels": True, "workers": 2,
                 "envs": 8, "unroll": 20, "config": "configs/impala_atari.yaml", "frame_skip": 4},
    "CartPole-v1": {"id": "CartPole-v1", "envpool_id": "CartPole-v1", "pixels": False, "workers": 2,
                    "envs": 64, "unroll": 20, "config": "configs/impala_cartpole_gym.yaml", "frame_skip": 1},
}
# Peer venvs: name -> (pins, installed after `pip install torch==2.13.0`, the CPU build from the local index).
PEERS = {
    # Its [atari] extra downloads ROMs and fails; ale-py 0.9.1 ships them. gymnasium 0.29 and numpy<2 are its pins.
    "sample_factory": ["sample-factory==2.1.1", "gymnasium==0.29.1", "numpy<2", "ale-py==0.9.1",
                       "opencv-python-headless"],
    # torchvision has no CPU build on the registry: preprocessing is gymnasium's AtariPreprocessing (opencv).
    "torchrl": ["torchrl==0.14.*", "gymnasium==1.4.*", "ale-py==0.12.*", "opencv-python-headless"],
}
SYSTEMS = ("torchactors", "torchactors_envpool", "sample_factory", "torchrl", "raw", "raw_envpool")
PROGRESS = "RLFPS"  # children print "RLFPS <seconds since start> <agent steps so far>"
TA_OVERRIDES = "RLFPS_TA_OVERRIDES"  # --ta-set's overrides, to the torchactors children (JSON list)


def progress(t0: float, frames: int) -> None:
    print(f"{PROGRESS} {time.monotonic() - t0:.3f} {int(frames)}", flush=True)


# --------------------------------------------------------------------------- env construction (gymnasium, any version)


def make_gym_env(w: dict):
    """One copy of the workload's env with the standard preprocessing, in whichever gymnasium is installed."""
    import gymnasium as gym

    if w["pixels"]:
        import ale_py

        if hasattr(gym, "register_envs"):
            gym.register_envs(ale_py)  # gymnasium >= 1.0; 0.29 registers on import of ale_py
        env = gym.make(w["id"])
        env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84, grayscale_obs=True)
        if hasattr(gym.wrappers, "FrameStackObservation"):
            env = gym.wrappers.FrameStackObservation(env, 4)
        else:  # gymnasium 0.29: FrameStack gives LazyFrames; the peers want arrays
            import numpy as np

            env = gym.wrappers.TransformObservation(gym.wrappers.FrameStack(env, 4), lambda o: np.asarray(o))
        return env
    return gym.make(w["id"])


# --------------------------------------------------------------------------- children


def child_raw(w: dict, seconds: float) -> None:
    """``workers`` processes, each stepping a sync vector env of ``envs`` copies with random actions."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    ready = ctx.Barrier(w["workers"] + 1)
    procs = [ctx.Process(target=_raw_worker, args=(w, i, counter, ready, seconds + 30), daemon=True)
             for i in range(w["workers"])]
    for p in procs:
        p.start()
    ready.wait()  # the clock starts when every worker has made its envs
    t0 = time.monotonic()
    progress(t0, 0)
    while time.monotonic() - t0 < seconds:
        time.sleep(0.5)
        progress(t0, counter.value)
    for p in procs:
        p.kill()


def _raw_worker(w: dict, i: int, counter, ready, limit: float) -> None:
    import gymnasium as gym
    import numpy as np

    env = gym.vector.SyncVectorEnv([functools.partial(make_gym_env, w) for _ in range(w["envs"])])
    env.reset(seed=i * 1000)
    rng = np.random.default_rng(i)
    n = env.single_action_space.n
    ready.wait()
    end = time.monotonic() + limit
    while time.monotonic() < end:
        for _ in range(10):
            env.step(rng.integers(0, n, w["envs"]))
        with counter.get_lock():
            counter.value += 10 * w["envs"]


def child_raw_envpool(w: dict, seconds: float) -> None:
    import envpool
    import numpy as np

    n = w["workers"] * w["envs"]
    env = envpool.make_gymnasium(w["envpool_id"], num_envs=n, batch_size=n, num_threads=w["workers"], seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    t0, frames = time.monotonic(), 0
    last = t0
    while time.monotonic() - t0 < seconds:
        env.step(rng.integers(0, env.action_space.n, n))
        frames += n
        if time.monotonic() - last > 0.5:
            last = time.monotonic()
            progress(t0, frames)
    progress(t0, frames)


def child_torchactors(w: dict, seconds: float, envpool: bool = False) -> None:
    """The shipped config through ``torchactors run``, sized as the workload says; rate from metrics.csv.
    With ``envpool``, the same job on the envpool backend (one env thread per rollout actor)."""
    out = Path(tempfile.mkdtemp(prefix="rlfps-ta-"))
    env_key = "roles.rollout.args.env"
    cmd = [sys.executable, "-m", "torchactors.jobs.cli", "run", str(REPO / w["config"]),
           f"roles.rollout.replicas={w['workers']}", f"{env_key}.num_envs={w['envs']}",
           f"roles.rollout.args.unroll_length={w['unroll']}", "stop.target_return=null", "stop.max_frames=null",
           f"stop.max_seconds={seconds}", "--out", str(out)]
    if envpool:
        for key in (env_key, "roles.learner.args.env"):  # the learner's spec too: its model follows its spaces
            cmd += [f"{key}.vectorization=envpool", f"{key}.id={w['envpool_id']}", f"{key}.wrappers=[]",
                    f"{key}.kwargs={{num_threads: 1}}"]
    cmd += json.loads(os.environ.get(TA_OVERRIDES, "[]"))
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"torchactors run failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    import csv

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    # metrics.csv's time_s counts from the program's start; the actors' start-up is before it.
    start_up = (time.monotonic() - t0) - float(json.loads((out / "summary.json").read_text())["program_s"])
    for row in rows:
        print(f"{PROGRESS} {float(row['time_s']) + max(start_up, 0.0):.3f} {int(row['frames'])}", flush=True)


def child_sample_factory(w: dict, seconds: float) -> None:
    """Sample Factory 2.1.1 APPO (async, V-trace) on the same env; its FPS lines parsed from its log."""
    from sample_factory.cfg.arguments import parse_full_cfg, parse_sf_args
    from sample_factory.envs.env_utils import register_env
    from sample_factory.train import run_rl

    name = "rlfps_" + re.sub(r"\W", "_", w["id"]).lower()
    register_env(name, functools.partial(_sf_env, w))
    T, n = w["unroll"], w["workers"] * w["envs"]
    # V-trace (--with_vtrace=True, which needs --recurrence equal to --rollout and --normalize_returns=False)
    # kills SF 2.1.1's learner at its first summary (learner.py _record_summaries reads mb.advantages, which
    # only the GAE path sets) and the run then hangs at 0 FPS: APPO with GAE, SF's default, is what runs.
    argv = [f"--env={name}", "--algo=APPO", "--device=cpu", "--async_rl=True", "--with_vtrace=False",
            "--use_rnn=False", f"--rollout={T}", "--recurrence=1",
            f"--num_workers={w['workers']}", f"--num_envs_per_worker={w['envs']}", "--worker_num_splits=2",
            f"--batch_size={n * T}", "--num_batches_per_epoch=1", "--num_epochs=1", "--policy_workers_per_policy=1",
            f"--env_frameskip={w['frame_skip']}", "--decorrelate_envs_on_one_worker=False",
            f"--train_for_seconds={int(seconds)}", "--save_every_sec=100000", "--save_best_every_sec=100000",
            "--experiment_summaries_interval=100000", f"--train_dir={tempfile.mkdtemp(prefix='rlfps-sf-')}",
            "--experiment=rlfps", "--restart_behavior=overwrite", "--serial_mode=False"]
    if w["pixels"]:
        argv += ["--encoder_conv_architecture=convnet_atari", "--encoder_conv_mlp_layers", "512",
                 "--obs_scale=255.0", "--normalize_input=False", "--reward_clip=1.0"]
    else:
        argv += ["--reward_scale=0.1", "--normalize_input=False"]
    t0 = time.monotonic()
    frames_re = re.compile(r"Total num frames: (\d+)")

    class Frames(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            m = frames_re.search(record.getMessage())
            if m:
                progress(t0, int(m.group(1)) // w["frame_skip"])

    from sample_factory.utils.utils import log as sf_log  # its own logger, which does not propagate

    sf_log.addHandler(Frames())
    parser, _ = parse_sf_args(argv=argv)
    cfg = parse_full_cfg(parser, argv)
    run_rl(cfg)


def _sf_env(w: dict, full_env_name: str, cfg=None, env_config=None, render_mode=None):
    """Sample Factory's env factory signature (top-level: its workers are spawned and get it pickled)."""
    return make_gym_env(w)


def child_torchrl(w: dict, seconds: float) -> None:
    """torchrl 0.14: MultiAsyncCollector workers with gymnasium vector envs; IMPALA (A2CLoss + VTrace) in the driver."""
    import torch
    from tensordict.nn import TensorDictModule, TensorDictSequential
    from torchrl.collectors import MultiAsyncCollector
    from torchrl.modules import MLP, ConvNet, OneHotCategorical, ProbabilisticActor, ValueOperator
    from torchrl.objectives import A2CLoss
    from torchrl.objectives.value import VTrace

    torch.set_num_threads(1)
    proof = _torchrl_env(w)
    n_act = proof.action_spec.shape[-1]
    if w["pixels"]:  # the Nature CNN
        torso = torch.nn.Sequential(__getattr__("Scale255")(), ConvNet(num_cells=[32, 64, 64], kernel_sizes=[8, 4, 3],
                                                        strides=[4, 2, 1], activation_class=torch.nn.ReLU),
                                    torch.nn.Linear(64 * 7 * 7, 512), torch.nn.ReLU())
        torso(torch.zeros(1, 4, 84, 84, dtype=torch.uint8))  # ConvNet's layers are lazy: make them before pickling
        hidden = 512
    else:
        torso = MLP(in_features=4, out_features=64, num_cells=[64], activation_class=torch.nn.Tanh,
                    activate_last_layer=True)
        hidden = 64
    common = TensorDictModule(torso, in_keys=["observation"], out_keys=["hidden"])
    logits = TensorDictModule(torch.nn.Linear(hidden, n_act), in_keys=["hidden"], out_keys=["logits"])
    actor = ProbabilisticActor(TensorDictSequential(common, logits), in_keys=["logits"], spec=proof.action_spec,
                               distribution_class=OneHotCategorical, return_log_prob=True)
    critic = ValueOperator(torch.nn.Sequential(torso, torch.nn.Linear(hidden, 1)), in_keys=["observation"])
    proof.close()
    collector = MultiAsyncCollector([functools.partial(_torchrl_env, w)] * w["workers"], actor,
                                    frames_per_batch=w["envs"] * w["unroll"], total_frames=-1)
    vtrace = VTrace(gamma=0.99, value_network=critic, actor_network=actor, average_adv=False)
    loss_module = A2CLoss(actor_network=actor, critic_network=critic, entropy_coeff=0.01, critic_coeff=0.5)
    optim = torch.optim.Adam(loss_module.parameters(), lr=3e-4, eps=1e-5)
    t0, frames = time.monotonic(), 0
    try:
        for data in collector:
            frames += data.numel()
            if w["pixels"]:
                data["next", "reward"] = data["next", "reward"].clamp(-1, 1)
            with torch.no_grad():
                data = vtrace(data)
            loss = loss_module(data)
            total = loss["loss_critic"] + loss["loss_objective"] + loss["loss_entropy"]
            optim.zero_grad()
            total.backward()
            torch.nn.utils.clip_grad_norm_(loss_module.parameters(), 40.0)
            optim.step()
            collector.update_policy_weights_()
            progress(t0, frames)
            if time.monotonic() - t0 > seconds:
                break
    finally:
        collector.shutdown()


def __getattr__(name: str):
    """``Scale255``, a module of this file made on first use (torch imported only then); pickle finds it
    here by name, as torchrl's workers must when they unpickle the policy."""
    if name != "Scale255":
        raise AttributeError(name)
    import torch

    class Scale255(torch.nn.Module):
        """uint8 frames to floats in [0, 1]."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float() / 255.0

    Scale255.__module__, Scale255.__qualname__ = __name__, "Scale255"
    globals()["Scale255"] = Scale255
    return Scale255


def _torchrl_env(w: dict):
    import gymnasium as gym
    from torchrl.envs import GymWrapper

    # torchrl resets done copies itself: it asks for gymnasium's DISABLED auto-reset mode.
    vec = gym.vector.SyncVectorEnv([functools.partial(make_gym_env, w) for _ in range(w["envs"])],
                                   autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    return GymWrapper(vec)


CHILDREN = {"torchactors": child_torchactors,
            "torchactors_envpool": functools.partial(child_torchactors, envpool=True), "sample_factory": child_sample_factory, "torchrl": child_torchrl,
            "raw": child_raw, "raw_envpool": child_raw_envpool}


# --------------------------------------------------------------------------- driver


def setup_venvs(venv_dir: Path, names: list[str]) -> None:
    """Make each peer's venv (python -m venv; torch 2.13.0 CPU first; then its pins) and import-check it."""
    for name in names:
        venv = venv_dir / name
        py = venv / "bin" / "python"
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PEERS[name]], check=True)
        dist, module = {"sample_factory": ("sample-factory", "sample_factory"), "torchrl": ("torchrl", "torchrl")}[name]
        subprocess.run([str(py), "-c", f"import importlib.metadata as m, {module}, gymnasium, torch; "
                        f"print('{name}', m.version('{dist}'), 'gymnasium', gymnasium.__version__, "
                        "'torch', torch.__version__)"], check=True)


def python_for(system: str, venv_dir: Path) -> str:
    if system in PEERS:
        py = venv_dir / system / "bin" / "python"
        if not py.exists():
            raise FileNotFoundError(f"no venv for {system} at {py}: run `python benchmarks/rl_fps.py --setup`")
        return str(py)
    return sys.executable


def run_one(system: str, workload: str, seconds: float, warmup: float, venv_dir: Path, grace: float) -> dict:
    """Run one system on one workload in its own process group; the rate after the warm-up."""
    py = python_for(system, venv_dir)
    env = {**os.environ, **THREAD_ENV, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") and system not in PEERS
                                     else "")
    if system in PEERS:
        env.pop("PYTHONPATH", None)  # a peer never sees the project's code
    cmd = [py, str(Path(__file__).resolve()), "--child", system, "--workloads", workload,
           "--seconds", str(seconds + warmup)]
    limit = seconds + warmup + grace
    samples: list[tuple[float, int]] = []
    tail: list[str] = []
    stopped = False  # killed by us once its window was measured (then rc is -9 and that is fine)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killer = threading.Timer(limit, lambda: _kill_group(proc))
    killer.start()
    try:
        for line in proc.stdout:
            if line.startswith(PROGRESS + " "):
                _, t, f = line.split()
                samples.append((float(t), int(f)))
                if float(t) >= warmup + seconds and not stopped:
                    stopped = True
                    _kill_group(proc)  # measured enough; some systems take long to shut down (SF)
            else:
                tail = (tail + [line.rstrip()])[-30:]
        rc = proc.wait()
    finally:
        killer.cancel()
        _kill_group(proc)  # whatever it left running (SF's workers, collectors)
    wall = time.monotonic() - t0
    timed_out = wall >= limit
    measured = [s for s in samples if warmup <= s[0] <= warmup + seconds + 5.0]
    row = {"system": system, "workload": workload, "rc": rc, "wall_s": round(wall, 1), "timed_out": timed_out,
           "python": py, "stopped_after_window": stopped,
           "samples": len(samples)}
    if len(measured) >= 2 and measured[-1][0] > measured[0][0]:
        (ta, fa), (tb, fb) = measured[0], measured[-1]
        row.update(fps=(fb - fa) / (tb - ta), frames=fb - fa, seconds=round(tb - ta, 1))
    else:
        row.update(fps=None, error="no progress after the warm-up" + (" (timed out)" if timed_out else ""),
                   tail="\n".join(tail[-15:]))
    return row


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def report(rows: list[dict]) -> str:
    """One table per workload: frames/s, ratio to the best peer and to the raw env limit."""
    lines = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        got = {r["system"]: r.get("fps") for r in rows if r["workload"] == workload}
        peers = [v for k, v in got.items() if k in PEERS and v]
        lines.append(f"rl_fps[{workload}] (agent steps/s)")
        for system, fps in got.items():
            extra = ""
            raw = got.get("raw_envpool" if system == "torchactors_envpool" else "raw")
            if system.startswith("torchactors") and fps:
                if peers:
                    extra += f"  {fps / max(peers):.2f}x best peer (target >= 1.2)"
                if raw:
                    extra += f"  {fps / raw:.2f} of its raw env limit (target >= 0.6)"
            lines.append(f"  {system:16s} {'failed' if fps is None else f'{fps:10,.0f}'}{extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--seconds", type=float, default=60.0, help="measured seconds per run (after the warm-up)")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds not counted at the start of each run")
    p.add_argument("--grace", type=float, default=60.0, help="start-up seconds allowed before a run is killed")
    p.add_argument("--venv-dir", type=Path, default=DEFAULT_VENV_DIR, help="where the peers' venvs are")
    p.add_argument("--ta-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override of torchactors' job file (repeatable), e.g. roles.rollout.args.nice=10")
    p.add_argument("--setup", action="store_true", help="make the peers' venvs and exit")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.ta_set:
        os.environ[TA_OVERRIDES] = json.dumps(args.ta_set)
    if args.setup:
        setup_venvs(args.venv_dir, list(PEERS))
        return 0
    if args.child:
        CHILDREN[args.child](WORKLOADS[args.workloads], args.seconds)
        return 0
    rows = []
    for workload in args.workloads.split(","):
        for system in args.systems.split(","):
            if system not in CHILDREN or workload not in WORKLOADS:
                p.error(f"unknown system {system!r} or workload {workload!r}")
            row = run_one(system, workload, args.seconds, args.warmup, args.venv_dir, args.grace)
            log.info("%s", json.dumps({k: v for k, v in row.items() if k != "tail"}))
            if row.get("tail"):
                log.info("%s: last output:\n%s", system, row["tail"])
            rows.append(row)
    print(report(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
