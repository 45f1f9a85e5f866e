"""A run directory's checkpoints and files: which exist, which are intact, which are ours.

What is ours is decided by the run directory's manifest (sft.outputs), never by names: only
entries a run recorded there, and still as it wrote them, are ever deleted (by rotation and by
--overwrite-output-dir). RUN_FILES names what a run writes beside its checkpoints: a new run
refuses a folder where a file of such a name is not its own, rather than overwrite it.

Each checkpoint-N records, in IDENTITY_FILE, the run that wrote it (sft.training.identity) and its
place in the run's history: ``session`` (a random id per training process), ``sequence`` (one more
than any checkpoint of the folder had: the order they were written in) and ``lineage`` (the
sessions it descends from, each with the last sequence it took from it). So after a rewind (a
resume from checkpoint-1 while checkpoint-3 exists) the newest checkpoint is the one written
last, not the highest step, and a checkpoint of the abandoned branch is never taken for an
ancestor of the new one. Checkpoints of earlier versions have no record: they come before
recorded ones, in step order.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sft.files import safetensors_damage
from sft.outputs import Manifest

CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
STAGING_DIR = ".checkpoint-staging"
"""The prefix of the folder a checkpoint is written in before its rename (one per run,
``.checkpoint-staging-PID-RANDOM``)."""
IDENTITY_FILE = "run_identity.json"

RUN_FILES = (
    # PEFT and the Trainer
    "adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "training_args.bin",
    "all_results.json", "train_results.json", "eval_results.json",
    # tokenizer files saved with the adapter
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json",
    # ours
    "sft_config.yaml", "data_report.json", "loss.png", "reference_logps.safetensors", "reference_logps.json",
    "adapter_origin.json",
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


def checkpoint_record(checkpoint: Path) -> dict[str, Any] | None:
    """The checkpoint's IDENTITY_FILE, or None when it has none (an earlier version) or it is
    unreadable (``damage`` names it)."""
    try:
        record = json.loads((checkpoint / IDENTITY_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    valid = (isinstance(record, dict) and isinstance(record.get("sequence"), int)
             and isinstance(record.get("session"), str) and isinstance(record.get("lineage"), list)
             and isinstance(record.get("config"), dict))
    return record if valid else None


def written_order(run_dir: Path) -> list[Path]:
    """The run's checkpoint-N folders in the order they were written, oldest first."""
    def written(path: Path) -> tuple[float, int]:
        record = checkpoint_record(path)
        if record is None:  # an earlier version's comes first; a damaged record's last, to be named and skipped
            return (float("inf") if (path / IDENTITY_FILE).exists() else -1, checkpoint_step(path) or 0)
        return (record["sequence"], checkpoint_step(path) or 0)

    return sorted(checkpoints(run_dir), key=written)


def descends_from(later: Path, earlier: Path) -> bool:
    """Whether the checkpoint ``later`` continues the training that wrote ``earlier``."""
    late, early = checkpoint_record(later), checkpoint_record(earlier)
    if late is None or early is None:
        return (checkpoint_step(earlier) or 0) < (checkpoint_step(later) or 0)
    if early["session"] == late["session"]:
        return early["sequence"] < late["sequence"]
    return any(session == early["session"] and early["sequence"] <= sequence
               for session, sequence in late["lineage"])


def write_checkpoint_record(checkpoint: Path, run_dir: Path, identity: dict[str, Any]) -> None:
    """Write ``identity`` (sft.training.identity: the run and the session) into the staged
    ``checkpoint``, with the next sequence number of ``run_dir``."""
    sequences = [record["sequence"] for path in checkpoints(run_dir) if (record := checkpoint_record(path))]
    sequences += [sequence for _, sequence in identity["lineage"]]
    record = {**identity, "sequence": max(sequences, default=0) + 1}
    (checkpoint / IDENTITY_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def latest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint-N written last that holds trainer_state.json (written last), or None."""
    complete = [path for path in written_order(run_dir) if (path / "trainer_state.json").is_file()]
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
    """Delete the run's own checkpoint-N folders written first beyond ``keep`` (of each, the files
    the run wrote; a file added since stays). A checkpoint the manifest does not list (a symlink, a
    copy put there by the user) is neither counted nor touched."""
    if keep <= 0:
        return
    manifest = Manifest.load(run_dir)
    ours = [path for path in written_order(run_dir) if path.name in manifest.entries and not path.is_symlink()]
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
    if (checkpoint / IDENTITY_FILE).exists() and checkpoint_record(checkpoint) is None:
        return f"{checkpoint / IDENTITY_FILE}: unreadable or not a run identity"
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
