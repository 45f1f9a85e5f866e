"""Loss over supervised positions only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sft.dataset import IGNORE_INDEX


def supervised_nll_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token negative log-likelihoods over supervised positions, and their count.

    Returning the sum rather than a per-batch mean lets callers average over all tokens of many
    batches, so a batch of short answers does not weigh as much as one of long answers.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, int((targets != IGNORE_INDEX).sum())
