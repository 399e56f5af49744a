"""Gymnasium environments for rollout actors: the job file's ``env:`` spec, its checks, and a
vector env that steps like :class:`~torchactors.rl.cartpole.VecCartPole`.

Box: learning code, below the rollout actor. ``EnvSpec`` is what a job file's ``env:`` mapping
becomes; :func:`check_spec` builds one environment from it (id, kwargs and wrappers all used),
so that ``torchactors validate`` catches a wrong id, a bad keyword, an unknown wrapper, a missing
optional package or an unsupported space before anything starts, and returns the
:class:`EnvSpaces` that choose the model (:func:`torchactors.rl.model.build_model`).
:class:`GymVecEnv` runs ``num_envs`` copies through gymnasium's vector API (``sync``, ``async``)
or envpool, always with same-step auto-reset (the observation after a final step is already
the next episode's first; the final one is ``final_obs``), and takes completed episodes from
gymnasium's own ``RecordEpisodeStatistics``.

gymnasium, ale-py and envpool are optional: this module imports them only when a spec is
checked or an env is made, and says how to install what is missing (:class:`EnvSpecError`).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchactors.rl.cartpole import Step

logger = logging.getLogger(__name__)

VECTORIZATIONS = ("sync", "async", "envpool")
INSTALL_ENVS = 'pip install -e ".[envs]"'
INSTALL_ENVPOOL = 'pip install -e ".[envpool]"'
PIXELS = (84, 84)  # the Nature CNN's input size (after AtariPreprocessing)


class EnvSpecError(ValueError):
    """A spec that cannot work; ``path`` is the key under ``env`` it is about (() for the whole)."""

    def __init__(self, message: str, path: tuple[str, ...] = (), allowed: str = "") -> None:
        super().__init__(message)
        self.message, self.path, self.allowed = message, path, allowed


@dataclass(frozen=True)
class EnvSpec:
    """What ``env: {id, num_envs, vectorization, kwargs, wrappers}`` says (see docs/yaml.md)."""

    id: str
    num_envs: int = 1
    vectorization: str = "sync"
    kwargs: dict = field(default_factory=dict)
    wrappers: tuple[tuple[str, dict], ...] = ()  # (name, keyword arguments), applied in order

    @classmethod
    def from_mapping(cls, raw: EnvSpec | Mapping[str, Any]) -> EnvSpec:
        """An ``EnvSpec`` from the YAML mapping (or itself); wrappers as ``Name`` or ``{Name: {kw: v}}``."""
        if isinstance(raw, EnvSpec):
            return raw
        if not isinstance(raw, Mapping) or "id" not in raw:
            raise EnvSpecError(f"env must be a mapping with an id, got {raw!r}", allowed="{id: CartPole-v1, ...}")
        wrappers = tuple(_wrapper_entry(w, i) for i, w in enumerate(raw.get("wrappers") or ()))
        return cls(id=raw["id"], num_envs=raw.get("num_envs", 1), vectorization=raw.get("vectorization", "sync"),
                   kwargs=dict(raw.get("kwargs") or {}), wrappers=wrappers)


def _wrapper_entry(entry: Any, i: int) -> tuple[str, dict]:
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, Mapping) and len(entry) == 1:
        (name, kwargs), = entry.items()
        if isinstance(name, str) and isinstance(kwargs, (Mapping, type(None))):
            return name, dict(kwargs or {})
    raise EnvSpecError(f"env.wrappers[{i}] is {entry!r}", path=("wrappers", str(i)),
                       allowed="a wrapper name (AtariPreprocessing, 'module:Class') or {Name: {keyword: value}}")


@dataclass(frozen=True)
class EnvSpaces:
    """What the model needs to know of an env: one observation's shape and dtype, the actions."""

    obs_shape: tuple[int, ...]
    obs_dtype: torch.dtype
    num_actions: int

    @property
    def pixels(self) -> bool:
        return len(self.obs_shape) == 3


# --------------------------------------------------------------------------- optional imports


def _gymnasium() -> Any:
    try:
        import gymnasium
    except ImportError:
        raise EnvSpecError(f"gymnasium is not installed; {INSTALL_ENVS}", path=("id",),
                           allowed="gymnasium environments once gymnasium is installed") from None
    return gymnasium


def _envpool() -> Any:
    try:
        import envpool
    except ImportError:
        raise EnvSpecError(f"vectorization: envpool needs envpool, which is not installed; {INSTALL_ENVPOOL}",
                           path=("vectorization",), allowed="sync, async; envpool once installed") from None
    return envpool


