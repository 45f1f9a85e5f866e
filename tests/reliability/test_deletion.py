"""Only the files this tool wrote for a run are ever deleted: by --overwrite-output-dir, and by
checkpoint rotation. Whatever else sits in the folder (the user's data, notes, copies of
checkpoints, other runs, merged models) stays as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sft.recipes.sft import train
from tests.reliability.conftest import copy_run, run_config


def snapshot(root: Path, names: list[str]) -> dict[str, bytes]:
    """The bytes of every file under each of ``names`` in ``root``."""
    files = {}
    for name in names:
        path = root / name
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            files[str(file.relative_to(root))] = file.read_bytes()
    return files


def test_overwriting_a_run_in_the_current_directory_keeps_everything_else(
        reference_run: Path, tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--output-dir . --overwrite-output-dir` in a folder holding a previous run and the user's own
    files: the previous run's files are replaced, the user's (its training data among them) kept."""
    work = copy_run(reference_run, tmp_path / "project")
    (work / "data").mkdir()
    for file in data:
        shutil.copy(file, work / "data")
    (work / "notes.txt").write_text("my notes\n", encoding="utf-8")
    (work / "README.md").write_text("# My project\n", encoding="utf-8")  # not PEFT's model card
    shutil.copytree(reference_run / "checkpoint-2", work / "checkpoint-2-good")
    copy_run(reference_run, work / "models" / "other_run")
    (work / "models" / "merged").mkdir()
    (work / "models" / "merged" / "model.safetensors").write_bytes(b"weights")
    user_files = ["data", "notes.txt", "README.md", "checkpoint-2-good", "models"]
    before = snapshot(work, user_files)

    monkeypatch.chdir(work)
    train(run_config(tiny_model_dir, (Path("data/sft_train.jsonl"), Path("data/sft_val.jsonl")), Path("."),
                     max_steps=2), overwrite_output_dir=True)

    assert snapshot(work, user_files) == before
    assert json.loads((work / "trainer_state.json").read_text(encoding="utf-8"))["global_step"] == 2
    assert sorted(path.name for path in work.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-2-good"]


def test_checkpoint_rotation_deletes_only_checkpoint_folders(tiny_model_dir: Path, data: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    """A user's copy named like a checkpoint (checkpoint-1-good) is not one: rotation keeps it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-1-good").mkdir()
    (run / "checkpoint-1-good" / "adapter_model.safetensors").write_bytes(b"the one that worked")
    (run / "checkpoint-x").mkdir()
    train(run_config(tiny_model_dir, data, run, max_steps=4, save_steps=1, save_total_limit=2))
    assert sorted(path.name for path in run.glob("checkpoint-*")) == [
        "checkpoint-1-good", "checkpoint-3", "checkpoint-4", "checkpoint-x"]
    assert (run / "checkpoint-1-good" / "adapter_model.safetensors").read_bytes() == b"the one that worked"
