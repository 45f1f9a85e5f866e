"""SimPO, ORPO and KTO from the command line on the tiny model: each trains, its adapter moves, and
a loss without a reference model never computes (nor caches) one."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from safetensors.torch import load_file

from sft.cli import main as sft_main
from sft.config import RUN_CONFIG_FILE, DPOConfig, build_config
from sft.recipes import dpo as dpo_recipe
from sft.training import reference as reference_module
from sft.training import stages
from sft.training.preference.metrics import METRICS, UNPAIRED_METRICS
from sft.training.reference import REFERENCE_FILE
from tests.tiny import as_flags, logged, tiny_run_overrides, write_jsonl
from tests.training.tiny_pairs import preference_records, write_preference_split


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_preference_split(tmp_path_factory.mktemp("pairs"), n_train=12, n_val=4)


@pytest.fixture(scope="module")
def unpaired_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """KTO's own data, prepared by `sft prepare-preferences` from raw unpaired records (TRL's
    conversational layout): each test pair's answers as a desirable and an undesirable example."""
    directory = tmp_path_factory.mktemp("unpaired")
    raw = [{"prompt": pair["prompt"], "completion": [{"role": "assistant", "content": pair[side]}],
            "label": side == "chosen"} for pair in preference_records(16) for side in ("chosen", "rejected")]
    write_jsonl(directory / "raw.jsonl", raw)
    assert sft_main(["prepare-preferences", "--source", str(directory / "raw.jsonl"), "--out-dir",
                     str(directory / "prepared"), "--val-fraction", "0.25"]) == 0
    return directory / "prepared" / "dpo_train.jsonl", directory / "prepared" / "dpo_val.jsonl"


def _flags(tiny_model_dir: Path, data: tuple[Path, Path], output_dir: Path, **changes) -> list[str]:
    overrides = tiny_run_overrides(tiny_model_dir, *data, output_dir, max_seq_length=128, batch_size=4,
                                   eval_batch_size=4, max_steps=2, lora_dropout=0.0, eval_steps=2, save_steps=2,
                                   learning_rate=2e-2)
    return as_flags(overrides | changes)


def _trained(output_dir: Path) -> bool:
    """Whether the saved adapter moved from its start: LoRA's B matrices start at zero."""
    weights = load_file(output_dir / "adapter_model.safetensors")
    return any(float(tensor.abs().max()) > 0 for name, tensor in weights.items() if "lora_B" in name)


