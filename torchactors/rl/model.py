"""A small MLP policy and value network for low-dimensional observations like CartPole's.

Policy and value have separate torsos: on CartPole the value targets (up to ~100 with
gamma=0.99) are much larger than the policy's logits, and a shared torso lets the value
loss swamp the policy's features.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

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
