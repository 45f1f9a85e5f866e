"""A run directory's checkpoints and files: which exist, which are intact, which are ours.

What is ours is decided by the run directory's manifest (sft.outputs), never by names: only
entries a run recorded there, and still as it wrote them, are ever deleted (by rotation and by
--overwrite-output-dir). RUN_FILES names what a run writes beside its checkpoints: a new run
refuses a folder where a file of such a name is not its own, rather than overwrite it.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sft.files import safetensors_damage
from sft.outputs import Manifest

CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
STAGING_DIR = ".checkpoint-staging"
"""The prefix of the folder a checkpoint is written in before its rename (one per run,
``.checkpoint-staging-PID-RANDOM``)."""

RUN_FILES = (
    # PEFT and the Trainer
    "adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "training_args.bin",
    "all_results.json", "train_results.json", "eval_results.json",
    # tokenizer files saved with the adapter
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json",
    # ours
    "sft_config.yaml", "data_report.json", "loss.png", "reference_logps.safetensors", "reference_logps.json",
)
SFT_ADAPTER_DIR = "sft_adapter"
"""Where a DPO run keeps the SFT adapter it was trained on top of (folded into the base first)."""


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


def is_peft_model_card(readme: Path) -> bool:
    """Whether ``readme`` is the model card PEFT writes beside an adapter, not a user's README."""
    return readme.is_file() and "library_name: peft" in readme.read_text(encoding="utf-8", errors="replace")[:2000]


def legacy_run_entries(run_dir: Path) -> list[str]:
    """The entries a run of an older sft (which kept no manifest) wrote, by their names: adopted
    into the manifest only when the user resumes that run."""
    names = [name for name in (*RUN_FILES, SFT_ADAPTER_DIR) if (run_dir / name).exists()]
    if is_peft_model_card(run_dir / "README.md"):
        names.append("README.md")
    return names + [path.name for path in checkpoints(run_dir) if not path.is_symlink()]


def rotate_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete the oldest of the run's own checkpoint-N folders beyond ``keep`` (of each, the files
    the run wrote; a file added since stays). A checkpoint the manifest does not list (a symlink, a copy put there
    by the user) is neither counted nor touched."""
    if keep <= 0:
        return
    manifest = Manifest.load(run_dir)
    ours = [path for path in checkpoints(run_dir) if path.name in manifest.entries and not path.is_symlink()]
    for path in ours[:-keep]:
        manifest.delete(path.name, changed_too=True)  # damaged, not edited: a run's checkpoint is read only
    manifest.save()


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
