"""sft.config: defaults, YAML presets, CLI overrides, validation messages, round trip, kinds of run."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from sft.config import (
    ConfigError,
    SFTConfig,
    add_config_arguments,
    build_config,
    config_from_args,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))

PRESET = """\
model:
  model: some/local-dir
  dtype: float32
lora:
  lora_r: 8
  lora_alpha: 16
  lora_dropout: 0.0
  lora_target_modules: [q_proj, k_proj, v_proj]
data:
  max_seq_length: 128
  system_prompt: Be brief.
training:
  max_steps: 10
  learning_rate: 1e-3
  gradient_checkpointing: true
  device: cpu
eval:
  num_generations: 2
"""


def write_yaml(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def parse(argv: list[str]) -> SFTConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(write_yaml(tmp_path, text))
    return str(info.value)


def test_defaults_build() -> None:
    config = build_config()
    assert config == SFTConfig()
    assert config.model.model == "smollm2-135m-instruct"
    assert config.lora.r == 16
    assert config.lora.target_modules == ["all-linear"]
    assert config.data.system_prompt is None
    assert config.training.max_steps == -1


def test_yaml_sections_load(tmp_path: Path) -> None:
    config = build_config(write_yaml(tmp_path, PRESET))
    assert config.model.model == "some/local-dir"
    assert config.model.dtype == "float32"
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (8, 16, 0.0)
    assert config.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert (config.data.max_seq_length, config.data.system_prompt) == (128, "Be brief.")
    assert config.training.max_steps == 10
    assert config.training.learning_rate == 1e-3  # PyYAML reads "1e-3" as a string
    assert isinstance(config.training.learning_rate, float)
    assert config.training.gradient_checkpointing is True
    assert config.eval.num_generations == 2
    # Untouched fields keep their defaults.
    assert config.training.batch_size == 4
    assert config.data.train_file == "data/processed/sft_train.jsonl"


def test_overrides_beat_yaml(tmp_path: Path) -> None:
    config = build_config(write_yaml(tmp_path, PRESET), {"max_steps": "2"})
    assert config.training.max_steps == 2
    assert config.lora.r == 8


def test_cli_flags_beat_yaml(tmp_path: Path) -> None:
    path = str(write_yaml(tmp_path, PRESET))
    config = parse(["--config", path, "--max-steps", "2", "--learning-rate", "1e-4",
                    "--lora-target-modules", "q_proj,v_proj"])
    assert config.training.max_steps == 2
    assert config.training.learning_rate == 1e-4
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    # Flags left out do not override the YAML.
    assert config.lora.r == 8
    assert config.data.system_prompt == "Be brief."
    assert config.training.gradient_checkpointing is True


def test_cli_without_config_uses_defaults() -> None:
    config = parse(["--gradient-checkpointing", "false", "--lora-dropout", "0"])
    assert config.training.gradient_checkpointing is False
    assert config.lora.dropout == 0.0
    defaults = SFTConfig()
    assert config.lora == dataclasses.replace(defaults.lora, dropout=0.0)
    assert (config.model, config.data, config.training, config.eval) == (
        defaults.model, defaults.data, defaults.training, defaults.eval)


def test_help_lists_flags_with_their_docs() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "--max-steps" in text and "--lora-target-modules A,B,..." in text
    assert "Optimizer steps to run; -1 means use num_train_epochs. (default: -1)" in text


def test_unknown_key_suggests_the_close_name(tmp_path: Path) -> None:
    message = config_error(tmp_path, "training:\n  learning_rat: 1.0e-4\n")
    assert "unknown key training.learning_rat" in message
    assert "did you mean 'learning_rate'?" in message


def test_key_in_the_wrong_section_names_its_section(tmp_path: Path) -> None:
    message = config_error(tmp_path, "training:\n  lora_r: 8\n")
    assert "unknown key training.lora_r" in message
    assert "it belongs in section 'lora'" in message


def test_unknown_section(tmp_path: Path) -> None:
    message = config_error(tmp_path, "trainig:\n  max_steps: 2\n")
    assert "unknown section 'trainig'" in message
    assert "did you mean 'training'?" in message


def test_unknown_override_suggests_the_close_name() -> None:
    with pytest.raises(ConfigError, match=r"unknown option 'max_step' \(did you mean 'max_steps'\?\)"):
        build_config(None, {"max_step": 2})


@pytest.mark.parametrize("text, expected", [
    ("lora:\n  lora_r: abc\n", "lora.r: expected an integer, got 'abc'"),
    ("lora:\n  lora_r: 8.5\n", "lora.r: expected an integer, got 8.5"),
    ("lora:\n  lora_r: true\n", "lora.r: expected an integer, got True"),
    ("training:\n  gradient_checkpointing: maybe\n",
     "training.gradient_checkpointing: expected true or false, got 'maybe'"),
    ("training:\n  learning_rate: fast\n", "training.learning_rate: expected a number, got 'fast'"),
    ("model:\n  model: 5\n", "model.model: expected a string, got 5"),
    ("lora:\n  lora_target_modules: 5\n", "lora.target_modules: expected a list, got 5"),
])
def test_wrong_types_name_the_field(tmp_path: Path, text: str, expected: str) -> None:
    assert config_error(tmp_path, text) == expected


@pytest.mark.parametrize("text, field", [
    ("training:\n  learning_rate: 0\n", "training.learning_rate"),
    ("training:\n  learning_rate: -1.0e-4\n", "training.learning_rate"),
    ("lora:\n  lora_r: 0\n", "lora.r"),
    ("lora:\n  lora_r: -4\n", "lora.r"),
    ("lora:\n  lora_dropout: 1.0\n", "lora.dropout"),
    ("lora:\n  lora_target_modules: []\n", "lora.target_modules"),
    ("data:\n  max_seq_length: 4\n", "data.max_seq_length"),
    ("training:\n  warmup_ratio: 1.0\n", "training.warmup_ratio"),
    ("training:\n  batch_size: 0\n", "training.batch_size"),
    ("training:\n  lr_scheduler_type: exponential\n", "training.lr_scheduler_type"),
    ("model:\n  dtype: int8\n", "model.dtype"),
    ("model:\n  attn_implementation: flash\n", "model.attn_implementation"),
    ("training:\n  device: tpu\n", "training.device"),
    ("eval:\n  max_new_tokens: 0\n", "eval.max_new_tokens"),
])
def test_impossible_values_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    assert config_error(tmp_path, text).startswith(f"{field}: ")


def test_int_for_a_float_field_is_accepted(tmp_path: Path) -> None:
    config = build_config(write_yaml(tmp_path, "training:\n  learning_rate: 1\n  warmup_ratio: 0\n"))
    assert config.training.learning_rate == 1.0 and isinstance(config.training.learning_rate, float)
    assert config.training.warmup_ratio == 0.0 and isinstance(config.training.warmup_ratio, float)


def test_system_prompt_null_stays_none(tmp_path: Path) -> None:
    config = build_config(write_yaml(tmp_path, "data:\n  system_prompt: null\n"))
    assert config.data.system_prompt is None


@pytest.mark.parametrize("text, fragment", [
    ("- model\n- lora\n", "expected sections model, lora, data, training, eval"),
    ("lora: [1, 2]\n", "section 'lora' must be a mapping"),
    ("lora: {lora_r: 8\n", "not valid YAML"),
])
def test_malformed_files(tmp_path: Path, text: str, fragment: str) -> None:
    assert fragment in config_error(tmp_path, text)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(tmp_path / "missing.yaml")


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert build_config(write_yaml(tmp_path, "")) == SFTConfig()


@pytest.mark.parametrize("preset", [None, PRESET])
def test_save_then_build_round_trips(tmp_path: Path, preset: str | None) -> None:
    config = build_config(write_yaml(tmp_path, preset) if preset else None)
    saved = tmp_path / "saved.yaml"
    config.save(saved)
    assert build_config(saved) == config


def test_configs_directory_has_presets() -> None:
    assert CONFIGS, "configs/*.yaml: expected at least one preset"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_preset_builds(path: Path, tmp_path: Path) -> None:
    config = build_config(path)
    config.save(tmp_path / "saved.yaml")
    assert build_config(tmp_path / "saved.yaml") == config


def test_flags_are_never_abbreviated_and_unknown_flags_get_a_suggestion(capsys: pytest.CaptureFixture) -> None:
    from sft.config import StrictArgumentParser

    parser = StrictArgumentParser(prog="train")
    add_config_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--learning-rat", "3"])
    assert exit_info.value.code == 2
    assert "unrecognized argument '--learning-rat' (did you mean '--learning-rate'?)" in capsys.readouterr().err


def test_a_dpo_run_config_reads_back_as_dpo_and_an_sft_one_as_sft(tmp_path: Path) -> None:
    """A saved configuration is read as the kind of run that wrote it: evaluation and chat of a DPO
    run see its dpo section, an SFT run's has none, and a dpo key in an SFT preset is refused."""
    from sft.config import DPOConfig, SFTConfig

    dpo = build_config(None, {"beta": 0.2, "loss_type": "ipo"}, DPOConfig)
    dpo.save(tmp_path / "dpo.yaml")
    again = build_config(tmp_path / "dpo.yaml")
    assert type(again) is DPOConfig and (again.dpo.beta, again.dpo.loss_type) == (0.2, "ipo")
    build_config(None).save(tmp_path / "sft.yaml")
    assert type(build_config(tmp_path / "sft.yaml")) is SFTConfig
    with pytest.raises(ConfigError, match="unknown option 'beta'"):
        build_config(None, {"beta": 0.2})


def test_lora_fields_read_as_r_alpha_and_as_the_flat_names_of_earlier_presets(tmp_path: Path) -> None:
    """Sections name their fields plainly (lora.r); flags keep the section's prefix (--lora-r),
    and a preset or saved run written with the flat names (lora_r) still reads."""
    new = tmp_path / "new.yaml"
    new.write_text("lora:\n  r: 8\n  alpha: 16\n")
    old = tmp_path / "old.yaml"
    old.write_text("lora:\n  lora_r: 8\n  lora_alpha: 16\n")
    assert (build_config(new).lora.r, build_config(new).lora.alpha) == (8, 16)
    assert build_config(old).to_dict() == build_config(new).to_dict()
    assert build_config(None, {"lora_r": 4}).lora.r == 4
    both = tmp_path / "both.yaml"
    both.write_text("lora:\n  r: 8\n  lora_r: 16\n")
    with pytest.raises(ConfigError, match="lora.r is given twice"):
        build_config(both)
    assert "r: 8" in build_config(new).to_yaml()
