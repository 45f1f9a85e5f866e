"""`sft ifeval` generating with a tiny model: base vs adapter, the run's prompt code, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.config import RUN_CONFIG_FILE, build_config
from sft.inference.ifeval.command import main
from tests.tiny import write_jsonl

PROMPTS = [
    {"key": 1, "prompt": "Say hi without commas.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 2, "prompt": "Write at least two words.", "instruction_id_list": ["length_constraints:number_words"],
     "kwargs": [{"num_words": 2, "relation": "at least"}]},
    {"key": 3, "prompt": "Give a title.", "instruction_id_list": ["detectable_format:title"], "kwargs": [{}]},
]


@pytest.fixture()
def input_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "input_data.jsonl", PROMPTS)


@pytest.fixture()
def run_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A training output directory: a LoRA adapter (non-zero, so it changes the answers), the
    tokenizer and the run's configuration with its own system prompt."""
    run = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(run)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(run)
    build_config(None, {"model": str(tiny_model_dir), "system_prompt": "Answer briefly."}).save(run / RUN_CONFIG_FILE)
    return run


def answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_adapter_run_scores_base_and_adapter_into_the_run_report(run_dir: Path, input_data: Path) -> None:
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "report.md").write_text("# Evaluation\n\nvalidation loss...\n")
    args = ["--adapter", str(run_dir), "--input-data", str(input_data), "--max-new-tokens", "6", "--batch-size", "2"]
    assert main(args) == 0

    out = run_dir / "eval" / "ifeval"
    base, adapted = answers(out / "base" / "responses.jsonl"), answers(out / "adapter" / "responses.jsonl")
    assert sorted(r["key"] for r in base) == [1, 2, 3] == sorted(r["key"] for r in adapted)
    assert {r["prompt"]: r["response"] for r in base} != {r["prompt"]: r["response"] for r in adapted}
    for variant in ("base", "adapter"):
        assert json.loads((out / variant / "scores.json").read_text())["prompts"] == 3
        settings = json.loads((out / variant / "generation.json").read_text())["settings"]
        assert settings["system_prompt"] == "Answer briefly." and settings["max_new_tokens"] == 6
    report = (run_dir / "eval" / "report.md").read_text()
    assert report.startswith("# Evaluation\n\nvalidation loss...\n")
    assert report.count("## Instruction following (IFEval)") == 1 and "`punctuation:no_comma`" in report

    assert main(args) == 0  # everything is on disk: nothing is generated, the section is replaced
    assert (run_dir / "eval" / "report.md").read_text().count("## Instruction following (IFEval)") == 1
    assert answers(out / "base" / "responses.jsonl") == base


def test_skip_base_answers_and_scores_the_adapter_alone(run_dir: Path, input_data: Path) -> None:
    args = ["--adapter", str(run_dir), "--input-data", str(input_data), "--max-new-tokens", "4", "--skip-base"]
    assert main(args) == 0
    out = run_dir / "eval" / "ifeval"
    assert not (out / "base").exists()
    assert len(answers(out / "adapter" / "responses.jsonl")) == 3
    assert json.loads((out / "adapter" / "scores.json").read_text())["prompts"] == 3
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| |"))
    assert header.count("|") == 3 and header.endswith(" + run |")  # one column: the adapter's
    with pytest.raises(SystemExit):
        main(["--model", "smollm2-135m-instruct", "--out", str(out), "--skip-base", "--input-data", str(input_data)])


def test_a_rerun_continues_where_the_last_one_stopped(tiny_model_dir: Path, input_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--model", str(tiny_model_dir), "--out", str(out), "--input-data", str(input_data),
            "--max-new-tokens", "5", "--batch-size", "1"]
    assert main([*args, "--limit", "2"]) == 0
    first = answers(out / "base" / "responses.jsonl")
    assert [r["key"] for r in first] == [1, 2]  # batches go in file order: a stopped run answered a prefix
    # An interruption in the middle of a write leaves a partial last line: that answer is redone.
    with (out / "base" / "responses.jsonl").open("a") as handle:
        handle.write('{"key": 3, "prompt": "Give a ti')

    assert main(args) == 0
    second = answers(out / "base" / "responses.jsonl")
    assert second[:2] == first and [r["key"] for r in second[2:]] == [3]
    assert json.loads((out / "base" / "scores.json").read_text())["prompts"] == 3


