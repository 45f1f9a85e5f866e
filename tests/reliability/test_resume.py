"""--resume continues only what can be continued: a changed setting that the saved state cannot
follow is refused naming the field (and the run's saved configuration is left as it was); a
damaged newest checkpoint is named and skipped for the newest intact one, giving the adapter an
uninterrupted run gives; checkpoints are synced to disk before they are renamed into place."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sft.config import ConfigError
from sft.recipes.sft import main, train
from tests.reliability.conftest import copy_run, run_config
from tests.reliability.helpers import DAMAGES, assert_same_adapter, assert_user_error, cut_adapter, cut_optimizer
from tests.tiny import as_flags, tiny_run_overrides, write_prepared_split


def resume_flags(tiny_model_dir: Path, data: tuple[Path, Path], run: Path, **changes: object) -> list[str]:
    overrides = {**tiny_run_overrides(tiny_model_dir, *data, run, save_steps=2), **changes}
    return [*as_flags(overrides), "--resume"]


@pytest.mark.parametrize("flag, value, field", [
    ("lora_r", 8, "lora.r"),
    ("lora_target_modules", "q_proj,v_proj", "lora.target_modules"),
    ("max_seq_length", 48, "data.max_seq_length"),
    ("train_file", "OTHER_DATA", "data.train_file"),
    ("model", "OTHER_MODEL", "model.model"),
])
def test_resume_with_a_setting_it_cannot_continue_names_the_field_and_keeps_the_saved_config(
        interrupted_run: Path, tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, flag: str, value: object,
        field: str) -> None:
    import sft.training.stages

    run = copy_run(interrupted_run, tmp_path / "run")
    saved = (run / "sft_config.yaml").read_bytes()
    if value == "OTHER_DATA":
        value = write_prepared_split(tmp_path / "other", n_train=16)[0]
    if value == "OTHER_MODEL":
        value = tmp_path / "other-model"
        value.mkdir()
    monkeypatch.setattr(sft.training.stages, "load_model", lambda *args, **kwargs: pytest.fail("model loaded"))
    status = main(resume_flags(tiny_model_dir, data, run, **{flag: value}))
    assert_user_error(status, capsys.readouterr().err, f"--resume: {field} is", "--output-dir")
    assert (run / "sft_config.yaml").read_bytes() == saved


def test_resume_may_run_longer_and_log_and_save_at_another_cadence(interrupted_run: Path, tiny_model_dir: Path,
                                                                   data: tuple[Path, Path], tmp_path: Path) -> None:
    run = copy_run(interrupted_run, tmp_path / "run")
    result = train(run_config(tiny_model_dir, data, run, max_steps=8, logging_steps=2, save_steps=4,
                              eval_steps=3), resume="latest")
    assert result.trainer.state.global_step == 8
    assert "max_steps: 8" in (run / "sft_config.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumed(
        interrupted_run: Path, reference_run: Path, tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture, damage: str) -> None:
    run = copy_run(interrupted_run, tmp_path / "run")
    damaged_file = DAMAGES[damage](run / "checkpoint-4")
    train(run_config(tiny_model_dir, data, run), resume="latest")
    out = capsys.readouterr().out
    assert f"warning: skipping the damaged checkpoint-4: {damaged_file}" in out
    assert_same_adapter(run, reference_run)


def test_a_damaged_checkpoint_given_by_name_is_refused_naming_the_file(interrupted_run: Path, tiny_model_dir: Path,
                                                                       data: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    run = copy_run(interrupted_run, tmp_path / "run")
    damaged_file = cut_optimizer(run / "checkpoint-4")
    with pytest.raises(ConfigError, match=rf"{run / 'checkpoint-4'} is damaged: {damaged_file}.*--resume alone"):
        train(run_config(tiny_model_dir, data, run), resume=str(run / "checkpoint-4"))


def test_when_every_checkpoint_is_damaged_resume_stops_with_advice(interrupted_run: Path, tiny_model_dir: Path,
                                                                   data: tuple[Path, Path], tmp_path: Path) -> None:
    run = copy_run(interrupted_run, tmp_path / "run")
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        cut_adapter(run / checkpoint)
    with pytest.raises(ConfigError, match="every checkpoint .* is damaged .*--overwrite-output-dir"):
        train(run_config(tiny_model_dir, data, run), resume="latest")


def test_checkpoint_files_and_folders_are_synced_before_the_rename(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rename makes a checkpoint visible to --resume; a power cut after it must not leave
    files whose data never reached the disk. So every file of the checkpoint and its folder are
    fsynced before the rename, and the run folder after it."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source: str | Path, target: str | Path, **kwargs: object) -> None:
        events.append(("rename", str(target)))
        real_replace(source, target, **kwargs)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell which file a descriptor is")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run = tmp_path / "run"
    train(run_config(tiny_model_dir, data, run, max_steps=2))
    checkpoint = str(run / "checkpoint-2")
    renamed = events.index(("rename", checkpoint))
    synced = {path for kind, path in events[:renamed] if kind == "fsync"}
    staged = next(Path(path) for path in synced  # the run's own staging folder, .checkpoint-staging-PID-RANDOM
                  if Path(path).name == "checkpoint-2" and Path(path).parent.name.startswith(".checkpoint-staging-"))
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"):
        assert str(staged / name) in synced
    assert str(staged) in synced
    assert ("fsync", str(run)) in events[renamed:]


@pytest.mark.parametrize("step", ["abc", 2.5, -1, True, None])
def test_a_trainer_state_with_a_step_that_is_not_a_step_number_is_a_damaged_checkpoint(
        interrupted_run: Path, tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture, step: object) -> None:
    run = copy_run(interrupted_run, tmp_path / "run")
    state_file = run / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text(encoding="utf-8"))
    state_file.write_text(json.dumps({**state, "global_step": step}), encoding="utf-8")
    status = main([*resume_flags(tiny_model_dir, data, run)[:-1], "--resume", str(run / "checkpoint-4")])
    assert_user_error(status, capsys.readouterr().err, f"{state_file}: global_step is {step!r}")
