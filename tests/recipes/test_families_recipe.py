"""Each family's tiny model through the commands a user runs: sft train -> sft eval -> sft chat.

The validation loss the run logs at step 1 must be the loss of the model's own eager forward
(transformers' code for the family, one example at a time, full logits) with the saved adapter,
on the tokens and labels sft's tokenization gives: the check that found Gemma's soft caps,
Granite's logit scaling, Cohere's logit scale and Gemma 3's sliding window skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sft.data.collate import shifted_labels
from sft.data.prepared import read_conversations
from sft.data.tokenize import IGNORE_INDEX, encode_records
from sft.inference.chat import main as chat_main
from sft.inference.evaluate import main as eval_main
from sft.modeling.models import load_tokenizer
from sft.recipes.sft import main as train_main
from tests.families import FAMILIES, build_family_model_dir
from tests.tiny import as_flags, build_tokenizer, logged, tiny_run_overrides, write_prepared_split

MAX_SEQ_LENGTH = 64


def _own_validation_loss(model_dir: Path, run_dir: Path, val_file: Path) -> float:
    tokenizer = load_tokenizer(str(model_dir))  # as sft loads it: the family's class may tokenize differently
    examples, _ = encode_records(tokenizer, read_conversations(val_file), MAX_SEQ_LENGTH, None, progress=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(model, run_dir).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0].float()
            targets = torch.tensor(shifted_labels(example["labels"]))
            nll += torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    return nll / count


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_trains_evaluates_and_chats(family: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir = build_family_model_dir(tmp_path / "model", family, build_tokenizer("chatml"))
    train_file, val_file = write_prepared_split(tmp_path / "data", n_train=12, n_val=4)
    run_dir = tmp_path / "run"
    flags = as_flags(tiny_run_overrides(model_dir, train_file, val_file, run_dir, max_steps=1, eval_steps=1,
                                        max_seq_length=MAX_SEQ_LENGTH, num_generations=1, max_new_tokens=4))
    assert train_main(flags) == 0
    out = capsys.readouterr().out
    assert "LoRA fusion:" in out
    eval_loss = logged(run_dir, "eval_loss")[1]
    assert eval_loss == pytest.approx(_own_validation_loss(model_dir, run_dir, val_file), abs=2e-4)

    assert eval_main(["--output-dir", str(run_dir), "--num-generations", "1", "--max-new-tokens", "4"]) == 0
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["adapter_val_loss"] == pytest.approx(eval_loss, abs=1e-4)
    capsys.readouterr()
    assert chat_main(["--adapter", str(run_dir), "--prompt", "Name a color.", "--temperature", "0",
                      "--max-new-tokens", "6", "--device", "cpu"]) == 0