def _looks_atari(env_id: str) -> bool:
    return env_id.startswith("ALE/") or env_id.endswith(("NoFrameskip-v4", "NoFrameskip-v0"))


def _registered(gym: Any, env_id: str) -> None:
    """Make sure ``env_id`` is registered (importing ale_py registers the Atari games)."""
    if ":" in env_id:  # gymnasium's own "module:EnvId" form imports the module itself
        module = env_id.split(":", 1)[0]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise EnvSpecError(f"env id {env_id!r}: cannot import {module!r} ({e})", path=("id",),
                               allowed="'module:EnvId' with an importable module") from None
        return
    if env_id in gym.registry:
        return
    try:
        import ale_py
        gym.register_envs(ale_py)
    except ImportError:
        if _looks_atari(env_id):
            raise EnvSpecError(f"env id {env_id!r} is an Atari game and needs ale-py, which is not installed; "
                               f"{INSTALL_ENVS}", path=("id",), allowed="registered gymnasium ids") from None
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
        raise EnvSpecError(f"env id {env_id!r} is not registered in gymnasium"
                           + (f" (did you mean {', '.join(close)}?)" if close else ""),
                           path=("id",), allowed="an id of gymnasium.registry, e.g. CartPole-v1, "
                           "BreakoutNoFrameskip-v4, ALE/Pong-v5 (Atari ids need ale-py: " + INSTALL_ENVS + ")")


def _wrapper_class(gym: Any, name: str, i: int) -> type:
    """``AtariPreprocessing`` (a class of gymnasium.wrappers) or ``module:Class``."""
    path = ("wrappers", str(i), name)  # the name's line when written as {Name: {...}}
    if ":" in name:
        from torchactors._util import import_string  # the job file's own importer

        try:
            cls = import_string(name)
        except ImportError as e:
            raise EnvSpecError(f"env.wrappers[{i}]: {e}", path=path, allowed="'module:Class', importable") from None
    else:
        cls = _gym_wrapper(gym, name, i)
        if not inspect.isclass(cls):
            names = [n for n in gym.wrappers.__all__ if n[:1].isupper()]
            close = difflib.get_close_matches(name, names, n=3)
            raise EnvSpecError(f"env.wrappers[{i}]: unknown wrapper {name!r}"
                               + (f" (did you mean {', '.join(close)}?)" if close else ""), path=path,
                               allowed="a class of gymnasium.wrappers (" + ", ".join(sorted(names)) + ") or 'module:Class'")
    if not (inspect.isclass(cls) and issubclass(cls, gym.Wrapper)):
        raise EnvSpecError(f"env.wrappers[{i}]: {name} is not a gymnasium.Wrapper", path=path,
                           allowed="a gymnasium.Wrapper subclass")
    return cls


def _gym_wrapper(gym: Any, name: str, i: int) -> Any:
    """``gymnasium.wrappers.<name>`` or None; gymnasium imports some lazily, and their extra packages may be missing."""
    try:
        return getattr(gym.wrappers, name, None)
    except ImportError as e:
        raise EnvSpecError(f"env.wrappers[{i}]: {name} needs a package that is not installed ({e})",
                           path=("wrappers", str(i), name), allowed="wrappers whose packages are installed") from None


def _wrapper_fns(gym: Any, spec: EnvSpec) -> list:
    """One picklable callable per wrapper (async workers get them), after checking their keywords."""
    fns = []
    for i, (name, kwargs) in enumerate(spec.wrappers):
        cls = _wrapper_class(gym, name, i)
        params = inspect.signature(cls).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for k in kwargs:
            if k not in params and not takes_any:
                raise EnvSpecError(f"env.wrappers[{i}]: {name} takes no argument {k!r}",
                                   path=("wrappers", str(i), name, k),
                                   allowed=f"the arguments of {name}: "
                                   + ", ".join(str(p) for n, p in params.items() if n != "env"))
        fns.append(functools.partial(cls, **kwargs))
    return fns


# --------------------------------------------------------------------------- checks


