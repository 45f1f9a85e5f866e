"""The whole SFT recipe on the real demo sets of two shapes: raw file -> prepare -> train -> evaluate.

The data are the real files (AlpacaEval's 805 Alpaca records; LLaMA-Factory's 300 multi-turn
ShareGPT chats with tool calls); the model is the tiny random Llama, so each run takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.data.prepare import main as prepare_main
from sft.data.prepared import read_conversations
from sft.inference.evaluate import main as eval_main
from sft.recipes.sft import main as train_main
from tests.tiny import as_flags, tiny_run_overrides

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
DEMO_SETS = {
    "alpaca": SHARED / "alpaca_eval" / "alpaca_eval_805_instructions.json.gz",
    "sharegpt-multi-turn": SHARED / "llamafactory" / "glaive_toolcall_en_demo.json.gz",
}


@pytest.mark.parametrize("name", list(DEMO_SETS))
def test_a_demo_set_goes_from_raw_file_to_evaluated_adapter(name: str, tiny_model_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    source = DEMO_SETS[name]
    if not source.is_file():
        pytest.skip(f"{source} is not on this machine")
    prepared = tmp_path / "prepared"
    assert prepare_main(["--source", str(source), "--out-dir", str(prepared)]) == 0
    report = json.loads((prepared / "prepare_report.json").read_text())
    total = report["total"]
    assert total["read"] == total["kept"] + sum(total["rejected"].values()) + total["replaced"]
    conversations = read_conversations(prepared / "sft_train.jsonl")
    turns = max(sum(m["role"] == "assistant" for m in c["messages"]) for c in conversations)
    assert turns == 1 if name == "alpaca" else turns > 1  # the multi-turn set keeps its multi-turn chats
    output_dir = tmp_path / "run"
    flags = as_flags(tiny_run_overrides(tiny_model_dir, prepared / "sft_train.jsonl", prepared / "sft_val.jsonl",
                                        output_dir, max_steps=2, max_seq_length=128, num_generations=1,
                                        max_new_tokens=4, max_eval_examples=8))
    assert train_main(flags) == 0
    data_report = json.loads((output_dir / "data_report.json").read_text())
    assert data_report["train"]["kept"] > 0 and data_report["train"]["supervised_tokens"] > 0
    assert eval_main(["--output-dir", str(output_dir), "--max-eval-examples", "8", "--num-generations", "1",
                      "--max-new-tokens", "4"]) == 0
    metrics = json.loads((output_dir / "eval" / "metrics.json").read_text())
    assert metrics["val_supervised_tokens"] > 0
    # The tiny model reads 256 positions: long held-out chats are passed over, and counted.
    assert metrics["answers"] + metrics["prompts_too_long"] >= 1 and metrics["answers"] <= 1
    assert "Change in validation loss" in capsys.readouterr().out
