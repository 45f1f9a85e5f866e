"""Outputs are replaced whole or not at all: a full disk while preparing data leaves the previous
prepared set (never a new training file beside an old validation file and report), and a full
disk while exporting leaves no half-written GGUF file to block the next try."""

from __future__ import annotations

from pathlib import Path

import pytest

from sft.data.prepare import REJECTS_FILE, REPORT_FILE, TRAIN_FILE, VAL_FILE
from sft.data.prepare import main as prepare_main
from sft.export.gguf import main as export_main
from sft.outputs import MANIFEST_FILE
from tests.reliability.helpers import assert_user_error, run_python
from tests.tiny import write_jsonl

PREPARED = (TRAIN_FILE, VAL_FILE, REJECTS_FILE, REPORT_FILE)


def alpaca(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(start, start + n)]


def contents(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_a_full_disk_while_preparing_leaves_the_previous_output_set_whole(tmp_path: Path) -> None:
    out = tmp_path / "processed"
    assert prepare_main(["--source", str(write_jsonl(tmp_path / "old.jsonl", alpaca(40))), "--out-dir", str(out)]) == 0
    before = contents(out)
    assert sorted(before) == sorted([*PREPARED, MANIFEST_FILE])  # the manifest: what prepare wrote there
    # The new source's rejects are its largest output: with writes beyond 64 kB failing as on a
    # full disk, the train and validation files fit and the rejects do not.
    new = write_jsonl(tmp_path / "new.jsonl", alpaca(60, start=100) + [{"instruction": f"{i} " + "x" * 2000}
                                                                       for i in range(100)])
    done = run_python("scripts/prepare_sft_data.py", "--source", str(new), "--out-dir", str(out),
                      file_size_limit=64_000)
    assert_user_error(done.returncode, done.stderr, str(out), "File too large")
    assert contents(out) == before  # no new file beside old ones, and no temporary file left

    assert prepare_main(["--source", str(new), "--out-dir", str(out)]) == 0
    assert str(new) in (out / REPORT_FILE).read_text(encoding="utf-8")


def test_an_empty_out_dir_is_refused_not_taken_for_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    source = write_jsonl(tmp_path / "source.jsonl", alpaca(10))
    monkeypatch.chdir(tmp_path)
    assert_user_error(prepare_main(["--source", str(source), "--out-dir", ""]), capsys.readouterr().err,
                      "--out-dir is empty")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source.jsonl"]


def test_a_full_disk_while_exporting_leaves_no_file_and_the_next_try_writes_it(tiny_model_dir: Path,
                                                                              tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    flags = ["--model", str(tiny_model_dir), "--gguf", str(out), "--precision", "f32"]
    done = run_python("-m", "sft.cli", "export", *flags, file_size_limit=50_000)
    assert_user_error(done.returncode, done.stderr, str(tmp_path), "a write failed")
    assert list(tmp_path.iterdir()) == []
    assert export_main(flags) == 0
    assert out.stat().st_size > 50_000