def _spaces(gym: Any, obs_space: Any, act_space: Any) -> EnvSpaces:
    """The model's view of the spaces; an ``EnvSpecError`` for what no model here supports."""
    if not isinstance(act_space, gym.spaces.Discrete):
        raise EnvSpecError(f"the action space is {act_space}: only discrete actions are supported for now "
                           "(continuous actions are planned)", path=("id",), allowed="envs with a Discrete action space")
    shape = tuple(int(s) for s in obs_space.shape or ())
    if not isinstance(obs_space, gym.spaces.Box) or not (len(shape) == 1 or (len(shape) == 3 and shape[1:] == PIXELS)):
        raise EnvSpecError(f"the observation space is {obs_space}: supported are vectors (an MLP) and "
                           f"[C, {PIXELS[0]}, {PIXELS[1]}] pixels (the Nature CNN)", path=("wrappers",),
                           allowed="a 1-D Box (add FlattenObservation), or AtariPreprocessing then "
                           "FrameStackObservation: {stack_size: 4} for Atari")
    dtype = torch.from_numpy(obs_space.sample()[:0].copy()).dtype
    return EnvSpaces(obs_shape=shape, obs_dtype=dtype, num_actions=int(act_space.n))


def _make_error(gym: Any, spec: EnvSpec, e: Exception, wrapper: int | None = None) -> EnvSpecError:
    """Turn what ``gym.make`` or wrapper number ``wrapper`` raised into a message that says what to change."""
    what = f"env {spec.id!r}" if wrapper is None else f"env.wrappers[{wrapper}] ({spec.wrappers[wrapper][0]})"
    path = ("id",) if wrapper is None else ("wrappers", str(wrapper), spec.wrappers[wrapper][0])
    if isinstance(e, gym.error.DependencyNotInstalled):
        return EnvSpecError(f"{what}: {e} ({INSTALL_ENVS} installs gymnasium, ale-py and opencv)",
                            path=path, allowed="packages that are installed")
    if wrapper is None and isinstance(e, TypeError) and spec.kwargs:
        return EnvSpecError(f"env {spec.id!r} does not accept env.kwargs {spec.kwargs!r}: {e}", path=("kwargs",),
                            allowed="the keyword arguments of the env's constructor")
    return EnvSpecError(f"{what} fails: {type(e).__name__}: {e}", path=path,
                        allowed="an env that gymnasium can make with these kwargs and wrappers")


def check_spec(raw: EnvSpec | Mapping[str, Any]) -> EnvSpaces:
    """Make one env as the spec says (then close it) and return its spaces; ``EnvSpecError`` if it cannot work."""
    spec = EnvSpec.from_mapping(raw)
    if spec.vectorization not in VECTORIZATIONS:
        raise EnvSpecError(f"env.vectorization is {spec.vectorization!r}", path=("vectorization",),
                           allowed=", ".join(VECTORIZATIONS))
    gym = _gymnasium()
    if spec.vectorization == "envpool":
        return _check_envpool(gym, spec)
    _registered(gym, spec.id)
    fns = _wrapper_fns(gym, spec)
    try:
        env = gym.make(spec.id, **spec.kwargs)
    except Exception as e:
        raise _make_error(gym, spec, e) from None
    try:
        for i, fn in enumerate(fns):
            try:
                env = fn(env)
            except Exception as e:
                raise _make_error(gym, spec, e, wrapper=i) from None
        return _spaces(gym, env.observation_space, env.action_space)
    finally:
        env.close()


def _check_envpool(gym: Any, spec: EnvSpec) -> EnvSpaces:
    envpool = _envpool()
    if spec.wrappers:
        raise EnvSpecError("envpool preprocesses inside its own threads and takes no gymnasium wrappers",
                           path=("wrappers",), allowed="[] with envpool; set its options in env.kwargs "
                           "(e.g. Atari: stack_num, frame_skip, img_height, episodic_life)")
    if spec.id not in envpool.list_all_envs():
        close = difflib.get_close_matches(spec.id, envpool.list_all_envs(), n=3, cutoff=0.6)
        raise EnvSpecError(f"env id {spec.id!r} is not an envpool task"
                           + (f" (did you mean {', '.join(close)}?)" if close else ""), path=("id",),
                           allowed="an id of envpool.list_all_envs(), e.g. CartPole-v1, Breakout-v5")
    try:
        es = envpool.make_spec(spec.id, **_envpool_kwargs(spec))
    except TypeError as e:
        raise EnvSpecError(f"envpool task {spec.id!r} does not accept env.kwargs {spec.kwargs!r}: {e}",
                           path=("kwargs",), allowed="the fields of envpool.make_spec(id).config") from None
    return _spaces(gym, es.observation_space, es.action_space)


def _envpool_kwargs(spec: EnvSpec) -> dict:
    return {"num_envs": spec.num_envs, "batch_size": spec.num_envs, **spec.kwargs}


# --------------------------------------------------------------------------- the vector env


