"""Which run `sft eval` and `sft eval-dpo` score, with which configuration, and where their report goes.

The evaluation itself is a stand-in here; tests/test_pipeline.py and tests/recipes/ run the real
ones on trained runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from sft.config import RUN_CONFIG_FILE, SFTConfig, build_config
from sft.errors import ConfigError, UserError
from sft.inference.run_dir import (
    evaluated_run,
    evaluation_parser,
    held_out,
    report_files,
    report_on_run,
    write_report,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A training output directory: a plain PEFT adapter and the run's configuration."""
    run = tmp_path_factory.mktemp("evaluated") / "run"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(run)
    build_config(None, {"model": str(tiny_model_dir), "system_prompt": "Answer briefly.", "output_dir": str(run),
                        "val_file": str(run / "val.jsonl")}).save(run / RUN_CONFIG_FILE)
    return run


def parse(*flags: str) -> Any:
    return evaluation_parser("sft test-eval", "Score a run.", "", "the run's adapter").parse_args(list(flags))


def test_the_output_dir_is_the_run_and_its_own_configuration_is_the_start(run_dir: Path) -> None:
    adapter_dir, config = evaluated_run(parse("--output-dir", str(run_dir), "--max-new-tokens", "7"))
    assert adapter_dir == run_dir
    assert config.data.system_prompt == "Answer briefly."  # from the run's sft_config.yaml
    assert config.eval.max_new_tokens == 7  # the flag on top


def test_adapter_names_the_folder_scored_and_a_preset_names_the_run(run_dir: Path, tmp_path: Path) -> None:
    preset = tmp_path / "preset.yaml"
    build_config(None, {"output_dir": str(run_dir)}).save(preset)
    assert evaluated_run(parse("--config", str(preset)))[0] == run_dir
    assert evaluated_run(parse("--adapter", str(run_dir), "--output-dir", str(tmp_path)))[0] == run_dir


def test_a_folder_without_an_adapter_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{tmp_path}: no adapter_config.json here"):
        evaluated_run(parse("--output-dir", str(tmp_path)))
    with pytest.raises(ConfigError, match="absent: no such directory"):
        evaluated_run(parse("--adapter", str(tmp_path / "absent")))


@pytest.mark.parametrize(("limit", "scored"), [(0, 5), (2, 2), (9, 5)])
def test_held_out_records_are_the_first_max_eval_examples(limit: int, scored: int) -> None:
    config = build_config(None, {"val_file": "val.jsonl", "max_eval_examples": limit})
    records = held_out(config, lambda path: [{"id": f"{path}:{n}"} for n in range(5)])
    assert [record["id"] for record in records] == [f"val.jsonl:{n}" for n in range(scored)]


def test_the_report_files_are_written_with_the_prefix(tmp_path: Path) -> None:
    assert report_files("preference_") == ("eval/preference_generations.jsonl", "eval/preference_metrics.json",
                                           "eval/preference_report.md")
    rows = [{"id": "a", "answer": "é"}, {"id": "b", "answer": "x"}]
    report = write_report(tmp_path, "preference_", rows, {"pairs": 2}, "# Report\n")
    assert report["report_path"] == tmp_path / "eval/preference_report.md"
    assert report["metrics"] == {"pairs": 2} and report["generations"] == rows
    assert (tmp_path / "eval/preference_report.md").read_text(encoding="utf-8") == "# Report\n"
    lines = (tmp_path / "eval/preference_generations.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows and "é" in lines[0]
    assert json.loads((tmp_path / "eval/preference_metrics.json").read_text()) == {"pairs": 2}
    assert sorted(path.name for path in (tmp_path / "eval").iterdir()) == sorted(
        Path(name).name for name in report_files("preference_"))


def fake_evaluation(config: SFTConfig, adapter_dir: Path) -> dict[str, Any]:
    return write_report(adapter_dir, "test_", [{"id": "a"}], {"score": 0.5}, f"# {config.eval.max_new_tokens}\n")


def test_a_report_goes_into_the_run_and_its_metrics_are_printed(run_dir: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    report_on_run(parse("--output-dir", str(run_dir), "--max-new-tokens", "3"), "test_", fake_evaluation,
                  lambda metrics: f"score {metrics['score']}")
    assert capsys.readouterr().out == f"score 0.5\nReport: {run_dir / 'eval/test_report.md'}\n"
    assert (run_dir / "eval/test_report.md").read_text(encoding="utf-8") == "# 3\n"
    # sft wrote them (its manifest says so): a second report replaces them without --force.
    report_on_run(parse("--output-dir", str(run_dir)), "test_", fake_evaluation, str)


def test_a_run_the_command_does_not_accept_is_refused_before_anything_is_written(run_dir: Path) -> None:
    def refuse(config: SFTConfig, adapter_dir: Path) -> None:
        raise ConfigError(f"{adapter_dir}: not a run this command scores")

    with pytest.raises(ConfigError, match="not a run this command scores"):
        report_on_run(parse("--output-dir", str(run_dir)), "refused_", fake_evaluation, str, accept=refuse)
    assert not list(run_dir.glob("eval/refused_*"))


def test_a_file_sft_did_not_write_is_replaced_only_with_force(run_dir: Path) -> None:
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval/mine_metrics.json").write_text("{}", encoding="utf-8")
    evaluation = lambda config, adapter_dir: write_report(adapter_dir, "mine_", [], {}, "")
    with pytest.raises(UserError, match="mine_metrics.json"):
        report_on_run(parse("--output-dir", str(run_dir)), "mine_", evaluation, str)
    report_on_run(parse("--output-dir", str(run_dir), "--force"), "mine_", evaluation, str)
    assert (run_dir / "eval/mine_report.md").is_file()
