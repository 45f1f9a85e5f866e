"""Interrupted and failing training runs: nothing trained is lost, every failure says what to do."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from sft.config import ConfigError, build_config
from sft.errors import ModelNotFoundError, TrainingInterrupted, run_command
from sft.inference.loading import attach_adapter
from sft.recipes.sft import main, train
from sft.training.checkpoints import STAGING_DIR, latest_complete_checkpoint
from sft.training.interrupt import SAME_INTERRUPT_SECONDS, GracefulInterrupt
from sft.training.trainer import NonFiniteLossError, SupervisedTrainer
from tests.reliability.helpers import ROOT, SignalAtStep
from tests.tiny import build_tiny_model_dir, build_tokenizer, logged, tiny_run_overrides


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir: Path, data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("run") / "out"
    train(build_config(None, tiny_run_overrides(tiny_model_dir, *data, output_dir)))
    return output_dir


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_saves_a_checkpoint_and_resume_continues_exactly(
        tiny_model_dir: Path, data: tuple[Path, Path], uninterrupted: Path, tmp_path: Path, signum: int) -> None:
    config = build_config(None, tiny_run_overrides(tiny_model_dir, *data, tmp_path / "out"))
    with pytest.raises(TrainingInterrupted, match="at step 3.*--resume"):
        train(config, callbacks=[SignalAtStep(3, signum)])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert latest_complete_checkpoint(tmp_path / "out").name == "checkpoint-3"
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()  # not mistaken for a finished run

    train(config, resume="latest")
    resumed, reference = logged(tmp_path / "out"), logged(uninterrupted)
    assert resumed.keys() == reference.keys() == set(range(1, 7))
    assert resumed == pytest.approx(reference, rel=1e-5)
    final = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for name, tensor in load_file(uninterrupted / "adapter_model.safetensors").items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-5, atol=1e-6)


def test_second_interrupt_exits_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    exits = []
    monkeypatch.setattr(os, "_exit", lambda status: exits.append(status))
    monkeypatch.delenv("LOCAL_RANK", raising=False)  # started directly: no launcher passes signals on
    interrupt = GracefulInterrupt()
    interrupt.handle(signal.SIGINT, None)
    assert exits == [] and interrupt.signal_name == "SIGINT"
    interrupt.handle(signal.SIGINT, None)
    assert exits == [130]


def test_under_a_launcher_the_passed_on_ctrl_c_is_the_same_interrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    exits = []
    clock = [100.0]
    monkeypatch.setattr(os, "_exit", lambda status: exits.append(status))
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setenv("LOCAL_RANK", "0")  # as torchrun and accelerate launch set it
    interrupt = GracefulInterrupt()
    interrupt.handle(signal.SIGINT, None)
    assert exits == [] and interrupt.signal_name == "SIGINT"
    clock[0] += 0.5  # torchrun passing the same Ctrl-C on: still one interrupt
    interrupt.handle(signal.SIGTERM, None)
    assert exits == [] and interrupt.signal_name == "SIGINT"
    clock[0] += SAME_INTERRUPT_SECONDS
    interrupt.handle(signal.SIGINT, None)
    assert exits == [130]


def test_interrupted_command_exits_130_with_the_resume_hint(capsys: pytest.CaptureFixture) -> None:
    def interrupted() -> None:
        raise TrainingInterrupted("stopped by SIGINT at step 3; continue with --resume")

    assert run_command(interrupted) == 130
    assert "--resume" in capsys.readouterr().err


def test_checkpoints_are_renamed_into_place_and_half_written_ones_are_never_resumed(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    train(build_config(None, tiny_run_overrides(tiny_model_dir, *data, output_dir, save_steps=2)))
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not list(output_dir.glob(f"{STAGING_DIR}*"))
    # A checkpoint killed while being written by another tool: no trainer_state.json.
    shutil.copytree(output_dir / "checkpoint-6", output_dir / "checkpoint-8")
    (output_dir / "checkpoint-8" / "trainer_state.json").unlink()
    assert latest_complete_checkpoint(output_dir).name == "checkpoint-6"


class PoisonAdapterAfterStep(TrainerCallback):
    """Makes one adapter weight NaN once `step` steps are done (and checkpointed)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    config = build_config(None, tiny_run_overrides(tiny_model_dir, *data, output_dir, save_steps=2))
    with pytest.raises(NonFiniteLossError, match="at step 3.*learning rate"):
        train(config, callbacks=[PoisonAdapterAfterStep(2)])
    good = latest_complete_checkpoint(output_dir)
    assert good.name == "checkpoint-2"
    assert all(torch.isfinite(t).all() for t in load_file(good / "adapter_model.safetensors").values())


def test_out_of_memory_names_the_knobs(tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(SupervisedTrainer, "train", out_of_memory)
    train_file, val_file = data
    assert main(["--model", str(tiny_model_dir), "--train-file", str(train_file), "--val-file", str(val_file),
                 "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--max-seq-length", "64"]) == 2
    err = capsys.readouterr().err
    for knob in ("--batch-size", "--gradient-accumulation-steps", "--max-seq-length", "--gradient-checkpointing"):
        assert knob in err


def test_sequence_length_beyond_the_model_fails_before_loading_it(tiny_model_dir: Path, data: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    config = build_config(None, tiny_run_overrides(tiny_model_dir, *data, tmp_path / "out", max_seq_length=512))
    with pytest.raises(ConfigError, match=r"max_seq_length: 512 exceeds what .* takes \(256 positions\)"):
        train(config)


def test_uncached_hub_model_offline_names_the_bundled_model(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-m", "sft.train_sft", "--model", "no-such-org/no-such-model",
                           "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    assert done.returncode == 2
    assert "smollm2-135m-instruct" in done.stderr and "Traceback" not in done.stderr


def test_adapter_for_another_base_model_is_a_clear_error(uninterrupted: Path, tmp_path: Path) -> None:
    other = build_tiny_model_dir(tmp_path / "other", build_tokenizer("chatml"), hidden_size=48)
    with pytest.raises(ModelNotFoundError, match="does not fit the base model 'other'"):
        attach_adapter(AutoModelForCausalLM.from_pretrained(other), uninterrupted, "other")


def test_only_safetensors_adapters_are_loaded(uninterrupted: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(uninterrupted / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelNotFoundError, match="only intact safetensors adapters are loaded"):
        attach_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), pickled, "tiny")


def test_no_unsafe_loading_in_the_package() -> None:
    """Pickles are never loaded without weights_only=True, and remote code is opt-in."""
    package = ROOT / "sft"
    for source in package.rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        for call in text.split("torch.load(")[1:]:
            assert "weights_only=True" in call.split(")")[0], f"{source}: torch.load without weights_only=True"
        assert "trust_remote_code=True" not in text, source
    assert build_config().model.trust_remote_code is False
