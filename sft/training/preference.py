"""Preference pairs in one padding-free row, their answer log-probabilities, and the DPO losses.

A micro-batch of pairs becomes 2 x pairs sequences, each pair's chosen then its rejected
(prompt + answer, the prompt masked out), batched by the SFT collators: packed into one row with
position ids restarting per sequence and attention kept inside each one, or padded. Nothing of
TRL's padding-free mode's FlashAttention requirement remains: the per-sequence attention of
sft.modeling.attention runs on CPU, MPS and CUDA alike.

The log-probability of an answer is the sum over its tokens, computed like the SFT loss: the
model stops before its head, and the head runs on answer positions only, in chunks, one answer at
a time (sft.training.loss), so no [tokens, vocabulary] logits exist.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sft.config.dpo import DPOSettings
from sft.data.collate import IGNORE_INDEX, SUPERVISED_POSITIONS, PackingCollator, PaddingCollator, shifted_labels
from sft.data.pairs import ANSWERS
from sft.modeling.head import logit_rule
from sft.training.loss import NOT_MODEL_INPUTS, linear_cross_entropy_sum

REFERENCE_KEY = "reference_logps"
"""A pair's [chosen, rejected] log-probabilities under the reference model (sft.training.reference)."""
ANSWER_LENGTHS_KEY = "answer_tokens"
"""Scored tokens of each sequence of a batch, in batch order: the answer's tokens."""
_NOT_MODEL_INPUTS = (*NOT_MODEL_INPUTS, ANSWER_LENGTHS_KEY, REFERENCE_KEY)

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")
"""What training logs besides the loss, each a mean over pairs (TRL's names)."""


def pair_sequences(pair: dict[str, list[int]]) -> list[dict[str, list[int]]]:
    """The chosen and the rejected sequence of a pair as SFT examples: the prompt masked, the answer scored."""
    prompt = pair["prompt_ids"]
    return [{"input_ids": prompt + pair[f"{side}_ids"], "labels": [IGNORE_INDEX] * len(prompt) + pair[f"{side}_ids"]}
            for side in ANSWERS]


class PairCollator:
    """Batches pairs as 2 x pairs sequences (chosen, rejected, chosen, rejected...), packed into one
    row (``packing``) or padded, with each sequence's scored-token count and, where the pairs carry
    them, their reference log-probabilities."""

    def __init__(self, packing: bool = True, pad_token_id: int | None = None):
        if not packing and pad_token_id is None:
            raise ValueError("padding needs a pad_token_id")
        self.collate = PackingCollator() if packing else PaddingCollator(pad_token_id)

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = [sequence for pair in pairs for sequence in pair_sequences(pair)]
        batch = self.collate(sequences)
        # A Python list: splitting the scored positions by it needs no device sync.
        batch[ANSWER_LENGTHS_KEY] = [sum(label != IGNORE_INDEX for label in shifted_labels(s["labels"]))
                                     for s in sequences]
        if all(REFERENCE_KEY in pair for pair in pairs):
            batch[REFERENCE_KEY] = torch.tensor([pair[REFERENCE_KEY] for pair in pairs], dtype=torch.float32)
        return batch


def answer_logps(model: torch.nn.Module, batch: dict[str, Any], head: torch.nn.Module | None = None) -> torch.Tensor:
    """[pairs, 2]: the summed log-probability of each pair's chosen and rejected answer.

    ``head`` defaults to the model's output embeddings (pass it when ``model`` is wrapped)."""
    inputs = {key: value for key, value in batch.items() if key not in _NOT_MODEL_INPUTS}
    shift_labels = batch["shift_labels"]
    # Scored positions come in batch order (row-major), so one split gives each sequence's own;
    # the collator computed them on the CPU, so gathering them costs no device sync.
    positions = batch[SUPERVISED_POSITIONS]
    targets = shift_labels.flatten().index_select(0, positions)
    lengths = batch[ANSWER_LENGTHS_KEY]
    rule = logit_rule(model, head)
    if rule is None:  # a final-logit transform sft does not know: the model's own logits
        outputs = model(**inputs, use_cache=False)
        logits = outputs.logits.flatten(0, 1).index_select(0, positions).float()
        nll = [F.cross_entropy(x, t, reduction="sum") for x, t in zip(logits.split(lengths), targets.split(lengths))]
        return -torch.stack(nll).view(-1, len(ANSWERS))
    outputs = model(**inputs, output_hidden_states=True, use_cache=False,
                    logits_to_keep=torch.zeros(0, dtype=torch.long, device=shift_labels.device))
    head = head if head is not None else model.get_output_embeddings()
    hidden = outputs.hidden_states[-1].flatten(0, 1).index_select(0, positions)
    nll = [linear_cross_entropy_sum(h, head.weight, t, rule=rule)
           for h, t in zip(hidden.split(lengths), targets.split(lengths), strict=True)]
    return -torch.stack(nll).view(-1, len(ANSWERS))


@torch.no_grad()
def pairs_answer_logps(model: torch.nn.Module, pairs: list[dict[str, Any]], batch_size: int, collator: PairCollator,
                       device: torch.device | str, desc: str = "scoring pairs") -> torch.Tensor:
    """[pairs, 2] float32 log-probabilities of each pair's chosen and rejected answer under
    ``model`` as it is (adapters as they are set), in eval mode (no dropout), ``batch_size`` pairs
    at a time; the model's training mode is restored after."""
    was_training = model.training
    model.eval()
    results = [torch.zeros(0, len(ANSWERS))]
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, leave=False):
        batch = collator(pairs[start:start + batch_size])
        batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        results.append(answer_logps(model, batch).float().cpu())
    model.train(was_training)
    return torch.cat(results)


def preference_losses(policy: torch.Tensor, reference: torch.Tensor, answer_tokens: torch.Tensor,
                      settings: DPOSettings) -> torch.Tensor:
    """The loss of each pair, from [pairs, 2] policy and reference log-probabilities of (chosen,
    rejected) and the answers' token counts, as the DPO paper, IPO, SLiC's hinge and Robust DPO
    define them (TRL's formulas), plus the optional SFT term on the chosen answer."""
    beta = settings.beta
    logratios = policy - reference.to(policy.dtype)
    if settings.loss_type == "ipo":
        # Per-token log-ratios: summed ones would make the squared loss grow with answer length.
        per_token = logratios / answer_tokens.clamp(min=1)
        losses = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2
    else:
        margin = beta * (logratios[:, 0] - logratios[:, 1])
        if settings.loss_type == "hinge":
            losses = torch.relu(1 - margin)
        else:
            smoothing = settings.label_smoothing
            losses = (-(1 - smoothing) * F.logsigmoid(margin) + smoothing * F.logsigmoid(-margin)) / (1 - 2 * smoothing)
    if settings.sft_weight:
        losses = losses + settings.sft_weight * -policy[:, 0] / answer_tokens[:, 0].clamp(min=1)
    return losses


def metric_sums(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """Sums over the pairs of each of METRICS, detached, one tensor: added across micro-batches
    and processes without a device sync, and divided by the pair count only when logged."""
    policy = policy.detach()
    rewards = beta * (policy - reference.to(policy.dtype))
    chosen, rejected = rewards.unbind(1)
    return torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).sum().to(chosen.dtype),
                        (chosen - rejected).sum(), policy[:, 0].sum(), policy[:, 1].sum()]).double()


def answer_token_counts(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """[pairs, 2] token counts of each pair's answers, from the batch's per-sequence list."""
    return torch.tensor(batch[ANSWER_LENGTHS_KEY], dtype=torch.float32, device=device).view(-1, len(ANSWERS))
