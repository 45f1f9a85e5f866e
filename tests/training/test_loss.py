"""sft.training.loss: the supervised-only loss against a per-example full-logits reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.data.collate import IGNORE_INDEX, PaddingCollator
from sft.data.tokenize import encode_records
from sft.training.loss import supervised_nll_sum
from tests.tiny import conversation_records


def n_supervised(labels: list[int]) -> int:
    return sum(label != IGNORE_INDEX for label in labels)


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer(tiny_model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def reference_nll(model, examples: list[dict[str, list[int]]]) -> tuple[float, int]:
    """Per-example, unpadded: cross-entropy of the full logits at each supervised position."""
    total, count = 0.0, 0
    for example in examples:
        input_ids = torch.tensor([example["input_ids"]])
        with torch.no_grad():
            log_probs = F.log_softmax(model(input_ids=input_ids).logits[0].double(), dim=-1)
        for t in range(1, len(example["labels"])):
            target = example["labels"][t]
            if target != IGNORE_INDEX:
                total -= log_probs[t - 1, target].item()
                count += 1
    return total, count


def test_supervised_nll_sum_matches_a_per_example_reference(tiny_model_and_tokenizer) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    examples, _ = encode_records(tokenizer, conversation_records(4), 256, None)
    batch = PaddingCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        nll, count = supervised_nll_sum(model, batch)
    expected_nll, expected_count = reference_nll(model, examples)
    assert count == expected_count == sum(n_supervised(e["labels"]) for e in examples)
    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert nll.item() == pytest.approx(expected_nll, abs=1e-4)


def test_supervised_nll_sum_ignores_a_label_at_position_0(tiny_model_and_tokenizer) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    ids = tokenizer("Blue sky and green tea.", add_special_tokens=False).input_ids
    examples = [{"input_ids": ids, "labels": list(ids)},  # every position supervised, 0 included
                {"input_ids": ids[:4], "labels": [IGNORE_INDEX, IGNORE_INDEX] + ids[2:4]}]
    batch = PaddingCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        nll, count = supervised_nll_sum(model, batch)
    expected_nll, expected_count = reference_nll(model, examples)
    assert count == expected_count == (len(ids) - 1) + 2
    assert nll.item() == pytest.approx(expected_nll, abs=1e-4)
