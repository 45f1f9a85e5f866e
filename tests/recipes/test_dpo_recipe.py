"""The DPO recipe end to end on the tiny model: SFT run -> DPO run on top -> resume -> use the result."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sft.config import RUN_CONFIG_FILE, build_config
from sft.data.pairs import encode_pairs
from sft.data.prepared import read_conversations, read_preferences
from sft.data.templates import encode_prompt, render_prompt
from sft.export.merge import merge
from sft.inference.loading import load_run, run_config
from sft.inference.onpolicy import main as onpolicy_main
from sft.inference.preference_eval import main as eval_dpo_main
from sft.recipes import dpo as dpo_recipe
from sft.recipes.sft import main as sft_main
from sft.training import reference as reference_module
from sft.training import stages
from sft.training.preference.collate import PairCollator
from sft.training.preference.logps import pairs_answer_logps
from sft.training.preference.metrics import METRICS
from sft.training.reference import REFERENCE_FILE
from tests.tiny import as_flags, logged, tiny_run_overrides, write_prepared_split
from tests.training.tiny_pairs import write_preference_split


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    train, val = write_prepared_split(tmp_path_factory.mktemp("sft_data"))
    output_dir = tmp_path_factory.mktemp("runs") / "sft"
    assert sft_main(as_flags(tiny_run_overrides(tiny_model_dir, train, val, output_dir, max_steps=2))) == 0
    return output_dir


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_preference_split(tmp_path_factory.mktemp("dpo_data"), n_train=12, n_val=4)


def _dpo_flags(tiny_model_dir: Path, pair_files: tuple[Path, Path], output_dir: Path, **changes) -> list[str]:
    overrides = tiny_run_overrides(tiny_model_dir, *pair_files, output_dir, max_seq_length=128, batch_size=2,
                                   eval_batch_size=3, max_steps=4, lora_dropout=0.0, eval_steps=2, save_steps=2,
                                   learning_rate=2e-2)
    overrides.update(changes)
    return as_flags(overrides)


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir: Path, sft_run: Path, pair_files: tuple[Path, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("runs") / "dpo"
    assert dpo_recipe.main(_dpo_flags(tiny_model_dir, pair_files, output_dir, sft_adapter=sft_run)) == 0
    return output_dir


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 5, 9, 23, 42, 7]])).logits


def _sft_merged(tiny_model_dir: Path, sft_adapter: Path) -> torch.nn.Module:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(sft_adapter)).merge_and_unload().eval()


def test_a_dpo_run_writes_trainer_style_output_and_logs_every_step(dpo_run: Path, sft_run: Path) -> None:
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", RUN_CONFIG_FILE,
                 "data_report.json", "loss.png", REFERENCE_FILE, "checkpoint-2/adapter_model.safetensors",
                 "checkpoint-4/trainer_state.json", "sft_adapter/adapter_model.safetensors"):
        assert (dpo_run / name).exists(), name
    assert (dpo_run / "sft_adapter/adapter_model.safetensors").read_bytes() == \
        (sft_run / "adapter_model.safetensors").read_bytes()
    saved = yaml.safe_load((dpo_run / RUN_CONFIG_FILE).read_text())
    assert saved["dpo"]["sft_adapter"] == str(sft_run) and saved["dpo"]["beta"] == 0.1
    losses = logged(dpo_run)
    assert sorted(losses) == [1, 2, 3, 4]
    # Step 1: the new adapter's B matrices are zero, so the policy is the reference (base + SFT).
    assert losses[1] == pytest.approx(math.log(2), abs=1e-5)
    for name in METRICS:
        assert sorted(logged(dpo_run, name)) == [1, 2, 3, 4], name
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert logged(dpo_run, name)[1] == pytest.approx(0.0, abs=1e-5)
    assert abs(losses[4] - math.log(2)) > 1e-3  # the gradient reaches the adapter
    evaluations = logged(dpo_run, "eval_loss")
    assert sorted(evaluations) == [0, 2, 4] and evaluations[0] == pytest.approx(math.log(2), abs=1e-5)
    assert sorted(logged(dpo_run, "eval_rewards/accuracies")) == [0, 2, 4]


def test_the_reference_is_the_sft_model_not_the_base(dpo_run: Path, sft_run: Path, tiny_model_dir: Path,
                                                     pair_files: tuple[Path, Path]) -> None:
    tokenizer = load_run(dpo_run, run_config(dpo_run)).tokenizer
    pairs, _ = encode_pairs(tokenizer, read_preferences(pair_files[0]), 128, None, progress=False)
    cached = load_file(dpo_run / REFERENCE_FILE)["train"]
    sft = pairs_answer_logps(_sft_merged(tiny_model_dir, sft_run), pairs, 4, PairCollator(), "cpu")
    base = pairs_answer_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), pairs, 4,
                              PairCollator(), "cpu")
    assert torch.allclose(cached, sft, atol=1e-4, rtol=0)
    assert (cached - base).abs().max() > 1e-2


def test_plain_peft_chat_and_merge_load_base_plus_sft_plus_dpo(dpo_run: Path, sft_run: Path, tiny_model_dir: Path,
                                                               tmp_path: Path) -> None:
    plain = PeftModel.from_pretrained(_sft_merged(tiny_model_dir, dpo_run / "sft_adapter"), str(dpo_run)).eval()
    expected = _logits(plain)
    loaded = load_run(dpo_run, run_config(dpo_run))  # what chat and evaluation load
    assert torch.allclose(_logits(loaded.model), expected, atol=1e-5)
    with loaded.adapter(False):  # the reference: base + SFT
        assert torch.allclose(_logits(loaded.model), _logits(_sft_merged(tiny_model_dir, sft_run)), atol=1e-5)
    checkpoint = load_run(dpo_run / "checkpoint-4", run_config(dpo_run / "checkpoint-4"))
    assert torch.allclose(_logits(checkpoint.model), expected, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(merge(dpo_run, tmp_path / "merged"), dtype=torch.float32)
    assert torch.allclose(_logits(merged.eval()), expected, atol=1e-4)


def test_resume_reads_the_reference_cache_and_continues(tiny_model_dir: Path, sft_run: Path,
                                                        pair_files: tuple[Path, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    compute = reference_module.compute_reference_logps
    monkeypatch.setattr(reference_module, "compute_reference_logps",
                        lambda *args, **kwargs: calls.append(1) or compute(*args, **kwargs))
    output_dir = tmp_path / "dpo"
    flags = _dpo_flags(tiny_model_dir, pair_files, output_dir, sft_adapter=sft_run, max_steps=2)
    assert dpo_recipe.main(flags) == 0
    assert len(calls) == 2  # train and val
    resumed = _dpo_flags(tiny_model_dir, pair_files, output_dir, sft_adapter=sft_run, max_steps=4)
    assert dpo_recipe.main([*resumed, "--resume"]) == 0
    assert len(calls) == 2  # nothing recomputed
    assert sorted(logged(output_dir)) == [1, 2, 3, 4]
    changed = _dpo_flags(tiny_model_dir, pair_files, output_dir, sft_adapter=sft_run, max_seq_length=100)
    assert dpo_recipe.main([*changed, "--overwrite-output-dir"]) == 0
    assert len(calls) == 4  # another tokenization: recomputed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_first_step_on_cuda_in_the_device_policys_precision(tiny_model_dir: Path, sft_run: Path,
                                                            pair_files: tuple[Path, Path], tmp_path: Path) -> None:
    """bfloat16 where the GPU has it: the reference pass runs in the precision training computes
    in, so the first step is ln 2 up to that precision's rounding."""
    output_dir = tmp_path / "dpo"
    assert dpo_recipe.main(_dpo_flags(tiny_model_dir, pair_files, output_dir, sft_adapter=sft_run, device="cuda",
                                      max_steps=3, learning_rate=5e-3)) == 0
    losses = logged(output_dir)
    assert losses[1] == pytest.approx(math.log(2), abs=2e-3)
    assert logged(output_dir, "rewards/margins")[1] == pytest.approx(0.0, abs=2e-2)
    assert abs(losses[3] - math.log(2)) > 2e-3


