"""A run directory's checkpoints and files: which exist, which are intact, which are ours.

Only entries this tool writes for a run are ever deleted: ``checkpoint-<step>`` folders (exactly
that name: a user's ``checkpoint-6-good`` copy is not one) and the files in RUN_FILES. Everything
else in the folder is the user's and stays.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sft.files import safetensors_damage

CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
STAGING_DIR = ".checkpoint-staging"

RUN_FILES = (
    # PEFT and the Trainer
    "adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "training_args.bin",
    "all_results.json", "train_results.json", "eval_results.json",
    # tokenizer files saved with the adapter
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json",
    # ours
    "sft_config.yaml", "data_report.json", "loss.png", "reference_logps.safetensors", "reference_logps.json",
    STAGING_DIR,
)
SFT_ADAPTER_DIR = "sft_adapter"
"""Where a DPO run keeps the SFT adapter it was trained on top of (folded into the base first)."""
RUN_DIRS = ("eval", "runs", SFT_ADAPTER_DIR)
"""Folders a run fills: evaluation reports, TensorBoard logs, a DPO run's SFT adapter."""


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint-N folders, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(step, path) for path in run_dir.iterdir() if (step := checkpoint_step(path)) is not None]
    return [path for _, path in sorted(found)]


def latest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The highest checkpoint-N that holds trainer_state.json (written last), or None."""
    complete = [path for path in checkpoints(run_dir) if (path / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


def holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and (any((run_dir / name).exists() for name in ("trainer_state.json",
                                                                            "adapter_config.json"))
                                 or bool(checkpoints(run_dir)))


def run_entries(run_dir: Path) -> list[Path]:
    """What this tool wrote for the run in ``run_dir``: the only entries it may delete."""
    entries = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    entries += [run_dir / name for name in RUN_DIRS if (run_dir / name).is_dir()]
    if is_peft_model_card(run_dir / "README.md"):
        entries.append(run_dir / "README.md")
    return entries + checkpoints(run_dir)


def is_peft_model_card(readme: Path) -> bool:
    """Whether ``readme`` is the model card PEFT writes beside an adapter, not a user's README."""
    return readme.is_file() and "library_name: peft" in readme.read_text(encoding="utf-8", errors="replace")[:2000]


def delete_run(run_dir: Path) -> list[Path]:
    """Delete the run's own entries (never the folder, never anything else); returns them."""
    entries = run_entries(run_dir)
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return entries


def rotate_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete the oldest checkpoint-N folders beyond ``keep``."""
    for path in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(path)


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint (naming the file), or None when it can be resumed from.

    Cheap checks that catch truncation and deletion: the JSON files parse, the adapter's
    safetensors header parses and its tensors fit in the file, and the optimizer, scheduler and
    RNG archives' checksums match (LoRA states are small, so reading them is fast)."""
    state = checkpoint / "trainer_state.json"
    try:
        parsed = json.loads(state.read_text(encoding="utf-8"))
        if not isinstance(parsed, dict) or "global_step" not in parsed:
            return f"{state}: not a trainer state (no global_step)"
        step = parsed["global_step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            return f"{state}: global_step is {step!r}, not a step number"
    except FileNotFoundError:
        return f"{state}: missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{state}: unreadable ({exc})"
    config = checkpoint / "adapter_config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{config}: missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{config}: unreadable ({exc})"
    problem = safetensors_damage(checkpoint / "adapter_model.safetensors")
    if problem:
        return problem
    # The RNG states are optional to the Trainer (one per process), the optimizer and scheduler not.
    for archive in (checkpoint / "optimizer.pt", checkpoint / "scheduler.pt", *checkpoint.glob("rng_state*.pth")):
        if not archive.is_file():
            return f"{archive}: missing"
        try:
            with zipfile.ZipFile(archive) as opened:
                if opened.testzip() is not None:
                    return f"{archive}: checksum mismatch"
        except (OSError, zipfile.BadZipFile) as exc:
            return f"{archive}: truncated or corrupt ({exc})"
    return None
