"""sft.data.collate: padding to a multiple of 8, labels kept by position where pad == eos."""

from __future__ import annotations

import pytest
import torch

from sft.data.collate import IGNORE_INDEX, PaddingCollator
from sft.data.tokenize import encode_records
from tests.tiny import conversation_records


def toy_example(n: int, first_label: int) -> dict[str, list[int]]:
    return {"input_ids": list(range(10, 10 + n)),
            "labels": [IGNORE_INDEX] * first_label + list(range(10 + first_label, 10 + n))}


def test_collator_pads_to_a_multiple_of_8() -> None:
    examples = [toy_example(5, 2), toy_example(11, 4), toy_example(3, 1)]
    batch = PaddingCollator(pad_token_id=7)(examples)
    positions = batch.pop("supervised_positions")
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (3, 16), "attention_mask": (3, 16), "labels": (3, 16), "shift_labels": (3, 16)}
    assert all(v.dtype == torch.long for v in batch.values())
    # The loss gathers exactly the positions with a target, found here on the CPU.
    assert positions.tolist() == (batch["shift_labels"].flatten() != IGNORE_INDEX).nonzero().squeeze(1).tolist()
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 11, 3]
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert batch["input_ids"][row].tolist() == example["input_ids"] + [7] * (16 - n)
        assert batch["labels"][row].tolist() == example["labels"] + [IGNORE_INDEX] * (16 - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (16 - n)


@pytest.mark.parametrize("longest, multiple, width", [(16, 8, 16), (17, 8, 24), (9, 1, 9), (1, 8, 8)])
def test_collator_width(longest: int, multiple: int, width: int) -> None:
    batch = PaddingCollator(0, pad_to_multiple_of=multiple)([toy_example(longest, 0), toy_example(1, 0)])
    assert tuple(batch["input_ids"].shape) == (2, width)


def test_collator_keeps_real_eos_labels_when_pad_is_eos(zephyr_tokenizer) -> None:
    tokenizer = zephyr_tokenizer
    eos = tokenizer.eos_token_id
    examples, _ = encode_records(tokenizer, conversation_records(3), 256, None)
    batch = PaddingCollator(tokenizer.pad_token_id)(examples)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= max(len(e["input_ids"]) for e in examples)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert batch["input_ids"][row, n:].tolist() == [eos] * (width - n)
        assert batch["labels"][row, :n].tolist() == example["labels"]
        assert batch["labels"][row, n:].tolist() == [IGNORE_INDEX] * (width - n)
        # The answer's </s> (then "\n") stays supervised; padding </s> is not.
        assert batch["labels"][row, n - 2].item() == eos
        assert (batch["labels"][row] == eos).sum().item() == 1
