"""Examples (input_ids and labels) -> batches: padded rows, or one packed row per micro-batch.

Labels arrive masked by position (sft.data.tokenize); batching never re-derives the mask from token
ids, so padding with a pad token that is also the EOS (TinyLlama-Chat) leaves the real EOS trained.
"""

from __future__ import annotations

from typing import Any

import torch

from sft.data.tokenize import IGNORE_INDEX

SUPERVISED_POSITIONS = "supervised_positions"
"""Batch key: the flat indices (into the [rows x tokens] batch) of every position with a target.
Computed here, on the CPU, so the loss can gather those positions on a GPU without the
host-device sync that a boolean mask's data-dependent shape costs at every micro-step."""


def supervised_positions(shift_labels: torch.Tensor) -> torch.Tensor:
    return (shift_labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)


def shifted_labels(labels: list[int]) -> list[int]:
    """The target of each position: the next token's label within the same example, -100 at its end.

    Shifting per example (rather than over a packed row) keeps the last token of one example from
    being trained to predict the first token of the next.
    """
    return labels[1:] + [IGNORE_INDEX]


class PaddingCollator:
    """Pads a list of examples to the longest one; padding is never attended to nor supervised."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(examples), width), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
            "labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long),
            "shift_labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long),
        }
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(example["input_ids"])
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = torch.tensor(example["labels"])
            batch["shift_labels"][row, :n] = torch.tensor(shifted_labels(example["labels"]))
        batch[SUPERVISED_POSITIONS] = supervised_positions(batch["shift_labels"])
        return batch


class PackingCollator:
    """Concatenates a micro-batch's examples into one row with no padding at all.

    Position ids restart at 0 for each example, and the example boundaries travel with the batch
    both as tensors (``cu_seq_lens_q/k``, ``max_length_q/k``: FlashAttention's varlen API) and as
    a Python list (``packed_boundaries``, read by sft.modeling.attention without a device sync).
    """

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, Any]:
        lengths = [len(e["input_ids"]) for e in examples]
        boundaries = [0]
        for length in lengths:
            boundaries.append(boundaries[-1] + length)
        cu_seq_lens = torch.tensor(boundaries, dtype=torch.int32)
        shift_labels = torch.tensor([[t for e in examples for t in shifted_labels(e["labels"])]])
        return {
            "input_ids": torch.tensor([[t for e in examples for t in e["input_ids"]]]),
            "position_ids": torch.tensor([[p for n in lengths for p in range(n)]]),
            "labels": torch.tensor([[t for e in examples for t in e["labels"]]]),
            "shift_labels": shift_labels,
            SUPERVISED_POSITIONS: supervised_positions(shift_labels),
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
            "packed_boundaries": boundaries,
        }


PACKED_PARENTS = "packed_parents"
"""Batch key of a row with shared prefixes: per segment, the index of the segment it continues, or -1."""


def pack_shared_prompts(sequences: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Prompt + answer sequences (``prompt_ids``, ``answer_ids``) packed into one row with each
    prompt once: consecutive sequences with the same prompt (GRPO's group) become one segment,
    the prompt less its last token, followed by one segment per answer, that last token and the
    answer. An answer's segment attends to the prompt's (``packed_parents``: read by
    sft.modeling.attention's ``varlen_sdpa`` alone) and its positions continue the prompt's, so
    every answer token sees what it would see packed with its own copy of the prompt, and the
    scored positions (``shift_labels``) are the same, in the same order: each answer's tokens,
    the first predicted from the prompt's last token. No ``cu_seq_lens``: a kernel reading them
    would take the answers for separate examples."""
    input_ids: list[int] = []
    positions: list[int] = []
    labels: list[int] = []
    shift_labels: list[int] = []
    boundaries, parents = [0], []
    previous: list[int] | None = None
    parent = -1
    for sequence in sequences:
        prompt, answer = sequence["prompt_ids"], sequence["answer_ids"]
        if not prompt:
            raise ValueError("pack_shared_prompts: a sequence has an empty prompt")
        if prompt != previous:
            previous, parent = prompt, -1
            if len(prompt) > 1:  # the prompt's own segment; its last token starts each answer's
                input_ids += prompt[:-1]
                positions += range(len(prompt) - 1)
                labels += [IGNORE_INDEX] * (len(prompt) - 1)
                shift_labels += [IGNORE_INDEX] * (len(prompt) - 1)
                boundaries.append(len(input_ids))
                parents.append(-1)
                parent = len(parents) - 1
        input_ids += [prompt[-1], *answer]
        positions += range(len(prompt) - 1, len(prompt) + len(answer))
        labels += [IGNORE_INDEX, *answer]
        shift_labels += [*answer, IGNORE_INDEX]
        boundaries.append(len(input_ids))
        parents.append(parent)
    shifted = torch.tensor([shift_labels])
    return {
        "input_ids": torch.tensor([input_ids]),
        "position_ids": torch.tensor([positions]),
        "labels": torch.tensor([labels]),
        "shift_labels": shifted,
        SUPERVISED_POSITIONS: supervised_positions(shifted),
        "packed_boundaries": boundaries,
        PACKED_PARENTS: parents,
    }
