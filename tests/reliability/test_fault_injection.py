"""kill -9 at moments drawn with a fixed seed, the newest checkpoint damaged after each kill,
resume after resume: the run still ends with the adapter of a run that was never interrupted.

Checkpoints are saved every step, so the kills land in training steps, in evaluation, and while
a checkpoint is being written (before its rename, or between the rename and the rotation). A
kill is aimed a random delay after a given checkpoint appears; each resume must skip the damaged
newest checkpoint, saying so, and continue from the newest intact one.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from sft.recipes.sft import train
from sft.training.checkpoints import STAGING_DIR, checkpoint_step, checkpoints, damage
from tests.reliability.conftest import run_config
from tests.reliability.helpers import DAMAGES, ROOT, assert_same_adapter, kill_after
from tests.tiny import as_flags, tiny_run_overrides

SEED = 20261127
KILLS = 3
SETTINGS = {"max_steps": 6, "save_steps": 1, "save_total_limit": 3}


def start_training(flags: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sft.train_sft", *flags], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_killed_and_damaged_runs_resume_to_the_uninterrupted_adapter(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train(run_config(tiny_model_dir, data, tmp_path / "reference", **SETTINGS))
    run = tmp_path / "run"
    flags = as_flags(tiny_run_overrides(tiny_model_dir, *data, run, **SETTINGS))
    rng = random.Random(SEED)
    kinds = list(DAMAGES)
    resumed_from = 0
    for kill in range(KILLS):
        aim = min(max(resumed_from + rng.randint(1, 2), 2), SETTINGS["max_steps"])  # two checkpoints, one intact
        # Either while checkpoint-{aim} is being written (its staging folder has appeared), or
        # during the steps after it was renamed into place.
        during_save = rng.random() < 0.5
        moment = f"{STAGING_DIR}-*/checkpoint-{aim}" if during_save else f"checkpoint-{aim}"
        delay = rng.uniform(0.0, 0.05) if during_save else rng.uniform(0.0, 0.6)
        killed = kill_after(start_training(flags + (["--resume"] if kill else [])), run / moment, delay)
        newest = checkpoints(run)[-1]
        kind = kinds[kill % len(kinds)]
        DAMAGES[kind](newest)
        intact = [path for path in checkpoints(run) if damage(path) is None]
        with capsys.disabled():  # the kill points, for the record (pytest -s shows them)
            print(f"kill {kill + 1}: {delay:.3f} s after {moment} appeared ({'killed' if killed else 'had ended'}), "
                  f"staging left: {bool(list(run.glob(STAGING_DIR + '*')))}; {kind} in {newest.name}; "
                  f"resuming from {intact[-1].name}")
        resumed_from = checkpoint_step(intact[-1])
    capsys.readouterr()
    train(run_config(tiny_model_dir, data, run, **SETTINGS), resume="latest")
    assert f"warning: skipping the damaged {newest.name}" in capsys.readouterr().out
    assert_same_adapter(run, tmp_path / "reference")