@pytest.mark.parametrize(("loss_type", "changes"), [("simpo", {"beta": 2.0, "simpo_gamma": 0.5}), ("orpo", {})])
def test_a_reference_free_loss_trains_without_a_reference_pass(loss_type: str, changes: dict, tiny_model_dir: Path,
                                                               pair_files: tuple[Path, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reference_module, "compute_reference_logps",
                        lambda *a, **k: pytest.fail("reference log-probabilities were computed"))
    monkeypatch.setattr(dpo_recipe, "with_reference_logps", lambda *a, **k: pytest.fail("the reference pass ran"))
    output_dir = tmp_path / loss_type
    assert dpo_recipe.main(_flags(tiny_model_dir, pair_files, output_dir, loss_type=loss_type, **changes)) == 0
    losses = logged(output_dir)
    assert sorted(losses) == [1, 2] and all(math.isfinite(loss) for loss in losses.values())
    assert losses[2] != losses[1] and _trained(output_dir)
    assert not (output_dir / REFERENCE_FILE).exists()
    for name in METRICS:
        assert sorted(logged(output_dir, name)) == [1, 2], name
    assert sorted(logged(output_dir, "eval_loss")) == [0, 2]
    assert yaml.safe_load((output_dir / RUN_CONFIG_FILE).read_text())["dpo"]["loss_type"] == loss_type


@pytest.mark.parametrize("data", ["pairs", "unpaired"])
def test_kto_trains_on_unpaired_examples_or_on_pairs_split_in_two(data: str, tiny_model_dir: Path,
                                                                   pair_files: tuple[Path, Path],
                                                                   unpaired_files: tuple[Path, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    compute = reference_module.compute_reference_logps
    monkeypatch.setattr(reference_module, "compute_reference_logps",
                        lambda *args, **kwargs: calls.append(len(args[1])) or compute(*args, **kwargs))
    output_dir = tmp_path / "kto"
    files = pair_files if data == "pairs" else unpaired_files
    assert dpo_recipe.main(_flags(tiny_model_dir, files, output_dir, loss_type="kto")) == 0
    report = json.loads((output_dir / "data_report.json").read_text())
    train, val = report["train"], report["val"]
    if data == "pairs":  # 12 training and 4 validation pairs, each a desirable and an undesirable example
        assert (train["desirable"], train["undesirable"], val["kept"]) == (12, 12, 8)
    assert calls == [train["kept"], val["kept"]]  # completions and mismatched completions, cached
    assert (output_dir / REFERENCE_FILE).exists()
    losses = logged(output_dir)
    # Step 1: the policy is the reference, so every reward and the KL reference point are 0, and each
    # example's loss is 1 - sigmoid(0).
    assert losses[1] == pytest.approx(0.5, abs=1e-6) and logged(output_dir, "kl")[1] == pytest.approx(0, abs=1e-6)
    assert math.isfinite(losses[2]) and losses[2] != losses[1] and _trained(output_dir)
    for name in UNPAIRED_METRICS:
        assert sorted(logged(output_dir, name)) == [1, 2], name
    assert logged(output_dir, "eval_loss")[0] == pytest.approx(0.5, abs=1e-6)


def test_kto_encodes_each_example_with_a_mismatched_completion_and_notes_an_imbalance(
        chatml_tokenizer, pair_files: tuple[Path, Path]) -> None:
    config = build_config(None, {"train_file": str(pair_files[0]), "val_file": str(pair_files[1]), "loss_type": "kto",
                                 "max_seq_length": 128, "desirable_weight": 2.0}, DPOConfig)
    notes: list[str] = []
    encoded = dpo_recipe.DPO(config).encode(chatml_tokenizer, SimpleNamespace(main_process=False, say=notes.append))
    train, val, report = encoded.train, encoded.val, encoded.report
    assert (len(train), len(val)) == (24, 8) and [e["label"] for e in train] == [True] * 12 + [False] * 12
    assert all(e["kl_ids"] and e["kl_ids"] != e["completion_ids"] for e in train)
    assert report["train"]["desirable"] == report["train"]["undesirable"] == 12
    assert notes[-1] == ("note: desirable_weight x desirable examples / (undesirable_weight x undesirable examples) "
                         "is 2; the KTO paper keeps it in [1, 4/3]")


def test_a_paired_loss_refuses_unpaired_examples(tiny_model_dir: Path, unpaired_files: tuple[Path, Path],
                                                 tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert dpo_recipe.main(_flags(tiny_model_dir, unpaired_files, tmp_path / "run", loss_type="sigmoid")) == 2
    err = capsys.readouterr().err
    assert f"{unpaired_files[0]}:1: an unpaired example (prompt, completion, label), not a preference pair" in err


@pytest.mark.parametrize(("flags", "message"), [
    (["--loss-type", "simpo", "--label-smoothing", "0.1"],
     "dpo.label_smoothing: applies to loss_type sigmoid only, not to simpo; set it to 0.0 or use loss_type sigmoid"),
    (["--loss-type", "orpo", "--sft-weight", "1"], "dpo.sft_weight: applies to loss_type sigmoid or ipo or hinge or "
                                                   "simpo only, not to orpo"),
    (["--loss-type", "sigmoid", "--undesirable-weight", "2"], "dpo.undesirable_weight: applies to loss_type kto only"),
    (["--loss-type", "kto", "--desirable-weight", "0"], "dpo.desirable_weight: must be > 0"),
    (["--simpo-gamma", "-1"], "dpo.simpo_gamma: must be >= 0"),
])
def test_option_errors_are_one_line_naming_the_option(flags: list[str], message: str, tiny_model_dir: Path,
                                                      pair_files: tuple[Path, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(stages, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert dpo_recipe.main([*_flags(tiny_model_dir, pair_files, tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_an_unknown_loss_is_refused_from_the_flag_and_from_yaml(tmp_path: Path, tiny_model_dir: Path,
                                                                pair_files: tuple[Path, Path],
                                                                capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        dpo_recipe.main([*_flags(tiny_model_dir, pair_files, tmp_path / "run"), "--loss-type", "nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.replace("'", "")  # Python versions differ in quoting the choices
    assert "argument --loss-type: invalid choice: nope (choose from sigmoid, ipo, hinge, simpo, orpo, kto)" in err
    preset = tmp_path / "preset.yaml"
    preset.write_text("dpo:\n  loss_type: nope\n", encoding="utf-8")
    assert dpo_recipe.main(["--config", str(preset), *_flags(tiny_model_dir, pair_files, tmp_path / "run")]) == 2
    assert "dpo.loss_type: expected one of sigmoid, ipo, hinge, simpo, orpo, kto, got 'nope'" in capsys.readouterr().err


def test_help_lists_every_loss_from_the_registry(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        sft_main(["dpo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--loss-type {sigmoid,ipo,hinge,simpo,orpo,kto}" in out
    for text in ("simpo: SimPO, -log sigmoid", "orpo: ORPO, the chosen answer's NLL", "kto: KTO, unpaired examples",
                 "beta 2 to 2.5 (no reference model). orpo:", "--simpo-gamma", "--desirable-weight",
                 "--undesirable-weight"):
        assert text in out, text
