"""The two sequences each preference record scores, in one padding-free row (or padded).

A record is a pair (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) or, for KTO, an unpaired
example (``prompt_ids``, ``completion_ids``, ``label``: desirable or not) with the mismatched
completion its KL term scores (``kl_ids``, see with_mismatched_completions). Either way it is two
sequences sharing its prompt, the prompt masked out: chosen then rejected, or the completion then
the mismatched one. A micro-batch of records becomes 2 x records sequences, batched by the SFT
collators: packed into one row with position ids restarting per sequence and attention kept
inside each one, or padded. Nothing of TRL's padding-free mode's FlashAttention requirement
remains: the per-sequence attention of sft.modeling.attention runs on CPU, MPS and CUDA alike.
"""

from __future__ import annotations

from typing import Any

import torch

from sft.data.collate import IGNORE_INDEX, PackingCollator, PaddingCollator, pack_shared_prompts, shifted_labels
from sft.data.pairs import ANSWERS
from sft.training.loss import NOT_MODEL_INPUTS

UNPAIRED_ANSWERS = ("completion", "kl")
"""The two sequences of an unpaired example: its own completion, then the mismatched one of its KL term."""
LABEL = "label"
"""An unpaired example's field: True for a desirable completion, False for an undesirable one."""

REFERENCE_KEY = "reference_logps"
"""A record's two log-probabilities under the reference model (sft.training.reference)."""
ANSWER_LENGTHS_KEY = "answer_tokens"
"""Scored tokens of each sequence of a batch, in batch order: the answer's tokens."""
DESIRABLE_KEY = "desirable"
"""Batch key of unpaired examples: [records] bool, each one's label."""
PREFERENCE_NOT_MODEL_INPUTS = (*NOT_MODEL_INPUTS, ANSWER_LENGTHS_KEY, REFERENCE_KEY, DESIRABLE_KEY)
"""Batch keys the losses read and the model must not see."""


def answer_ids(record: dict[str, Any]) -> list[list[int]]:
    """The token ids of a record's two answers: chosen and rejected, or an unpaired example's
    completion and its mismatched one."""
    return [record[f"{side}_ids"] for side in (UNPAIRED_ANSWERS if LABEL in record else ANSWERS)]


def pair_sequences(record: dict[str, Any]) -> list[dict[str, list[int]]]:
    """The two sequences of a record as SFT examples: the prompt masked, the answer scored."""
    prompt = record["prompt_ids"]
    return [{"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}
            for answer in answer_ids(record)]


class PairCollator:
    """Batches records as 2 x records sequences (chosen, rejected, chosen, rejected... or
    completion, mismatched completion...), packed into one row (``packing``) or padded, with each
    sequence's scored-token count, unpaired examples' labels and, where the records carry them,
    their reference log-probabilities. With ``share_prompts`` (packing, ``varlen_sdpa``
    attention) each record's prompt is packed once and both answers attend to it
    (sft.data.collate.pack_shared_prompts): the same log-probabilities, for fewer tokens."""

    def __init__(self, packing: bool = True, pad_token_id: int | None = None, share_prompts: bool = False):
        if not packing and pad_token_id is None:
            raise ValueError("padding needs a pad_token_id")
        if share_prompts and not packing:
            raise ValueError("sharing a record's prompt between its two answers needs packing")
        self.collate = PackingCollator() if packing else PaddingCollator(pad_token_id)
        self.share_prompts = share_prompts

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = [sequence for record in records for sequence in pair_sequences(record)]
        if self.share_prompts:  # the prompt once, then both answers attending to it
            batch = pack_shared_prompts([{"prompt_ids": record["prompt_ids"], "answer_ids": answer}
                                         for record in records for answer in answer_ids(record)])
        else:
            batch = self.collate(sequences)
        # A Python list: splitting the scored positions by it needs no device sync.
        batch[ANSWER_LENGTHS_KEY] = [sum(label != IGNORE_INDEX for label in shifted_labels(s["labels"]))
                                     for s in sequences]
        if all(LABEL in record for record in records):
            batch[DESIRABLE_KEY] = torch.tensor([bool(record[LABEL]) for record in records])
        if all(REFERENCE_KEY in record for record in records):
            batch[REFERENCE_KEY] = torch.tensor([record[REFERENCE_KEY] for record in records], dtype=torch.float32)
        return batch


def answer_token_counts(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """[records, 2] token counts of each record's answers, from the batch's per-sequence list."""
    return torch.tensor(batch[ANSWER_LENGTHS_KEY], dtype=torch.float32, device=device).view(-1, 2)


def with_mismatched_completions(examples: list[dict[str, Any]], max_seq_length: int) -> list[dict[str, Any]]:
    """Unpaired examples, each with ``kl_ids``: a completion written for another prompt, cut to fit
    after its own prompt within ``max_seq_length``. KTO's KL reference point is the policy's mean
    log-ratio to the reference on such mismatched (prompt, completion) pairs.

    TRL rotates the completions by one within each batch of its (unshuffled) data
    (trl/trainer/kto_trainer.py, ``add_kl_completion_ids``). Here batches are shuffled, and a
    prepared file lists the completions of one prompt next to each other, where that rotation
    would pair a prompt with its own completions; so the rotation is over prompts: the examples of
    each prompt (in first-seen order) take the completions of the prompt before it, cyclically
    (with a single prompt in the data, its completions rotated by one). Fixed before training, so
    the reference's log-probabilities of these sequences are computed once and cached too."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(tuple(example["prompt_ids"]), []).append(index)
    order = list(groups.values())
    mismatched = list(examples)
    for position, members in enumerate(order):
        donors = order[position - 1]  # the last prompt's for the first
        for k, index in enumerate(members):
            donor = examples[donors[(k - 1 if len(order) == 1 else k) % len(donors)]]
            budget = max_seq_length - len(examples[index]["prompt_ids"])
            mismatched[index] = examples[index] | {"kl_ids": donor["completion_ids"][:budget]}
    return mismatched
