"""A full disk while safetensors writes (a checkpoint's adapter, a merged model) is one error line
with advice, and the half-written staging folder is gone; fault injection, no small file system."""

from __future__ import annotations

import errno
from pathlib import Path

import peft.peft_model
import pytest
import transformers.modeling_utils
from safetensors import SafetensorError

from sft.export.merge import main as merge_main
from sft.recipes.sft import main as train_main
from tests.reliability.helpers import assert_user_error
from tests.tiny import as_flags, tiny_run_overrides

FULL = "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })"


def fail_writes(monkeypatch: pytest.MonkeyPatch, module: object, error: BaseException, after: int = 0) -> None:
    """Make ``module``'s safetensors writer raise ``error`` from its ``after``-th call on."""
    write = module.safe_save_file
    calls = []

    def failing(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) > after:
            raise error
        write(*args, **kwargs)

    monkeypatch.setattr(module, "safe_save_file", failing)


@pytest.mark.parametrize("error", [SafetensorError(FULL), OSError(errno.ENOSPC, "No space left on device")],
                         ids=["SafetensorError", "OSError"])
def test_a_full_disk_while_a_checkpoint_adapter_is_written(tiny_model_dir: Path, data: tuple[Path, Path],
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture,
                                                           error: BaseException) -> None:
    fail_writes(monkeypatch, peft.peft_model, error, after=1)  # checkpoint-1 is written, checkpoint-2 is not
    out = tmp_path / "out"
    status = train_main(as_flags(tiny_run_overrides(tiny_model_dir, *data, out, max_steps=2, save_steps=1)))
    assert_user_error(status, capsys.readouterr().err, f"could not write to {out}", "No space left on device",
                      "--resume")
    assert (out / "checkpoint-1").is_dir() and not (out / "checkpoint-2").exists()
    assert not [path.name for path in out.iterdir() if "staging" in path.name]


def test_a_full_disk_while_merging_leaves_nothing(reference_run: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    fail_writes(monkeypatch, transformers.modeling_utils, SafetensorError(FULL))
    status = merge_main(["--adapter", str(reference_run), "--out", str(tmp_path / "merged")])
    assert_user_error(status, capsys.readouterr().err, "--out", "No space left on device", "disk is full")
    assert list(tmp_path.iterdir()) == []
