"""An input is never an output, a device or FIFO is never replaced, a file sft did not write is
replaced only with --force, a cache folder sft did not create is never deleted, and a kill -9
leaves no temporary file that the next run does not remove."""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sft.data.prepare import REPORT_FILE, TRAIN_FILE, VAL_FILE
from sft.data.prepare import main as prepare_main
from sft.errors import ModelNotFoundError
from sft.inference.evaluate import main as eval_main
from sft.inference.ifeval.command import main as ifeval_main
from sft.inference.onpolicy import main as onpolicy_main
from sft.modeling import models
from sft.outputs import MANIFEST_FILE
from tests.reliability.conftest import copy_run
from tests.reliability.helpers import ROOT, assert_user_error, kill_after, run_python
from tests.tiny import write_jsonl

SEED = 20261204


def alpaca(n: int, start: int = 0, **extra: str) -> list[dict[str, str]]:
    return [{"instruction": f"task {i}", "input": "", "output": f"answer {i}", **extra}
            for i in range(start, start + n)]


def files_under(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_prepare_refuses_to_write_over_its_own_source(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "my").mkdir()
    source = write_jsonl(tmp_path / "my" / TRAIN_FILE, alpaca(40, meta="kept only here"))
    before = source.read_bytes()
    status = prepare_main(["--source", str(source), "--out-dir", str(source.parent)])
    assert_user_error(status, capsys.readouterr().err, str(source), "is also an input")
    assert source.read_bytes() == before and sorted(p.name for p in source.parent.iterdir()) == [TRAIN_FILE]


def test_prepare_replaces_its_own_outputs_but_a_users_file_only_with_force(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = write_jsonl(tmp_path / "source.jsonl", alpaca(40))
    out = tmp_path / "processed"
    assert prepare_main(["--source", str(source), "--out-dir", str(out)]) == 0
    assert prepare_main(["--source", str(source), "--out-dir", str(out), "--seed", "3"]) == 0  # its own: replaced
    (out / VAL_FILE).write_text("my hand-made validation set\n", encoding="utf-8")
    assert_user_error(prepare_main(["--source", str(source), "--out-dir", str(out)]), capsys.readouterr().err,
                      str(out / VAL_FILE), "--force")
    assert (out / VAL_FILE).read_text(encoding="utf-8") == "my hand-made validation set\n"
    assert prepare_main(["--source", str(source), "--out-dir", str(out), "--force"]) == 0
    assert (out / VAL_FILE).read_text(encoding="utf-8") != "my hand-made validation set\n"
    assert (out / MANIFEST_FILE).is_file()


def test_prepare_never_replaces_a_fifo(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = write_jsonl(tmp_path / "source.jsonl", alpaca(10))
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / REPORT_FILE)
    assert_user_error(prepare_main(["--source", str(source), "--out-dir", str(out), "--force"]),
                      capsys.readouterr().err, str(out / REPORT_FILE), "not a regular file")
    assert stat.S_ISFIFO((out / REPORT_FILE).lstat().st_mode)


def test_onpolicy_pairs_refuse_their_source_a_users_file_and_a_device(
        reference_run: Path, data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = Path(shutil.copy(data[1], tmp_path / "sft_val.jsonl"))
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n", encoding="utf-8")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    flags = ["--adapter", str(reference_run), "--source", str(source), "--max-new-tokens", "4", "--limit", "2"]
    for out, fragment in ((source, "is also an input"), (notes, "--force"), (fifo, "not a regular file"),
                          (reference_run / "adapter_config.json", "is also an input")):
        assert_user_error(onpolicy_main([*flags, "--out", str(out)]), capsys.readouterr().err, str(out), fragment)
    assert source.read_bytes() == data[1].read_bytes() and notes.read_text(encoding="utf-8") == "my notes\n"
    if os.geteuid() == 0:  # a character device, as /dev/null is
        device = tmp_path / "null"
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        assert_user_error(onpolicy_main([*flags, "--out", str(device), "--force"]), capsys.readouterr().err,
                          str(device), "not a regular file")
        assert stat.S_ISCHR(device.lstat().st_mode)
    assert onpolicy_main([*flags, "--out", str(notes), "--force"]) == 0
    assert onpolicy_main([*flags, "--out", str(notes)]) == 0  # now its own file


def test_eval_writes_under_the_adapter_folder_given(reference_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """A moved run is evaluated where it is now (its saved output_dir is not recreated), and a copy
    is evaluated into the copy, leaving the original's report alone."""
    moved = copy_run(reference_run, tmp_path / "moved")
    original_eval = files_under(reference_run)
    assert eval_main(["--adapter", str(moved), "--device", "cpu", "--max-eval-examples", "2",
                      "--max-new-tokens", "2"]) == 0
    assert (moved / "eval" / "report.md").is_file()
    assert files_under(reference_run) == original_eval
    (moved / "eval" / "report.md").write_text("my own report\n", encoding="utf-8")
    flags = ["--adapter", str(moved), "--device", "cpu", "--max-eval-examples", "2", "--max-new-tokens", "2"]
    assert_user_error(eval_main(flags), capsys.readouterr().err, "report.md", "--force")
    assert (moved / "eval" / "report.md").read_text(encoding="utf-8") == "my own report\n"
    assert eval_main([*flags, "--force"]) == 0


def test_the_bundled_model_conversion_never_deletes_a_folder_it_did_not_create(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SFT_CACHE", "")
    assert models.cache_root() == Path.home() / ".cache" / "sft"  # never the current directory
    monkeypatch.setenv("SFT_CACHE", str(tmp_path))
    precious = tmp_path / "models" / "smollm2-135m-instruct" / "notes.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("precious\n", encoding="utf-8")
    with pytest.raises(ModelNotFoundError, match="was not written by sft"):
        models.resolve_model_path("smollm2-135m-instruct")
    assert precious.read_text(encoding="utf-8") == "precious\n"


def temporaries(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob(".*.tmp"))


def test_kill_9_while_preparing_leaves_no_temporary_the_next_run_keeps(tmp_path: Path) -> None:
    """Killed at seeded moments while its outputs are being written, prepare leaves hidden
    temporaries; the next prepare removes them (only those: a user's X.tmp stays), and the
    user's files are as they were."""
    source = write_jsonl(tmp_path / "source.jsonl", alpaca(60000))
    out = tmp_path / "processed"
    out.mkdir()
    (out / ".mine.tmp").write_text("a user's file\n", encoding="utf-8")
    (out / "notes.txt").write_text("notes\n", encoding="utf-8")
    users = files_under(out) | {"source": source.read_bytes()}
    rng = random.Random(SEED)
    command = [sys.executable, "-m", "sft.cli", "prepare", "--source", str(source), "--out-dir", str(out)]
    left = []
    for _ in range(3):
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
        kill_after(process, out / f".{TRAIN_FILE}.*.tmp", rng.uniform(0.0, 0.05))
        left.append(len(temporaries(out)) - 1)  # a killed writer's, beside the user's .mine.tmp
    assert max(left) > 0, left
    assert prepare_main(["--source", str(source), "--out-dir", str(out)]) == 0
    assert temporaries(out) == [out / ".mine.tmp"]
    after = files_under(out) | {"source": source.read_bytes()}
    assert {name: after[name] for name in users} == users


WRITER = {  # how merge (a folder) and export (a file) write their output, stopped half-way
    "merge": "with atomic_directory(out) as staging:\n    (staging / 'model.safetensors').write_bytes(bytes(1000))\n",
    "export": "with atomic_paths([out]) as (temporary,):\n    temporary.write_bytes(bytes(1000))\n",
}


@pytest.mark.parametrize("command", ["merge", "export"])
def test_kill_9_while_merging_or_exporting_leaves_no_temporary_the_next_run_keeps(
        command: str, reference_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A writer killed with -9 half-way through the output (the same code merge and export write
    with) leaves its temporary; the next merge or export of that name removes it."""
    out = tmp_path / ("merged" if command == "merge" else "model.gguf")
    (tmp_path / ".merged.0123abcd.tmp").write_text("not sft's\n", encoding="utf-8")
    code = (f"import sys, time\nfrom pathlib import Path\nfrom sft.files import atomic_directory, atomic_paths\n"
            f"out = Path(sys.argv[1])\n{WRITER[command]}    print('writing', flush=True)\n    time.sleep(600)\n")
    writer = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert writer.stdout.readline().strip() == "writing"
    writer.kill()
    writer.wait()
    assert len(temporaries(tmp_path)) == 2 and not out.exists()
    flags = (["--adapter", str(reference_run), "--out", str(out)] if command == "merge"
             else ["--model", str(tiny_model_dir), "--gguf", str(out), "--precision", "f32"])
    done = run_python("-m", "sft.cli", command, *flags)
    assert done.returncode == 0, done.stderr
    assert out.exists() and temporaries(tmp_path) == [tmp_path / ".merged.0123abcd.tmp"]


def test_ifeval_refuses_to_score_into_its_responses_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = write_jsonl(tmp_path / "input_data.jsonl", [
        {"key": 1, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}])
    out = tmp_path / "out"
    out.mkdir()
    responses = write_jsonl(out / "scores.json", [{"prompt": "Say hi.", "response": "hi"}])
    before = responses.read_bytes()
    status = ifeval_main(["--responses", str(responses), "--out", str(out), "--input-data", str(prompts)])
    assert_user_error(status, capsys.readouterr().err, str(responses), "is also an input")
    assert responses.read_bytes() == before
