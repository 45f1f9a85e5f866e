"""A run's copy of the SFT adapter it starts from: made once the model loaded, kept by a run that
got to a checkpoint, removed by a new run that failed before one.

The adapter files are stand-ins (the copy is byte for byte); tests/recipes/test_dpo_recipe.py and
tests/reliability/test_handover.py start real DPO runs from a real SFT run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from sft.errors import ResourceError
from sft.inference.loading import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from sft.modeling.fingerprint import ADAPTER_ORIGIN
from sft.recipes.sft_adapter import sft_adapter_source, staged_sft_adapter
from sft.training.checkpoints import SFT_ADAPTER_DIR

RUNTIME = SimpleNamespace(main_process=True, state=SimpleNamespace(main_process_first=contextlib.nullcontext))


def sft_run(folder: Path, origin: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / ADAPTER_CONFIG).write_text('{"r": 8}', encoding="utf-8")
    (folder / ADAPTER_WEIGHTS).write_bytes(b"weights")
    if origin:
        (folder / ADAPTER_ORIGIN).write_text('{"base": "tiny"}', encoding="utf-8")
    return folder


@pytest.mark.parametrize("origin", [True, False])
def test_the_run_keeps_a_copy_of_the_adapter_it_starts_from(origin: bool, tmp_path: Path) -> None:
    source = sft_run(tmp_path / "sft", origin)
    output_dir = tmp_path / "dpo"
    output_dir.mkdir()
    with staged_sft_adapter(str(output_dir), RUNTIME, source) as copy:
        assert copy == output_dir / SFT_ADAPTER_DIR
        assert (copy / ADAPTER_WEIGHTS).read_bytes() == b"weights"
        assert (copy / ADAPTER_ORIGIN).is_file() == origin
    assert (copy / ADAPTER_CONFIG).is_file()  # kept after the block


def test_a_new_run_that_fails_before_its_first_checkpoint_removes_its_copy(tmp_path: Path) -> None:
    source = sft_run(tmp_path / "sft")
    output_dir = tmp_path / "dpo"
    output_dir.mkdir()
    with pytest.raises(ResourceError), staged_sft_adapter(str(output_dir), RUNTIME, source):
        raise ResourceError("out of memory")
    assert not (output_dir / SFT_ADAPTER_DIR).exists()
    assert (source / ADAPTER_WEIGHTS).is_file()  # the SFT run itself is never touched


def test_a_run_with_a_checkpoint_keeps_its_copy_when_it_fails(tmp_path: Path) -> None:
    source = sft_run(tmp_path / "sft")
    output_dir = tmp_path / "dpo"
    (output_dir / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt), staged_sft_adapter(str(output_dir), RUNTIME, source):
        raise KeyboardInterrupt
    assert (output_dir / SFT_ADAPTER_DIR / ADAPTER_WEIGHTS).is_file()  # a resume starts from it again


def test_a_resumed_run_starts_from_its_own_copy_and_never_removes_it(tmp_path: Path) -> None:
    output_dir = tmp_path / "dpo"
    own = sft_run(output_dir / SFT_ADAPTER_DIR)
    source = sft_adapter_source(str(tmp_path / "elsewhere"), str(output_dir), resumed=True)
    assert source == own
    with pytest.raises(ResourceError), staged_sft_adapter(str(output_dir), RUNTIME, source) as copy:
        assert copy == own
        raise ResourceError("out of memory")
    assert (own / ADAPTER_WEIGHTS).read_bytes() == b"weights"


def test_without_an_sft_adapter_nothing_is_staged(tmp_path: Path) -> None:
    assert sft_adapter_source(None, str(tmp_path), resumed=False) is None
    with staged_sft_adapter(str(tmp_path), RUNTIME, None) as copy:
        assert copy is None
    assert list(tmp_path.iterdir()) == []
