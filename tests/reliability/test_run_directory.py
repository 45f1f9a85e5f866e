"""A run directory is known by its manifest, not by names, and has one writer at a time.

--overwrite-output-dir deletes only what the previous run's manifest lists and is still as it
was written; a file the run would write but did not (a user's vocab.json, loss.png) makes a new
run refuse, naming it; the base model's, the SFT adapter's and the data's folders are never
output directories; a second writer is refused naming the first one's pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sft.errors import ConfigError
from sft.outputs import LOCK_FILE, MANIFEST_FILE, Manifest
from sft.recipes import dpo as dpo_recipe
from sft.recipes.sft import train
from tests.reliability.conftest import copy_run, run_config
from tests.reliability.helpers import ROOT, assert_user_error, run_python
from tests.tiny import as_flags, tiny_run_overrides
from tests.training.tiny_pairs import write_preference_split


def files_under(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_overwrite_keeps_the_users_eval_and_runs_folders_even_through_a_symlink(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    (project / "eval").mkdir(parents=True)
    (project / "eval" / "my_eval.py").write_text("x\n", encoding="utf-8")
    (project / "runs" / "exp_old").mkdir(parents=True)
    (project / "runs" / "exp_old" / "results.txt").write_text("x\n", encoding="utf-8")
    users = files_under(project)
    monkeypatch.chdir(project)
    train(run_config(tiny_model_dir, data, Path("."), max_steps=2))
    assert (project / MANIFEST_FILE).is_file()
    (tmp_path / "link").symlink_to(project)
    train(run_config(tiny_model_dir, data, tmp_path / "link", max_steps=2), overwrite_output_dir=True)
    after = files_under(project)
    assert {name: after.get(name) for name in users} == users
    assert json.loads((project / "trainer_state.json").read_text(encoding="utf-8"))["global_step"] == 2


@pytest.mark.parametrize("names", [["vocab.json"], ["loss.png", "data_report.json", "tokenizer.json"]])
def test_a_new_run_refuses_to_overwrite_files_it_did_not_write(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path, names: list[str]) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in names:
        (folder / name).write_text("mine\n", encoding="utf-8")
    before = files_under(folder)
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="which this run would overwrite") as refused:
            train(run_config(tiny_model_dir, data, folder, max_steps=2), overwrite_output_dir=overwrite)
        assert all(name in str(refused.value) for name in names)
        assert files_under(folder) == before


def test_overwrite_keeps_a_run_file_the_user_changed_and_refuses(
        reference_run: Path, tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    run = copy_run(reference_run, tmp_path / "run")
    (run / "sft_config.yaml").write_text("# my notes on this run\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"holds sft_config.yaml, which this run would overwrite"):
        train(run_config(tiny_model_dir, data, run, max_steps=2), overwrite_output_dir=True)
    assert (run / "sft_config.yaml").read_text(encoding="utf-8") == "# my notes on this run\n"
    assert not (run / "adapter_model.safetensors").exists()  # the previous run's own files are gone


def test_training_into_the_base_models_folder_is_refused(tiny_model_dir: Path, data: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    model = shutil.copytree(tiny_model_dir, tmp_path / "mdl")
    before = files_under(model)
    for flags in ([], ["--overwrite-output-dir"]):
        done = run_python("-m", "sft.cli", "train",
                          *as_flags(tiny_run_overrides(model, *data, model, max_steps=1)), *flags)
        assert_user_error(done.returncode, done.stderr, str(model), "base model")
    assert files_under(model) == before


def test_training_into_the_data_folder_is_refused(tiny_model_dir: Path, data: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match="the folder of --train-file"):
        train(run_config(tiny_model_dir, data, data[0].parent, max_steps=1))
    assert not (data[0].parent / LOCK_FILE).exists() and not (data[0].parent / MANIFEST_FILE).exists()


def test_dpo_into_its_own_sft_adapter_is_refused_before_anything_is_deleted(
        reference_run: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    adapter = copy_run(reference_run, tmp_path / "sft")
    before = files_under(adapter)
    pairs = write_preference_split(tmp_path / "pairs", n_train=8, n_val=2)
    flags = as_flags(tiny_run_overrides(tiny_model_dir, *pairs, adapter, max_steps=1, sft_adapter=adapter))
    assert_user_error(dpo_recipe.main([*flags, "--overwrite-output-dir"]), capsys.readouterr().err,
                      str(adapter), "--sft-adapter")
    assert files_under(adapter) == before


def test_a_symlinked_checkpoint_is_neither_rotated_nor_a_reason_to_stop(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    settings = {"save_steps": 1, "save_total_limit": 2}
    train(run_config(tiny_model_dir, data, run, max_steps=2, **settings))
    moved = shutil.move(run / "checkpoint-1", tmp_path / "elsewhere")
    (run / "checkpoint-1").symlink_to(moved, target_is_directory=True)
    kept = files_under(Path(moved))
    train(run_config(tiny_model_dir, data, run, max_steps=4, **settings), resume="latest")
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]
    assert (run / "checkpoint-1").is_symlink() and files_under(Path(moved)) == kept


def test_a_run_of_an_older_sft_is_resumed_but_not_deleted_by_name(
        reference_run: Path, tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    """Without a manifest nothing tells the run's files from the user's: --overwrite-output-dir
    refuses with advice; --resume adopts the run's files by their names (the user vouched for it)."""
    run = copy_run(reference_run, tmp_path / "old")
    (run / MANIFEST_FILE).unlink()
    before = files_under(run)
    with pytest.raises(ConfigError, match="older sft kept no manifest"):
        train(run_config(tiny_model_dir, data, run), overwrite_output_dir=True)
    assert files_under(run) == before
    train(run_config(tiny_model_dir, data, run, max_steps=8), resume="latest")
    manifest = Manifest.load(run)
    assert {"checkpoint-6", "checkpoint-8", "adapter_model.safetensors"} <= set(manifest.entries)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_second_writer_is_refused_naming_the_first_and_the_lock_dies_with_it(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    """Two real processes: a long run holds the lock; a second run (new, overwriting, resuming)
    into the same folder is refused in one line with its pid; after the first is killed with -9
    the folder can be written again."""
    run = tmp_path / "run"
    flags = as_flags(tiny_run_overrides(tiny_model_dir, *data, run, max_steps=100000, save_steps=1,
                                        save_total_limit=1))
    first = subprocess.Popen([sys.executable, "-m", "sft.cli", "train", *flags], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        wait_for(lambda: list(run.glob("checkpoint-*")), first)
        for extra in (["--overwrite-output-dir"], ["--resume"]):
            done = run_python("-m", "sft.cli", "train", *flags, *extra)
            assert_user_error(done.returncode, done.stderr, str(run), f"pid {first.pid}")
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    train(run_config(tiny_model_dir, data, run, max_steps=2), overwrite_output_dir=True)
    assert json.loads((run / "trainer_state.json").read_text(encoding="utf-8"))["global_step"] == 2


def test_a_killed_writers_staging_folder_is_removed_by_the_next(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(run_config(tiny_model_dir, data, run, max_steps=1, save_steps=1))
    stale = run / ".checkpoint-staging-99999999-deadbeef" / "checkpoint-2"
    stale.mkdir(parents=True)
    train(run_config(tiny_model_dir, data, run, max_steps=2, save_steps=1), resume="latest")
    assert not list(run.glob(".checkpoint-staging*"))


@pytest.mark.parametrize("command", ["eval", "merge"])
def test_an_evaluation_or_merge_of_a_locked_run_is_refused(reference_run: Path, tmp_path: Path, command: str) -> None:
    """A process holds a finished run's lock (as a writer would): `sft eval` into it, or `sft merge`
    of it, is refused naming that process, before anything is written."""
    run = copy_run(reference_run, tmp_path / "run")
    flags = ["--device", "cpu"] if command == "eval" else ["--out", str(tmp_path / "merged")]
    hold = ("import sys, time; from sft.outputs import writer_lock\n"
            "with writer_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "held"
        before = files_under(run)
        done = run_python("-m", "sft.cli", command, "--adapter", str(run), *flags)
        assert_user_error(done.returncode, done.stderr, str(run), f"pid {holder.pid}")
        assert files_under(run) == before and not (tmp_path / "merged").exists()
    finally:
        holder.kill()
        holder.wait()


def test_an_edited_manifest_never_reaches_outside_the_folder(
        reference_run: Path, tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    run = copy_run(reference_run, tmp_path / "run")
    outside = tmp_path / "precious.txt"
    outside.write_text("precious\n", encoding="utf-8")
    manifest = json.loads((run / MANIFEST_FILE).read_text(encoding="utf-8"))
    manifest["entries"]["../precious.txt"] = None
    (run / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ConfigError, match="not an sft manifest"):
        train(run_config(tiny_model_dir, data, run, max_steps=2), overwrite_output_dir=True)
    assert outside.read_text(encoding="utf-8") == "precious\n"
    # A checkpoint's subfolder swapped for a symlink out of the run: nothing through it is deleted.
    manifest["entries"].pop("../precious.txt")
    manifest["entries"]["checkpoint-6"]["files"]["linked/precious.txt"] = {"size": 9, "sha256": "x"}
    (run / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    (run / "checkpoint-6" / "linked").symlink_to(tmp_path)
    Manifest.load(run).delete("checkpoint-6", changed_too=True)
    assert outside.read_text(encoding="utf-8") == "precious\n"
