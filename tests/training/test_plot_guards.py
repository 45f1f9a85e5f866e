"""`sft plot` on a run that has logged nothing yet says so instead of drawing an empty plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.training.plots import main as plot_main
from tests.reliability.helpers import assert_user_error


def test_a_run_without_log_entries_is_refused_and_nothing_is_written(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 0, "log_history": []}))
    status = plot_main([str(tmp_path)])
    assert_user_error(status, capsys.readouterr().err, str(tmp_path / "trainer_state.json"), "no loss logged")
    assert not (tmp_path / "loss.png").exists()

