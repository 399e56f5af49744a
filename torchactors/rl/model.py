"""Policy and value networks, and the choice between them by observation space.

``PolicyValueNet`` is a small MLP for low-dimensional observations like CartPole's. Policy and
value have separate torsos: on CartPole the value targets (up to ~100 with gamma=0.99) are
much larger than the policy's logits, and a shared torso lets the value loss swamp the
policy's features. ``NatureCNN`` is the torso of Mnih et al. 2015 for [C, 84, 84] uint8 frames,
shared by both heads as in IMPALA's shallow model. ``build_model`` picks one from
:class:`~torchactors.rl.gym_env.EnvSpaces`. Both take ``policy(obs)``, ``value(obs)`` (the value
with a trailing dimension of 1) and ``forward(obs) -> (logits, value)``, on any leading dims.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from torchactors.rl.gym_env import EnvSpaces

logger = logging.getLogger(__name__)


def _mlp(inp: int, hidden: int, out: int, out_gain: float) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(inp, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, out))
    for layer in net:
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, gain=2**0.5)
            nn.init.zeros_(layer.bias)
    nn.init.orthogonal_(net[-1].weight, gain=out_gain)
    return net


class PolicyValueNet(nn.Module):
    """Maps observations [..., obs_dim] to (policy logits [..., num_actions], value [...])."""

    def __init__(self, obs_dim: int = 4, num_actions: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.policy = _mlp(obs_dim, hidden, num_actions, out_gain=0.01)
        self.value = _mlp(obs_dim, hidden, 1, out_gain=1.0)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy(obs), self.value(obs).squeeze(-1)


class NatureCNN(nn.Module):
    """The Nature DQN torso (3 convolutions, 512 units) with policy and value heads on [..., C, 84, 84] uint8."""

    def __init__(self, in_channels: int = 4, num_actions: int = 4) -> None:
        super().__init__()
        self.torso = nn.Sequential(
            nn.Conv2d(in_channels, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU(),
        )
        for layer in self.torso:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.orthogonal_(layer.weight, gain=2**0.5)
                nn.init.zeros_(layer.bias)
        self.policy_head = nn.Linear(512, num_actions)
        self.value_head = nn.Linear(512, 1)
        nn.init.orthogonal_(self.policy_head.weight, gain=0.01)
        nn.init.orthogonal_(self.value_head.weight, gain=1.0)
        nn.init.zeros_(self.policy_head.bias)
        nn.init.zeros_(self.value_head.bias)

    def _features(self, obs: torch.Tensor) -> torch.Tensor:
        lead = obs.shape[:-3]
        x = obs.reshape(-1, *obs.shape[-3:]).float().div_(255.0)
        return self.torso(x).reshape(*lead, 512)

    def policy(self, obs: torch.Tensor) -> torch.Tensor:
        return self.policy_head(self._features(obs))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.value_head(self._features(obs))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self._features(obs)
        return self.policy_head(h), self.value_head(h).squeeze(-1)


def build_model(spaces: EnvSpaces | None, hidden: int = 64) -> PolicyValueNet | NatureCNN:
    """The MLP for vector observations (CartPole's when ``spaces`` is None), the Nature CNN for pixels."""
    if spaces is None:
        return PolicyValueNet(hidden=hidden)
    if spaces.pixels:
        return NatureCNN(in_channels=spaces.obs_shape[0], num_actions=spaces.num_actions)
    return PolicyValueNet(obs_dim=spaces.obs_shape[0], num_actions=spaces.num_actions, hidden=hidden)
