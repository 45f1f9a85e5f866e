"""Starting a run from an SFT run's adapter (``--sft-adapter DIR``), as ``sft dpo`` and ``sft grpo`` do.

The SFT adapter is merged into the base in memory (the merged model is the reference) and a new
adapter is trained on top. The run keeps a copy in its sft_adapter/ folder, which chat, merge,
export and evaluation fold into the base before its own adapter, and which a resumed run starts
from again; a new run that fails before its first checkpoint removes its copy.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from sft.errors import ConfigError
from sft.files import atomic_directory
from sft.inference.loading import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    attach_adapter,
    check_adapter_dir,
    folded_adapter,
    trained_by,
)
from sft.modeling.fingerprint import ADAPTER_ORIGIN
from sft.training.checkpoints import SFT_ADAPTER_DIR, checkpoints
from sft.training.stages import Runtime


def check_sft_adapter(sft_adapter: Path, section: str, method: str) -> None:
    """``sft_adapter`` must be an SFT run's adapter (a recipe's ``section.sft_adapter``)."""
    check_adapter_dir(sft_adapter)
    if (trained := trained_by(sft_adapter)) != "sft":
        folded = folded_adapter(sft_adapter)
        raise ConfigError(
            f"{section}.sft_adapter: {sft_adapter} holds a {trained.upper()} adapter, not an SFT run's; {method} "
            f"starts from an SFT run (sft train's output directory or its checkpoint-N)"
            + (f", such as the one this {trained.upper()} run was trained on, kept in {folded}" if folded else ""))


def sft_adapter_source(sft_adapter: str | None, output_dir: str, resumed: bool) -> Path | None:
    """The SFT adapter to fold into the base: the run's own copy when resuming (the one it started
    with), the given one for a new run; None when the base model is the reference."""
    if sft_adapter is None:
        return None
    copy = Path(output_dir) / SFT_ADAPTER_DIR
    return copy if resumed and (copy / ADAPTER_CONFIG).is_file() else Path(sft_adapter)


def fold_in(adapter_dir: Path, model_name: str) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """A base-model step that merges the adapter of ``adapter_dir`` into the base."""
    return lambda base: attach_adapter(base, adapter_dir, model_name).merge_and_unload()


def stage_sft_adapter(output_dir: str, runtime: Runtime, source: Path | None) -> Path | None:
    """The run's own copy of the SFT adapter it started from (made now, once the model with that
    adapter loaded, so a refused adapter leaves no copy behind), or None."""
    if source is None:
        return None
    copy = Path(output_dir) / SFT_ADAPTER_DIR
    with runtime.state.main_process_first():
        if runtime.main_process and source != copy:
            shutil.rmtree(copy, ignore_errors=True)
            with atomic_directory(copy) as staging:
                for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_ORIGIN):
                    if name != ADAPTER_ORIGIN or (source / name).is_file():
                        shutil.copy2(source / name, staging / name)
    return copy


def drop_unused_sft_adapter(output_dir: str, runtime: Runtime, sft_adapter: Path | None, source: Path | None) -> None:
    """Remove the copy of the SFT adapter a new run made, when it failed before its first checkpoint."""
    if sft_adapter is not None and sft_adapter != source and runtime.main_process and not checkpoints(Path(output_dir)):
        shutil.rmtree(sft_adapter, ignore_errors=True)


@contextmanager
def staged_sft_adapter(output_dir: str, runtime: Runtime, source: Path | None) -> Iterator[Path | None]:
    """The run's copy of its SFT adapter (``stage_sft_adapter``) for the block's life, removed
    when the block fails before the run's first checkpoint."""
    sft_adapter = stage_sft_adapter(output_dir, runtime, source)
    try:
        yield sft_adapter
    except BaseException:
        drop_unused_sft_adapter(output_dir, runtime, sft_adapter, source)
        raise