def test_without_an_sft_adapter_the_base_is_the_reference(tiny_model_dir: Path, pair_files: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    output_dir = tmp_path / "dpo"
    assert dpo_recipe.main(_dpo_flags(tiny_model_dir, pair_files, output_dir, max_steps=1, loss_type="ipo",
                                      beta=0.5)) == 0
    assert not (output_dir / "sft_adapter").exists()
    assert logged(output_dir)[1] == pytest.approx((1 / (2 * 0.5)) ** 2, abs=1e-4)  # IPO at the reference: (1/2beta)^2
    loaded = load_run(output_dir, run_config(output_dir))
    with loaded.adapter(False):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        assert torch.allclose(_logits(loaded.model), _logits(base), atol=1e-5)
    assert build_config(output_dir / RUN_CONFIG_FILE).dpo.loss_type == "ipo"


@pytest.mark.parametrize(("flags", "message"), [
    (["--beta", "0"], "dpo.beta: must be > 0"),
    (["--loss-type", "kto", "--label-smoothing", "0.1"], "dpo.label_smoothing: applies to loss_type sigmoid only"),
    (["--loss-type", "hinge", "--label-smoothing", "0.1"], "label_smoothing: applies to loss_type sigmoid only"),
    (["--sft-adapter", "no/such/run"], "no/such/run: no such directory"),
    (["--group-by-length", "true"], "group_by_length: not used by DPO"),
])
def test_bad_settings_stop_before_a_model_loads(flags: list[str], message: str, tiny_model_dir: Path,
                                                pair_files: tuple[Path, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(stages, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert dpo_recipe.main([*_dpo_flags(tiny_model_dir, pair_files, tmp_path / "run"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_sft_dpo_is_the_same_command_with_every_field_as_a_flag(capsys: pytest.CaptureFixture) -> None:
    from sft.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["dpo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--sft-adapter", "--beta", "--loss-type", "--label-smoothing", "--sft-weight", "--train-file",
                 "--val-file", "--learning-rate", "--max-steps", "--output-dir", "--resume"):
        assert flag in out


def test_eval_dpo_puts_base_sft_and_dpo_side_by_side(dpo_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert eval_dpo_main(["--output-dir", str(dpo_run), "--num-generations", "2", "--max-new-tokens", "4"]) == 0
    metrics = json.loads((dpo_run / "eval" / "preference_metrics.json").read_text())
    assert list(metrics["models"]) == ["base", "sft", "dpo"] and metrics["reference"] == "sft"
    assert metrics["pairs"] == 4
    sft, dpo = metrics["models"]["sft"], metrics["models"]["dpo"]
    assert sft["rewards/margins"] == 0 and sft["rewards/accuracies"] == 0  # the reference against itself
    assert dpo["rewards/margins"] != 0
    for scores in metrics["models"].values():
        assert scores["preference_accuracy"] in (0, 0.25, 0.5, 0.75, 1)
    generations = [json.loads(line) for line in (dpo_run / "eval" / "preference_generations.jsonl").open()]
    assert len(generations) == 2 and all({"base", "sft", "dpo", "chosen"} <= row.keys() for row in generations)
    report = (dpo_run / "eval" / "preference_report.md").read_text()
    assert "| SFT (reference) |" in report and "**DPO**" in report
    assert "preference accuracy" in capsys.readouterr().out


def test_eval_dpo_writes_under_the_adapter_folder_given(dpo_run: Path, tmp_path: Path) -> None:
    """A copy of a run is evaluated into the copy; the run it was copied from keeps its own reports."""
    copy = Path(shutil.copytree(dpo_run, tmp_path / "copy"))
    before = {path: path.read_bytes() for path in dpo_run.rglob("*") if path.is_file()}
    assert eval_dpo_main(["--adapter", str(copy), "--num-generations", "1", "--max-new-tokens", "2"]) == 0
    assert (copy / "eval" / "preference_report.md").is_file()
    assert {path: path.read_bytes() for path in dpo_run.rglob("*") if path.is_file()} == before


def test_onpolicy_pairs_reject_the_sft_models_own_answers(sft_run: Path, tiny_model_dir: Path, tmp_path: Path,
                                                          pair_files: tuple[Path, Path]) -> None:
    source = Path(build_config(sft_run / RUN_CONFIG_FILE).data.train_file)
    out = tmp_path / "onpolicy.jsonl"
    assert onpolicy_main(["--adapter", str(sft_run), "--source", str(source), "--out", str(out), "--limit", "4",
                          "--max-new-tokens", "6"]) == 0
    pairs = read_preferences(out)  # the prepared layout DPO reads
    conversations = read_conversations(source)[:4]
    assert len(pairs) == 4  # a random tiny model never says the reference
    run = load_run(sft_run, run_config(sft_run))
    for pair, conversation in zip(pairs, conversations, strict=True):
        assert pair["prompt"] == conversation["messages"][:-1]
        assert pair["chosen"] == conversation["messages"][-1]["content"]
        prompt_ids = encode_prompt(run.tokenizer, render_prompt(run.tokenizer, pair["prompt"]))
        with torch.no_grad():
            greedy = run.model.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False)[0]
        assert pair["rejected"] == run.tokenizer.decode(greedy[len(prompt_ids):], skip_special_tokens=True).strip()
    assert dpo_recipe.main(_dpo_flags(tiny_model_dir, (out, pair_files[1]), tmp_path / "dpo", max_steps=1,
                                      sft_adapter=sft_run)) == 0
