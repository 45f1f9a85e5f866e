"""Runs of the tiny model that the reliability tests copy and then damage, replace or resume.

Both train 6 steps with a checkpoint every 2: ``reference_run`` to the end (checkpoints 2, 4, 6
and the final adapter), ``interrupted_run`` stopped by Ctrl-C after step 4 (checkpoints 2 and 4).
Resuming a copy of the interrupted run must end with the reference's adapter. Read-only: tests
work on copies (``copy_run``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from sft.config import SFTConfig, build_config
from sft.errors import TrainingInterrupted
from sft.recipes.sft import train
from tests.reliability.helpers import SignalAtStep
from tests.tiny import tiny_run_overrides

RUN_SETTINGS = {"save_steps": 2}


def run_config(model_dir: Path, data: tuple[Path, Path], output_dir: Path, **changes: Any) -> SFTConfig:
    return build_config(None, tiny_run_overrides(model_dir, *data, output_dir, **{**RUN_SETTINGS, **changes}))


@pytest.fixture(scope="session")
def reference_run(tiny_model_dir: Path, data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    train(run_config(tiny_model_dir, data, output_dir))
    return output_dir


@pytest.fixture(scope="session")
def interrupted_run(tiny_model_dir: Path, data: tuple[Path, Path],
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(TrainingInterrupted):
        train(run_config(tiny_model_dir, data, output_dir), callbacks=[SignalAtStep(4)])
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return output_dir


def copy_run(run: Path, destination: Path) -> Path:
    shutil.copytree(run, destination)
    return destination
