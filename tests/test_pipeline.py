"""End to end on a tiny random Llama built in the test: prepare -> train -> checkpoint -> resume -> evaluate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sft.data.prepare import main as prepare_main
from sft.inference.evaluate import main as eval_main
from sft.recipes.sft import main as train_main
from tests.tiny import alpaca_records, write_jsonl


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two raw sources sharing one example, with one bad record, prepared into a directory."""
    raw = tmp_path_factory.mktemp("raw")
    records = [{k: r[k] for k in ("instruction", "input", "output")} for r in alpaca_records(40)]
    original = records[:30] + [{"instruction": "   ", "input": "", "output": "no instruction"}]
    cleaned = [dict(records[0], output="A corrected answer.")] + records[30:]
    (raw / "alpaca_data.json").write_text(json.dumps(original), encoding="utf-8")
    write_jsonl(raw / "cleaned_data.jsonl", cleaned)
    out = tmp_path_factory.mktemp("processed")
    assert prepare_main(["--source", str(raw / "alpaca_data.json"), "--source", str(raw / "cleaned_data.jsonl"),
                         "--out-dir", str(out), "--val-fraction", "0.2"]) == 0
    return out


def test_prepare_counts_add_up(prepared: Path) -> None:
    report = json.loads((prepared / "prepare_report.json").read_text())
    total = report["total"]
    assert (total["read"], total["kept"], total["replaced"]) == (42, 40, 1)
    assert total["rejected"] == {"empty_instruction": 1}
    train = (prepared / "sft_train.jsonl").read_text().splitlines()
    val = (prepared / "sft_val.jsonl").read_text().splitlines()
    assert len(train) + len(val) == 40 and len(val) == report["val"] > 0
    corrected = [json.loads(line)["messages"] for line in train + val
                 if json.loads(line)["messages"][0]["content"] == alpaca_records(1)[0]["instruction"]]
    assert [messages[-1]["content"] for messages in corrected] == ["A corrected answer."]


def _train_args(model_dir: Path, prepared: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--train-file", str(prepared / "sft_train.jsonl"),
            "--val-file", str(prepared / "sft_val.jsonl"), "--output-dir", str(output_dir),
            "--device", "cpu", "--max-seq-length", "64", "--batch-size", "4", "--eval-batch-size", "4",
            "--gradient-accumulation-steps", "2", "--learning-rate", "5e-3", "--warmup-ratio", "0",
            "--logging-steps", "1", "--eval-steps", "2", "--save-steps", "2", "--max-steps", "4",
            "--num-generations", "2", "--max-new-tokens", "8", *extra]


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("run") / "out"
    assert train_main(_train_args(tiny_model_dir, prepared, output_dir)) == 0
    return output_dir


def test_training_writes_trainer_style_output(trained: Path) -> None:
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "trainer_state.json", "training_args.bin", "sft_config.yaml", "data_report.json",
                 "checkpoint-2/adapter_model.safetensors", "checkpoint-4/trainer_state.json"):
        assert (trained / name).is_file(), name
    state = json.loads((trained / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [e["step"] for e in state["log_history"] if "eval_loss" in e] == [0, 2, 4]
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]
    data_report = json.loads((trained / "data_report.json").read_text())
    assert data_report["train"]["read"] == data_report["train"]["kept"] + \
        data_report["train"]["dropped_no_supervised_tokens"]


def test_new_run_refuses_to_overwrite_a_previous_one(tiny_model_dir: Path, prepared: Path, trained: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert train_main(_train_args(tiny_model_dir, prepared, trained)) == 2
    assert "holds another run" in capsys.readouterr().err


def test_resume_from_checkpoint_reaches_the_same_adapter(tiny_model_dir: Path, prepared: Path, trained: Path,
                                                         tmp_path: Path) -> None:
    interrupted = tmp_path / "out"
    interrupted.mkdir()
    shutil.copytree(trained / "checkpoint-2", interrupted / "checkpoint-2")
    assert train_main(_train_args(tiny_model_dir, prepared, interrupted, "--resume")) == 0
    state = json.loads((interrupted / "trainer_state.json").read_text())
    reference = json.loads((trained / "trainer_state.json").read_text())
    def losses(run_state: dict) -> dict[int, float]:
        return {e["step"]: e["loss"] for e in run_state["log_history"] if "loss" in e}

    assert losses(state).keys() == losses(reference).keys() == {1, 2, 3, 4}
    assert losses(state) == pytest.approx(losses(reference), rel=1e-5)
    resumed = load_file(interrupted / "adapter_model.safetensors")
    uninterrupted = load_file(trained / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)


def test_resume_without_checkpoint_is_a_clear_error(tiny_model_dir: Path, prepared: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    assert train_main(_train_args(tiny_model_dir, prepared, tmp_path / "empty", "--resume")) == 2
    assert "no checkpoint-N directory" in capsys.readouterr().err


def test_evaluation_compares_base_and_adapter(trained: Path, capsys: pytest.CaptureFixture) -> None:
    assert eval_main(["--output-dir", str(trained)]) == 0
    metrics = json.loads((trained / "eval" / "metrics.json").read_text())
    assert metrics["val_examples"] > 0 and metrics["val_supervised_tokens"] > 0
    assert metrics["adapter_val_loss"] != metrics["base_val_loss"]
    assert metrics["answers"] == 2 and 0 <= metrics["adapter_answers_finished"] <= 2
    rows = [json.loads(line) for line in (trained / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert {"prompt", "reference", "base", "adapter", "base_finished", "adapter_finished"} <= rows[0].keys()
    report = (trained / "eval" / "report.md").read_text()
    assert "| base + adapter |" in report and rows[0]["prompt"].splitlines()[0][:40] in report
    assert "val loss" in capsys.readouterr().out
