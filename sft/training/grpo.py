"""GRPO's advantages and its clipped token-level objective (DAPO's normalization).

Each prompt's G answers form a group. An answer's advantage is its reward minus the group's mean,
divided by the group's standard deviation (plus ``eps``) unless ``scale`` is off (Dr. GRPO): an
answer better than its siblings is pushed up, a worse one down, and a group whose answers all
score alike (or a group of one) teaches nothing.

Every answer token t carries its answer's advantage A and the ratio r_t = p(t) / p_old(t) of
the current policy to the one that sampled it. The token's loss is PPO's clipped surrogate,
-min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A), plus beta times the k3 estimate of the KL
divergence to the reference, exp(ref - logp) - (ref - logp) - 1 (TRL's). The step's loss is the
sum over all answer tokens of the step divided by their number (DAPO; TRL's ``dapo`` loss type),
not a mean of per-answer means: a long answer's tokens count as much as a short one's, and the
loss carries no bias towards short wrong answers or long right ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADVANTAGE_EPS = 1e-4
"""Added to a group's standard deviation before dividing (TRL's value)."""


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """[groups, G] advantages from [groups, G] rewards: (r - group mean) / (group std + eps), the
    std unbiased as torch.std (and TRL) compute it, and 0 for a group of one; without ``scale``,
    r - group mean."""
    rewards = rewards.double()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    spread = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(centred[:, :1])
    return centred / (spread + eps)


@dataclass
class TokenTerms:
    losses: torch.Tensor
    """Each answer token's loss: the clipped surrogate plus beta x KL."""
    clipped: torch.Tensor
    """Whether the clip decided the token's loss (no gradient through its ratio), boolean."""
    kl: torch.Tensor | None
    """The k3 estimate of each token's KL divergence to the reference (None without a reference)."""


def token_terms(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                clip_range: tuple[float, float], beta: float = 0.0,
                reference_logps: torch.Tensor | None = None) -> TokenTerms:
    """The per-token loss of GRPO for flat per-token log-probabilities of the current policy
    (``logps``, with gradient), the sampling policy (``old_logps``) and the reference, and each
    token's advantage (its answer's)."""
    low, high = clip_range
    advantages = advantages.to(logps.dtype)
    ratio = torch.exp(logps - old_logps.to(logps.dtype))
    surrogate = torch.min(ratio * advantages, ratio.clamp(low, high) * advantages)
    clipped = ((ratio < low) & (advantages < 0)) | ((ratio > high) & (advantages > 0))
    losses, kl = -surrogate, None
    if beta:
        if reference_logps is None:
            raise ValueError("beta > 0 needs the reference's log-probabilities")
        delta = reference_logps.to(logps.dtype) - logps
        kl = torch.exp(delta) - delta - 1
        losses = losses + beta * kl
    return TokenTerms(losses, clipped.detach(), None if kl is None else kl.detach())


def dapo_loss(losses: torch.Tensor, tokens: torch.Tensor | int) -> torch.Tensor:
    """The token losses of a micro-batch summed and divided by the answer tokens of the whole
    optimizer step (all its micro-batches): summed over micro-batches, the step's mean token loss."""
    return losses.sum() / tokens


def per_token(values: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Each answer's value repeated over its tokens: flat, in the order answer_token_logps gives them."""
    return values.repeat_interleave(torch.tensor(lengths, device=values.device))
