"""The summed log-probability of each answer of a batch of preference records.

Computed as the SFT loss computes its own: the model stops before its head, its last hidden
states are gathered once at the scored positions of the whole batch, and the head runs on those
alone, in chunks, with the family's logit transform inside (sft.training.token_logps over
sft.training.loss's chunk_log_probs), so no [tokens, vocabulary] logits exist. The per-token
log-probabilities, in batch order, are then summed per answer.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from sft.training.preference.collate import (
    ANSWER_LENGTHS_KEY,
    DESIRABLE_KEY,
    PREFERENCE_NOT_MODEL_INPUTS,
    REFERENCE_KEY,
    PairCollator,
    answer_token_counts,
)
from sft.training.preference.losses import Scored
from sft.training.token_logps import answer_token_logps


def answer_logps(model: torch.nn.Module, batch: dict[str, Any], head: torch.nn.Module | None = None) -> torch.Tensor:
    """[records, 2] float32: the summed log-probability of each record's two answers (chosen and
    rejected, or an unpaired example's completion and its mismatched one).

    ``head`` defaults to the model's output embeddings (pass it when ``model`` is wrapped)."""
    token_logps = answer_token_logps(model, batch, head, PREFERENCE_NOT_MODEL_INPUTS)
    # Scored positions come in batch order (row-major), so one split gives each sequence's own;
    # the collator counted them on the CPU, so splitting costs no device sync.
    return torch.stack([logps.sum() for logps in token_logps.split(batch[ANSWER_LENGTHS_KEY])]).view(-1, 2)


def scored_batch(model: torch.nn.Module, batch: dict[str, Any], head: torch.nn.Module | None = None) -> Scored:
    """What the losses read of a batch: its answers' log-probabilities under ``model``, their token
    counts, and the reference log-probabilities and labels the batch carries (None where not)."""
    policy = answer_logps(model, batch, head)
    return Scored(policy, answer_token_counts(batch, policy.device), batch.get(REFERENCE_KEY),
                  batch.get(DESIRABLE_KEY))


@torch.no_grad()
def pairs_answer_logps(model: torch.nn.Module, pairs: list[dict[str, Any]], batch_size: int, collator: PairCollator,
                       device: torch.device | str, desc: str = "scoring pairs") -> torch.Tensor:
    """[records, 2] float32 log-probabilities of each record's two answers under ``model`` as it is
    (adapters as they are set), in eval mode (no dropout), ``batch_size`` records at a time; the
    model's training mode is restored after."""
    was_training = model.training
    model.eval()
    results = [torch.zeros(0, 2)]
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, leave=False):
        batch = collator(pairs[start:start + batch_size])
        batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        results.append(answer_logps(model, batch).float().cpu())
    model.train(was_training)
    return torch.cat(results)
