"""An adapter's record of its base: one fingerprint for one base in any precision and with any
adapter merged into it, another for other weights or another vocabulary."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from sft.modeling.fingerprint import base_fingerprint, fingerprint_difference
from tests.tiny import build_tokenizer


def test_one_base_has_one_fingerprint_in_any_precision_and_with_adapters_merged(tiny_model_dir: Path) -> None:
    tokenizer = build_tokenizer("chatml")
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = base_fingerprint(full, tokenizer)
    half = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert base_fingerprint(half, tokenizer) == expected
    torch.manual_seed(0)
    adapted = get_peft_model(full, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    assert base_fingerprint(adapted, tokenizer) == expected
    assert base_fingerprint(adapted.merge_and_unload(), tokenizer) == expected


def test_other_weights_or_another_vocabulary_give_another_fingerprint(tiny_model_dir: Path) -> None:
    tokenizer = build_tokenizer("chatml")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = base_fingerprint(model, tokenizer)
    assert fingerprint_difference(before, base_fingerprint(model, build_tokenizer("zephyr"))) \
        == "its tokenizer has another vocabulary"
    with torch.no_grad():
        model.get_output_embeddings().weight[0, 0] += 0.5
    assert fingerprint_difference(before, base_fingerprint(model, tokenizer)) \
        == "its output embeddings have other weights"
    assert fingerprint_difference(before, base_fingerprint(model, None)) is not None
    assert fingerprint_difference(before, {}) is None  # nothing known to compare: not refused
