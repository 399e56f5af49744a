"""CartPole-v1 written in torch and vectorized over B environments.

The dynamics, constants, thresholds and reset distribution are those of gym's CartPole-v1
(Euler integration), so returns are comparable with published CartPole results, but no gym
is needed and a whole batch steps in a handful of tensor ops.

Auto-reset is same-step: when an episode ends at step t, ``done[t]`` is set and the
observation returned by that step is already the first observation of the next episode; the
observation the episode ended in is ``final_obs`` (a learner needs it to bootstrap the value of
an episode cut by the time limit, which did not really end).
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

GRAVITY = 9.8
MASSCART = 1.0
MASSPOLE = 0.1
TOTAL_MASS = MASSPOLE + MASSCART
LENGTH = 0.5  # half the pole's length
POLEMASS_LENGTH = MASSPOLE * LENGTH
FORCE_MAG = 10.0
TAU = 0.02  # seconds between state updates
THETA_THRESHOLD = 12 * 2 * math.pi / 360
X_THRESHOLD = 2.4
MAX_EPISODE_STEPS = 500
RESET_LOW, RESET_HIGH = -0.05, 0.05


class Step(NamedTuple):
    """What one batched step returns; all tensors have leading dimension B."""

    obs: torch.Tensor  # [B, 4] float32, already reset where done
    reward: torch.Tensor  # [B] float32, 1 for every step taken (the last one included)
    terminated: torch.Tensor  # [B] bool, the pole fell or the cart left the track
    truncated: torch.Tensor  # [B] bool, the 500-step limit was hit (and not terminated)
    final_obs: torch.Tensor  # [B, 4] float32, the observation before any reset

    @property
    def done(self) -> torch.Tensor:
        return self.terminated | self.truncated


def cartpole_dynamics(state: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler step of gym's CartPole physics.

    ``state`` is [..., 4] (x, x_dot, theta, theta_dot), ``action`` is an integer tensor of
    matching leading shape (0 pushes left, 1 pushes right). Returns the next state and the
    ``terminated`` mask computed on it.
    """
    x, x_dot, theta, theta_dot = state.unbind(-1)
    force = torch.where(action.bool(), FORCE_MAG, -FORCE_MAG).to(state.dtype)
    costheta = torch.cos(theta)
    sintheta = torch.sin(theta)
    temp = (force + POLEMASS_LENGTH * theta_dot * theta_dot * sintheta) / TOTAL_MASS
    thetaacc = (GRAVITY * sintheta - costheta * temp) / (
        LENGTH * (4.0 / 3.0 - MASSPOLE * costheta * costheta / TOTAL_MASS)
    )
    xacc = temp - POLEMASS_LENGTH * thetaacc * costheta / TOTAL_MASS
    new = torch.stack(
        (x + TAU * x_dot, x_dot + TAU * xacc, theta + TAU * theta_dot, theta_dot + TAU * thetaacc),
        dim=-1,
    )
    terminated = (new[..., 0].abs() > X_THRESHOLD) | (new[..., 2].abs() > THETA_THRESHOLD)
    return new, terminated


class VecCartPole:
    """B CartPole-v1 environments stepped together, with auto-reset and return tracking.

    The state is kept in float64 (gym keeps Python floats) and observations are float32, as
    gym returns them. Completed episodes' returns accumulate until
    :meth:`pop_episode_returns` collects them, so the hot loop never synchronizes on them.
    """

    def __init__(
        self,
        num_envs: int,
        seed: int = 0,
        max_episode_steps: int = MAX_EPISODE_STEPS,
    ) -> None:
        self.num_envs = num_envs
        self.max_episode_steps = max_episode_steps
        self.generator = torch.Generator().manual_seed(seed)
        self.state = torch.zeros(num_envs, 4, dtype=torch.float64)
        self.episode_return = torch.zeros(num_envs)
        self.episode_length = torch.zeros(num_envs, dtype=torch.int64)
        self._done_log: list[torch.Tensor] = []
        self._return_log: list[torch.Tensor] = []
        self.reset()

    def _sample_initial(self) -> torch.Tensor:
        u = torch.rand(self.num_envs, 4, dtype=torch.float64, generator=self.generator)
        return u * (RESET_HIGH - RESET_LOW) + RESET_LOW

    def reset(self) -> torch.Tensor:
        """Reset every environment; returns observations [B, 4] float32."""
        self.state = self._sample_initial()
        self.episode_return.zero_()
        self.episode_length.zero_()
        return self.state.float()

    def step(self, action: torch.Tensor) -> Step:
        """Apply ``action`` [B] (0 or 1) to every environment and auto-reset finished ones."""
        new_state, terminated = cartpole_dynamics(self.state, action)
        self.episode_length += 1
        self.episode_return += 1.0
        truncated = (self.episode_length >= self.max_episode_steps) & ~terminated
        done = terminated | truncated
        self._done_log.append(done)
        self._return_log.append(self.episode_return.clone())
        keep = ~done
        self.state = torch.where(done.unsqueeze(1), self._sample_initial(), new_state)
        self.episode_return.mul_(keep)
        self.episode_length.mul_(keep)
        reward = torch.ones(self.num_envs)
        return Step(self.state.float(), reward, terminated, truncated, new_state.float())

    def pop_episode_returns(self) -> torch.Tensor:
        """Returns (1-D float32) of the episodes completed since the last call, in step order."""
        if not self._done_log:
            return torch.zeros(0)
        done = torch.stack(self._done_log)
        returns = torch.stack(self._return_log)
        self._done_log.clear()
        self._return_log.clear()
        return returns[done]
