"""--resume checks the whole identity of the run a checkpoint belongs to, whichever run that is:
method, model, LoRA shape, data (by content too), batch and schedule; a refusal names the field
and writes nothing. A resumed run may lower the learning rate (the non-finite-loss advice says
so, and following it works). After a rewind, the abandoned branch's newer checkpoints are not
picked."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from sft.errors import NonFiniteLossError
from sft.recipes.sft import main, train
from sft.training.checkpoints import IDENTITY_FILE, latest_complete_checkpoint
from sft.training.stages import resume_checkpoint
from tests.reliability.conftest import copy_run, run_config
from tests.reliability.helpers import assert_user_error, cut_adapter
from tests.reliability.test_interrupts import PoisonAdapterAfterStep
from tests.tiny import as_flags, logged, tiny_run_overrides, write_prepared_split


def flags(tiny_model_dir: Path, data: tuple[Path, Path], run: Path, resume: str | Path = "latest",
          **changes: object) -> list[str]:
    overrides = {**tiny_run_overrides(tiny_model_dir, *data, run, save_steps=2), **changes}
    return [*as_flags(overrides), "--resume", *([] if resume == "latest" else [str(resume)])]


@pytest.mark.parametrize("flag, value, field", [
    ("batch_size", 2, "training.batch_size"),
    ("gradient_accumulation_steps", 2, "training.gradient_accumulation_steps"),
    ("lr_scheduler_type", "linear", "training.lr_scheduler_type"),
    ("lora_alpha", 8, "lora.alpha"),
    ("lora_r", 8, "lora.r"),
])
def test_resume_of_another_runs_checkpoint_into_a_new_folder_is_checked_and_writes_nothing(
        interrupted_run: Path, tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture, flag: str, value: object, field: str) -> None:
    new = tmp_path / "new"
    status = main(flags(tiny_model_dir, data, new, interrupted_run / "checkpoint-4", **{flag: value}))
    assert_user_error(status, capsys.readouterr().err, f"--resume: {field} is {value!r}",
                      str(interrupted_run / "checkpoint-4"))
    assert not new.exists() or list(new.iterdir()) == []


def test_resume_of_another_runs_checkpoint_with_the_same_identity_continues(
        interrupted_run: Path, tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    new = tmp_path / "new"
    assert main(flags(tiny_model_dir, data, new, interrupted_run / "checkpoint-4")) == 0
    assert json.loads((new / "trainer_state.json").read_text())["global_step"] == 6


def test_data_edited_in_place_is_refused_before_anything_is_written(
        interrupted_run: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_prepared_split(tmp_path / "data")
    run = tmp_path / "run"
    assert main(flags(tiny_model_dir, data, run, max_steps=2)[:-1]) == 0  # a new run on its own data
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    records = data[0].read_text(encoding="utf-8").splitlines()[:4]
    data[0].write_text("\n".join(line.replace('"content": "', '"content": "Edited ') for line in records) + "\n",
                       encoding="utf-8")
    status = main(flags(tiny_model_dir, data, run, max_steps=3))
    assert_user_error(status, capsys.readouterr().err, f"data.train_file {data[0]} is not the file",
                      "content changed")
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before


def test_a_checkpoint_of_an_earlier_version_without_its_run_config_is_checked_against_its_adapter(
        interrupted_run: Path, tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    """No run_identity.json (an earlier version) and no sft_config.yaml: another --lora-r was a
    size-mismatch traceback after the run's files were rewritten."""
    run = copy_run(interrupted_run, tmp_path / "run")
    for checkpoint in run.glob("checkpoint-*"):
        (checkpoint / IDENTITY_FILE).unlink()
    (run / "sft_config.yaml").unlink()
    status = main(flags(tiny_model_dir, data, run, lora_r=8))
    assert_user_error(status, capsys.readouterr().err, "--resume: lora.r is 8", "with 16")
    assert not (run / "sft_config.yaml").exists()


def test_after_a_rewind_resume_takes_the_checkpoint_written_last_not_the_highest_step(
        interrupted_run: Path, tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    run = copy_run(interrupted_run, tmp_path / "run")  # checkpoints 2 and 4
    stale = logged(run / "checkpoint-4")
    # Rewind: from checkpoint-2 to step 3 at a lower learning rate, saving checkpoint-3 of the new branch.
    lower = tiny_run_overrides(tiny_model_dir, *data, run)["learning_rate"] / 10
    assert main(flags(tiny_model_dir, data, run, run / "checkpoint-2", max_steps=3, save_steps=1,
                      learning_rate=lower)) == 0
    assert latest_complete_checkpoint(run).name == "checkpoint-3"
    rewound = logged(run)
    # A damaged newest checkpoint falls back to its own ancestor, never to the stale checkpoint-4.
    damaged = copy_run(run, tmp_path / "damaged")
    cut_adapter(damaged / "checkpoint-3")
    quiet = SimpleNamespace(say=lambda *args, **kwargs: None)
    assert resume_checkpoint(damaged, "latest", quiet).name == "checkpoint-2"
    # A plain --resume continues the new branch (from checkpoint-3), not the stale checkpoint-4.
    assert main(flags(tiny_model_dir, data, run, max_steps=5, save_steps=1, learning_rate=lower)) == 0
    continued = logged(run)
    assert continued[3] == rewound[3] and sorted(continued) == [1, 2, 3, 4, 5]
    assert continued[4] != stale[4]


def test_resume_may_lower_the_learning_rate_and_the_schedule_follows_the_new_peak(
        interrupted_run: Path, reference_run: Path, tiny_model_dir: Path, data: tuple[Path, Path],
        tmp_path: Path) -> None:
    run = copy_run(interrupted_run, tmp_path / "run")
    peak = tiny_run_overrides(tiny_model_dir, *data, run)["learning_rate"]
    train(run_config(tiny_model_dir, data, run, learning_rate=peak / 10), resume="latest")
    uninterrupted, lowered = logged(reference_run, "learning_rate"), logged(run, "learning_rate")
    assert lowered[5] == pytest.approx(uninterrupted[5] / 10)
    assert "learning_rate: " + str(peak / 10) in (run / "sft_config.yaml").read_text(encoding="utf-8")


def test_the_non_finite_loss_advice_names_a_resume_that_is_accepted(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as raised:
        train(run_config(tiny_model_dir, data, run), callbacks=[PoisonAdapterAfterStep(2)])
    advice = re.search(r"--resume (\S+) --learning-rate (\S+)\.$", str(raised.value))
    assert advice is not None, str(raised.value)
    assert advice.group(1) == str(run / "checkpoint-2")
    assert main(flags(tiny_model_dir, data, run, advice.group(1), learning_rate=advice.group(2))) == 0
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 6


def test_a_checkpoint_whose_identity_is_unreadable_is_damaged_and_skipped(
        interrupted_run: Path, tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    run = copy_run(interrupted_run, tmp_path / "run")
    (run / "checkpoint-4" / IDENTITY_FILE).write_text('{"sequence": "two"', encoding="utf-8")
    quiet = SimpleNamespace(say=print)
    assert resume_checkpoint(run, "latest", quiet).name == "checkpoint-2"
    assert f"warning: skipping the damaged checkpoint-4: {run / 'checkpoint-4' / IDENTITY_FILE}" \
        in capsys.readouterr().out
