"""Every mistake a user can make ends in one ``error:`` line naming the flag, field or file and
what to do, with exit status 2; configuration mistakes are found before any model loads. Only a
bug of ours prints a traceback."""

from __future__ import annotations

import ast
import importlib
import inspect
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

import sft.training.stages
from sft.cli import COMMANDS
from sft.config import ConfigError, build_config
from sft.export.gguf import main as export_main
from sft.inference.chat import main as chat_main
from sft.inference.evaluate import main as evaluate_main
from sft.recipes.sft import main as train_main
from sft.training.plots import main as plot_main
from sft.training.stages import setup_runtime
from tests.reliability.helpers import ROOT, assert_user_error, read_only, run_python, truncate
from tests.tiny import as_flags, tiny_run_overrides

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if training gets as far as loading the model."""
    monkeypatch.setattr(sft.training.stages, "load_model", lambda *args, **kwargs: pytest.fail("the model loaded"))


def train_flags(tiny_model_dir: Path, data: tuple[Path, Path], output_dir: Path, **changes: object) -> list[str]:
    return as_flags({**tiny_run_overrides(tiny_model_dir, *data, output_dir, max_steps=1), **changes})


def model_copy(tiny_model_dir: Path, destination: Path, without: tuple[str, ...] = ()) -> Path:
    shutil.copytree(tiny_model_dir, destination, ignore=shutil.ignore_patterns(*without))
    return destination


@pytest.mark.parametrize("changes, fragments", [
    pytest.param({"seed": -1}, ["seed: must be between 0 and"], id="seed -1"),
    pytest.param({"num_train_epochs": "inf", "max_steps": -1}, ["num_train_epochs: expected a finite number"],
                 id="inf epochs"),
    pytest.param({"learning_rate": "nan"}, ["learning_rate: expected a finite number"], id="nan learning rate"),
    pytest.param({"device": "cuda"}, ["device: cuda", "--device"], id="cuda without a GPU", marks=NO_CUDA),
    pytest.param({"device": "mps"}, ["device: mps", "--device"], id="mps without MPS", marks=NO_MPS),
    pytest.param({"dtype": "float16"}, ["dtype: float16", "--dtype"], id="float16 on cpu"),
    pytest.param({"attn_implementation": "flash_attention_2"}, ["attn_implementation: flash_attention_2"],
                 id="flash attention on cpu"),
])
def test_settings_this_machine_cannot_run_are_refused_before_the_model_loads(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
        no_model_loads: None, changes: dict, fragments: list[str]) -> None:
    status = train_main(train_flags(tiny_model_dir, data, tmp_path / "out", **changes))
    assert_user_error(status, capsys.readouterr().err, *fragments)


def test_a_cuda_preset_on_a_machine_without_a_gpu_is_one_line() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    done = run_python("-m", "sft.train_sft", "--config", "configs/tinyllama-cuda.yaml")
    assert_user_error(done.returncode, done.stderr, "device: cuda")


@NO_CUDA
@pytest.mark.parametrize("command", ["eval", "chat"])
def test_evaluation_and_chat_on_a_missing_device_are_one_line(reference_run: Path, command: str,
                                                              capsys: pytest.CaptureFixture) -> None:
    if command == "eval":
        status = evaluate_main(["--output-dir", str(reference_run), "--device", "cuda"])
    else:
        status = chat_main(["--adapter", str(reference_run), "--device", "cuda", "--prompt", "Hi"])
    assert_user_error(status, capsys.readouterr().err, "device: cuda")


def test_an_unknown_device_is_a_configuration_error() -> None:
    from sft.modeling.devices import device_policy

    with pytest.raises(ConfigError, match="device: expected auto, cpu, mps, cuda or cuda:N, got 'foo'"):
        device_policy("foo")


@pytest.mark.parametrize("text, fragments", [
    pytest.param("data:\n  system_prompt: Caf\xe9\n".encode("latin-1"), ["line 2: byte 0xe9 is not UTF-8", "UTF-8"],
                 id="latin-1"),
    pytest.param(b"lora:\n  lora_r: 8\n  lora_alpha: 16\n  lora_r: 32\n",
                 ["line 4", "'lora_r' is given twice (first on line 2); keep one"], id="duplicate key"),
    pytest.param(b"lora:\n  lora_r: 8\nlora:\n  lora_alpha: 16\n", ["'lora' is given twice"], id="duplicate section"),
])
def test_a_config_file_that_cannot_be_read_as_meant_names_the_file_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture, text: bytes, fragments: list[str]) -> None:
    config = tmp_path / "preset.yaml"
    config.write_bytes(text)
    assert_user_error(train_main(["--config", str(config)]), capsys.readouterr().err, str(config), *fragments)


def test_an_output_dir_that_is_a_file_is_refused(tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture, no_model_loads: None) -> None:
    (tmp_path / "out").write_text("not a folder", encoding="utf-8")
    status = train_main(train_flags(tiny_model_dir, data, tmp_path / "out"))
    assert_user_error(status, capsys.readouterr().err, f"output_dir: {tmp_path / 'out'} is a file", "--output-dir")


def test_a_read_only_output_dir_is_refused_before_the_model_loads(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
        no_model_loads: None) -> None:
    (tmp_path / "locked").mkdir()
    with read_only(tmp_path / "locked"):
        status = train_main(train_flags(tiny_model_dir, data, tmp_path / "locked" / "out"))
    assert_user_error(status, capsys.readouterr().err, f"output_dir: cannot write to {tmp_path / 'locked' / 'out'}",
                      "--output-dir")


def test_a_model_folder_without_a_tokenizer_is_named(tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture, no_model_loads: None) -> None:
    model = model_copy(tiny_model_dir, tmp_path / "model", without=("tokenizer*", "chat_template.jinja"))
    status = train_main(train_flags(tiny_model_dir, data, tmp_path / "out", model=model))
    assert_user_error(status, capsys.readouterr().err, f"{model}: no tokenizer", "copy the tokenizer files")


def test_truncated_model_weights_are_named_before_loading(tiny_model_dir: Path, data: tuple[Path, Path],
                                                          tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          no_model_loads: None) -> None:
    model = model_copy(tiny_model_dir, tmp_path / "model")
    truncate(model / "model.safetensors")
    status = train_main(train_flags(tiny_model_dir, data, tmp_path / "out", model=model))
    assert_user_error(status, capsys.readouterr().err, f"{model / 'model.safetensors'}: truncated", "again")


def test_pickled_model_weights_are_refused_as_the_readme_says(tiny_model_dir: Path, data: tuple[Path, Path],
                                                              tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              no_model_loads: None) -> None:
    model = model_copy(tiny_model_dir, tmp_path / "model", without=("model.safetensors",))
    (model / "pytorch_model.bin").write_bytes(b"a pickle, never loaded")
    status = train_main(train_flags(tiny_model_dir, data, tmp_path / "out", model=model))
    assert_user_error(status, capsys.readouterr().err, f"{model}: only pytorch_model.bin", "safetensors files only")


@pytest.mark.parametrize("changes, fragments", [
    pytest.param({"lora_target_modules": "q_pro"}, ["no linear layer 'q_pro'", "did you mean 'q_proj'?"], id="typo"),
    pytest.param({"lora_target_modules": "q_proj,foo_proj"},
                 ["no linear layer 'foo_proj'", "its linear layers are down_proj, gate_proj"], id="one of two unknown"),
    pytest.param({"lora_r": 100000000000}, ["lora_r: 100000000000 exceeds 16", "the linear layers", "--lora-r"], id="huge rank"),
])
def test_lora_settings_the_model_cannot_take_name_the_field_before_adapters_are_added(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
        changes: dict, fragments: list[str]) -> None:
    status = train_main(train_flags(tiny_model_dir, data, tmp_path / "out", **changes))
    assert_user_error(status, capsys.readouterr().err, "lora_", *fragments)


def test_validating_on_the_training_file_is_warned_about(tiny_model_dir: Path, data: tuple[Path, Path],
                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train_file = data[0]
    setup_runtime(build_config(None, tiny_run_overrides(tiny_model_dir, train_file, train_file, tmp_path / "out")))
    assert f"warning: the validation file is the training file ({train_file})" in capsys.readouterr().out


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_with_advice(tiny_model_dir: Path,
                                                                       data: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    """A checkpoint's optimizer state (about 150 kB here) cannot be written beyond 100 kB: torch
    reports that as a RuntimeError, which must not read as a bug."""
    out = tmp_path / "out"
    done = run_python("-m", "sft.train_sft", *train_flags(tiny_model_dir, data, out, max_steps=4, save_steps=2),
                      file_size_limit=100_000)
    assert_user_error(done.returncode, done.stderr, f"could not write to {out}", "--save-total-limit", "--resume")
    assert not (out / "checkpoint-2").exists()


@pytest.mark.parametrize("target, fragments", [
    pytest.param("missing/model.gguf", ["cannot write into", "missing", "No such file or directory"], id="missing"),
    pytest.param("locked/model.gguf", ["cannot write into", "locked"], id="read-only"),
])
def test_export_into_a_folder_it_cannot_write_is_refused(tiny_model_dir: Path, tmp_path: Path, target: str,
                                                         fragments: list[str], capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "locked").mkdir()
    with read_only(tmp_path / "locked"):
        status = export_main(["--model", str(tiny_model_dir), "--gguf", str(tmp_path / target)])
    assert_user_error(status, capsys.readouterr().err, "--gguf", *fragments)


@pytest.mark.parametrize("model, fragments", [
    pytest.param("missing", ["--model", "no such directory", "sft merge"], id="missing"),
    pytest.param("no-config", ["without config.json"], id="no config"),
    pytest.param("truncated", ["model.safetensors: truncated"], id="truncated weights"),
])
def test_export_from_a_bad_model_names_it(tiny_model_dir: Path, tmp_path: Path, model: str, fragments: list[str],
                                          capsys: pytest.CaptureFixture) -> None:
    if model == "no-config":
        model_copy(tiny_model_dir, tmp_path / model, without=("config.json",))
    elif model == "truncated":
        truncate(model_copy(tiny_model_dir, tmp_path / model) / "model.safetensors")
    status = export_main(["--model", str(tmp_path / model), "--gguf", str(tmp_path / "model.gguf")])
    assert_user_error(status, capsys.readouterr().err, str(tmp_path / model), *fragments)
    assert not (tmp_path / "model.gguf").exists()


@pytest.mark.parametrize("state, fragments", [
    pytest.param(None, ["no trainer_state.json and no complete checkpoint-N/"], id="checkpoint-abc"),
    pytest.param(b"[1, 2]", ["not a trainer state"], id="list-shaped"),
    pytest.param('{"log_history": []}'.encode("utf-16"), ["not UTF-8"], id="utf-16"),
    pytest.param(b'{"log_history": [{"loss": 1.0', ["invalid JSON at line 1"], id="truncated"),
])
def test_plot_of_something_that_is_not_a_run_names_it(tmp_path: Path, state: bytes | None, fragments: list[str],
                                                      capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "checkpoint-abc"
    run.mkdir()
    if state is not None:
        (run / "trainer_state.json").write_bytes(state)
    assert_user_error(plot_main([str(run)]), capsys.readouterr().err, str(run), *fragments)


def test_plot_to_a_file_that_is_not_an_image_names_the_flag(reference_run: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    status = plot_main([str(reference_run), "--out", str(tmp_path / "x.txt")])
    assert_user_error(status, capsys.readouterr().err, f"--out {tmp_path / 'x.txt'}", ".png")
    assert not (tmp_path / "x.txt").exists()


def _hands_over_to_the_boundary(function: object) -> bool:
    """Whether a command's main calls run_command, or the main of a command that does."""
    source = textwrap.dedent(inspect.getsource(function))
    if "run_command(" in source:
        return True
    called = {node.func.id for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    return any(name.endswith("main") and _hands_over_to_the_boundary(function.__globals__[name])
               for name in called if name in function.__globals__)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_runs_under_the_one_error_boundary(command: str) -> None:
    assert _hands_over_to_the_boundary(importlib.import_module(COMMANDS[command][0]).main)


def test_the_original_entry_points_are_the_commands() -> None:
    for script in ("sft/train_sft.py", "sft/sft_test.py", "scripts/prepare_sft_data.py"):
        text = (ROOT / script).read_text(encoding="utf-8")
        assert "import main" in text and "raise SystemExit(main())" in text, script