def test_answers_of_other_settings_are_not_mixed_in(tiny_model_dir: Path, input_data: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    args = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--input-data", str(input_data),
            "--limit", "1"]
    assert main([*args, "--max-new-tokens", "3"]) == 0
    assert main([*args, "--max-new-tokens", "4"]) == 2
    assert "pass another --out" in capsys.readouterr().err


def test_answers_of_an_adapter_retrained_in_place_are_not_reused(run_dir: Path, tiny_model_dir: Path,
                                                                  input_data: Path, capsys: pytest.CaptureFixture) -> None:
    """Same run folder, same settings, other weights (a resumed or retrained run): its old answers
    would be scored as the new adapter's."""
    args = ["--adapter", str(run_dir), "--input-data", str(input_data), "--max-new-tokens", "3", "--limit", "1"]
    assert main(args) == 0
    lora = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).save_pretrained(run_dir)
    capsys.readouterr()
    assert main(args) == 2
    assert "adapter_sha256" in capsys.readouterr().err


def test_answers_longer_than_the_model_reads_are_refused(tiny_model_dir: Path, input_data: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    args = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--input-data", str(input_data),
            "--max-new-tokens", "300"]  # the tiny model takes 256 positions
    assert main(args) == 2
    assert "lower --max-new-tokens" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_adapter_answers_with_its_update_merged_into_the_base(run_dir: Path, input_data: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Long generation runs base + adapter as one matmul a layer (merged_weights); the answers
    are those of the unmerged adapter, and the base is put back afterwards."""
    import torch
    from peft.tuners.lora import LoraLayer

    from sft.data.templates import end_of_turn_ids
    from sft.inference.ifeval import command
    from sft.inference.loading import load_run, run_config
    from sft.modeling.generate import generate_greedy
    from sft.modeling.lora import merged_weights

    run = load_run(run_dir, run_config(run_dir), device="cpu")
    layers = [m for m in run.model.modules() if isinstance(m, LoraLayer)]
    before = {id(m): m.base_layer.weight.detach().clone() for m in layers}
    ids = [command.encode_question(run.tokenizer, p["prompt"], "Answer briefly.") for p in PROMPTS]
    with torch.no_grad():
        unmerged = generate_greedy(run.model, run.tokenizer, ids, 8, end_of_turn_ids(run.tokenizer), 3)
        unmerged_logits = run.model(input_ids=torch.tensor([ids[0]])).logits
        with merged_weights(run.model):
            assert all(m.merged for m in layers)
            merged = generate_greedy(run.model, run.tokenizer, ids, 8, end_of_turn_ids(run.tokenizer), 3)
            merged_logits = run.model(input_ids=torch.tensor([ids[0]])).logits
    assert [a.text for a in merged] == [a.text for a in unmerged]
    assert torch.allclose(merged_logits, unmerged_logits, atol=1e-4)
    assert not any(m.merged for m in layers)
    assert all(torch.equal(m.base_layer.weight, before[id(m)]) for m in layers)

    seen = []
    real = command.generate_greedy

    def recording(model, *args, **kwargs):
        seen.append(all(m.merged for m in model.modules() if isinstance(m, LoraLayer)))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(command, "generate_greedy", recording)
    assert main(["--adapter", str(run_dir), "--input-data", str(input_data), "--max-new-tokens", "4",
                 "--batch-size", "3"]) == 0
    # the base answers first, with the adapter off (nothing merged); then the adapter, merged
    assert seen == [False, True]


def test_the_runs_report_written_from_another_out_folder_stays_the_runs_own(run_dir: Path, input_data: Path,
                                                                            tmp_path: Path) -> None:
    """With --out outside the run, the IFEval section still goes into the run's eval/report.md,
    and the run's manifest lists it: `sft eval` of the run may then replace it."""
    from sft.outputs import Manifest

    out = tmp_path / "elsewhere"
    assert main(["--adapter", str(run_dir), "--input-data", str(input_data), "--max-new-tokens", "3", "--skip-base",
                 "--out", str(out)]) == 0
    assert "## Instruction following (IFEval)" in (run_dir / "eval" / "report.md").read_text()
    assert Manifest.load(run_dir).owns("eval/report.md")
    assert Manifest.load(out).owns("report.md")
