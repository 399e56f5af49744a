"""V-trace off-policy targets (Espeholt et al. 2018, "IMPALA", section 4.1).

Rollout actors act with a policy that lags the learner's by a few updates; V-trace corrects
for that lag with truncated importance weights, so the learner can use every unroll as it
arrives instead of discarding stale ones. Episode ends are carried by ``discounts`` (0 where
the episode ended at that step), so one unroll may span several episodes.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class VTraceReturns(NamedTuple):
    vs: torch.Tensor  # [T, B] value targets
    pg_advantages: torch.Tensor  # [T, B] advantages for the policy gradient
    log_rhos: torch.Tensor  # [T, B] log importance weights (target over behaviour)


def action_log_probs(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi(a|s) for logits [T, B, A] and integer actions [T, B]."""
    return F.log_softmax(logits, dim=-1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def from_importance_weights(
    log_rhos: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    clip_rho_threshold: float | None = 1.0,
    clip_c_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
) -> VTraceReturns:
    """V-trace from log importance weights; all inputs [T, B] except bootstrap_value [B].

    Implements v_s = V(x_s) + sum_t gamma^(t-s) (prod_{i<t} c_i) rho_t delta_t with
    rho_t = min(rho_bar, pi/mu), c_i = min(c_bar, pi/mu), computed by the backward recursion
    v_s - V(x_s) = rho_s delta_s + gamma_s c_s (v_{s+1} - V(x_{s+1})).
    Thresholds of None mean no clipping.
    """
    rhos = torch.exp(log_rhos)
    clipped_rhos = rhos.clamp(max=clip_rho_threshold) if clip_rho_threshold is not None else rhos
    cs = rhos.clamp(max=clip_c_threshold) if clip_c_threshold is not None else rhos
    values_t_plus_1 = torch.cat((values[1:], bootstrap_value.unsqueeze(0)), dim=0)
    deltas = clipped_rhos * (rewards + discounts * values_t_plus_1 - values)

    acc = torch.zeros_like(bootstrap_value)
    decay = discounts * cs
    vs_minus_v = torch.empty_like(values)
    for t in range(values.shape[0] - 1, -1, -1):
        acc = deltas[t] + decay[t] * acc
        vs_minus_v[t] = acc
    vs = vs_minus_v + values

    vs_t_plus_1 = torch.cat((vs[1:], bootstrap_value.unsqueeze(0)), dim=0)
    pg_rhos = rhos.clamp(max=clip_pg_rho_threshold) if clip_pg_rho_threshold is not None else rhos
    pg_advantages = pg_rhos * (rewards + discounts * vs_t_plus_1 - values)
    return VTraceReturns(vs=vs, pg_advantages=pg_advantages, log_rhos=log_rhos)


@torch.no_grad()
def from_logits(
    behaviour_logits: torch.Tensor,
    target_logits: torch.Tensor,
    actions: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    clip_rho_threshold: float | None = 1.0,
    clip_c_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
) -> VTraceReturns:
    """V-trace from behaviour and target policy logits [T, B, A] and actions [T, B]."""
    log_rhos = action_log_probs(target_logits, actions) - action_log_probs(behaviour_logits, actions)
    return from_importance_weights(
        log_rhos,
        discounts,
        rewards,
        values,
        bootstrap_value,
        clip_rho_threshold=clip_rho_threshold,
        clip_c_threshold=clip_c_threshold,
        clip_pg_rho_threshold=clip_pg_rho_threshold,
    )
