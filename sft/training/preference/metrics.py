"""What preference training logs beside the loss, as sums over records.

Each metric is a sum and a count, added up on the device over the micro-batches (and processes)
since the last log and divided only when logged: reading them each micro-step would sync the
device each time. A pair's metrics count every pair; an unpaired example's rewards count the
examples of its label, and KTO's KL reference point counts micro-batches.
"""

from __future__ import annotations

import torch

from sft.training.preference.losses import PreferenceLoss, Scored, kl_reference_point

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")
"""What training on pairs logs, each a mean over pairs (TRL's names)."""
UNPAIRED_METRICS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl")
"""What training on unpaired examples logs (TRL's KTO names): rewards and log-probabilities of
the desirable (chosen) and undesirable (rejected) completions, and the KL reference point."""


def metric_names(loss: PreferenceLoss) -> tuple[str, ...]:
    return METRICS if loss.paired else UNPAIRED_METRICS


def metric_sums(policy: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Sums over the pairs of each of METRICS, from [pairs, 2] log-probabilities and rewards, detached."""
    policy = policy.detach()
    chosen, rejected = rewards.detach().unbind(1)
    return torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).sum().to(chosen.dtype),
                        (chosen - rejected).sum(), policy[:, 0].sum(), policy[:, 1].sum()]).double()


def metric_totals(scored: Scored, rewards: torch.Tensor) -> torch.Tensor:
    """[the sum of each metric of the batch, then the count each is a mean over], float64."""
    if scored.desirable is None:
        sums = metric_sums(scored.policy, rewards)
        return torch.cat([sums, torch.full_like(sums, len(rewards))])
    desirable = scored.desirable.to(rewards.dtype)
    undesirable = 1 - desirable
    reward, logps = rewards.detach()[:, 0], scored.policy.detach()[:, 0]
    sums = torch.stack([(reward * desirable).sum(), (reward * undesirable).sum(), (logps * desirable).sum(),
                        (logps * undesirable).sum(), kl_reference_point(scored)])
    counts = torch.stack([desirable.sum(), undesirable.sum(), desirable.sum(), undesirable.sum(),
                          torch.ones_like(desirable[0])])
    return torch.cat([sums, counts]).double()


def metric_means(totals: list[float], names: tuple[str, ...]) -> dict[str, float]:
    """{name: mean} from the metrics' sums and counts as metric_totals lays them out; a metric with
    nothing counted (no undesirable example yet) is left out."""
    sums, counts = totals[:len(names)], totals[len(names):]
    return {name: total / count for name, total, count in zip(names, sums, counts, strict=True) if count}