class GymVecEnv:
    """``num_envs`` copies of a gymnasium env, stepped together with torch tensors in and out.

    The same interface as :class:`~torchactors.rl.cartpole.VecCartPole` (``num_envs``,
    ``reset``, ``step`` returning a :class:`Step`, ``pop_episode_returns``), so the rollout
    actor does not care which one it has. Observations are torch views of gymnasium's numpy
    arrays: copy them before the next step.
    """

    def __init__(self, spec: EnvSpec | Mapping[str, Any], seed: int = 0) -> None:
        self.spec = EnvSpec.from_mapping(spec)
        self.seed = seed
        gym = _gymnasium()
        from gymnasium.wrappers.vector import RecordEpisodeStatistics

        if self.spec.vectorization == "envpool":
            envpool = _envpool()
            vec = _same_step_envpool(envpool.make_gymnasium(self.spec.id, seed=seed, **_envpool_kwargs(self.spec)))
        else:
            _registered(gym, self.spec.id)
            vector_kwargs: dict = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}
            if self.spec.vectorization == "async":
                # Actor processes run threads (transport, torch): a forked worker could inherit a held lock.
                vector_kwargs["context"] = "spawn"
            vec = gym.make_vec(self.spec.id, num_envs=self.spec.num_envs, vectorization_mode=self.spec.vectorization,
                               vector_kwargs=vector_kwargs, wrappers=_wrapper_fns(gym, self.spec), **self.spec.kwargs)
        self.env = RecordEpisodeStatistics(vec)
        self.num_envs = self.env.num_envs
        self.spaces = _spaces(gym, self.env.single_observation_space, self.env.single_action_space)
        self._returns: list[Any] = []
        self._obs: torch.Tensor | None = None

    def reset(self) -> torch.Tensor:
        """Reset every copy (seeded ``seed``, ``seed + 1``, ...); returns observations [B, ...]."""
        obs, _ = self.env.reset(seed=self.seed)
        self._obs = torch.from_numpy(obs)
        return self._obs

    def step(self, action: torch.Tensor) -> Step:
        """Step every copy with ``action`` [B]; finished copies are reset in the same step."""
        import numpy as np

        obs, reward, terminated, truncated, info = self.env.step(action.numpy())
        final = obs
        mask = info.get("_final_obs")
        if mask is not None and mask.any():  # numpy here: a few torch ops cost more than the env step's copies
            final = obs.copy()
            final[mask] = np.stack(info["final_obs"][mask])
        if "_episode" in info:
            self._returns.append(info["episode"]["r"][info["_episode"]])
        self._obs = torch.from_numpy(obs)
        return Step(self._obs, torch.from_numpy(reward.astype(np.float32, copy=False)), torch.from_numpy(terminated),
                    torch.from_numpy(truncated), torch.from_numpy(final))

    def pop_episode_returns(self) -> torch.Tensor:
        """Returns (1-D float32) of the episodes completed since the last call, as gymnasium recorded them."""
        import numpy as np  # imported with gymnasium, which needs it

        out = torch.from_numpy(np.concatenate(self._returns)).float() if self._returns else torch.zeros(0)
        self._returns.clear()
        return out

    def close(self) -> None:
        self.env.close()


def _same_step_envpool(pool: Any) -> Any:
    """envpool with same-step auto-reset: a finished env is reset (``reset_mask``) before the
    step returns, its final observation put in ``info["final_obs"]`` as gymnasium's vector envs do.

    A class made here, not at import, because its base class is gymnasium's (optional).
    """
    import numpy as np
    from gymnasium.vector import AutoresetMode, VectorWrapper

    class SameStepEnvPool(VectorWrapper):
        def __init__(self, env: Any) -> None:
            super().__init__(env)
            self.metadata = {**env.metadata, "autoreset_mode": AutoresetMode.SAME_STEP}

        def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
            obs, _ = self.env.reset()  # envpool is seeded at construction
            return obs, {}

        def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict]:
            obs, reward, terminated, truncated, _ = self.env.step(actions)
            done = terminated | truncated
            if not done.any():
                return obs, reward, terminated, truncated, {}
            final = np.empty(self.num_envs, dtype=object)
            for i in done.nonzero()[0]:
                final[i] = obs[i].copy()
            fresh, _ = self.env.reset(options={"reset_mask": done})
            obs = obs.copy()
            obs[done] = fresh
            return obs, reward, terminated, truncated, {"final_obs": final, "_final_obs": done}

    return SameStepEnvPool(pool)
