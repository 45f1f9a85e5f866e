"""What a checkpoint must match to be resumed: the identity of the run that wrote it.

Every checkpoint-N holds ``run_identity.json`` (sft.training.checkpoints.IDENTITY_FILE), written
with it: the method (sft or dpo), the run's whole configuration, and a sha256 of each data file's
content, beside the checkpoint's place in the run's history (see checkpoints.py). ``--resume``
compares them with this command's before anything is loaded or written, whichever run the
checkpoint comes from (``--resume PATH`` may name another run's), and refuses, naming the field,
any difference the saved optimizer state and data order cannot continue: the method, the model,
the LoRA shape, the data (by path and by content: a file edited in place is a change), the
batch, the schedule. RESUMABLE_CHANGES lists what may change.

A checkpoint written before this file existed is compared with what is known of it: the run's
``sft_config.yaml`` beside it and its own ``adapter_config.json`` (rank, alpha, target modules).
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from sft.config import RUN_CONFIG_FILE, DPOConfig, SFTConfig, build_config
from sft.errors import ConfigError
from sft.training.checkpoints import checkpoint_record

RESUMABLE_CHANGES = {
    "max_steps", "num_train_epochs", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "report_to",
    "eval_batch_size", "device", "dtype", "attn_implementation", "output_dir", "num_generations", "max_new_tokens",
    "max_eval_examples", "trust_remote_code", "learning_rate",
}
"""Fields a resumed run may change: how long it runs, how often it logs, evaluates and saves, on
what hardware, and the peak learning rate (the schedule continues at the same point, scaled to the
new peak: the way out of a diverged loss). Any other change (model, LoRA shape, data, batch,
schedule) cannot continue the saved optimizer state and data order, and is refused naming the field."""

DATA_FILES = ("train_file", "val_file")


def method_of(config: SFTConfig) -> str:
    return "dpo" if isinstance(config, DPOConfig) else "sft"


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str | None:
    """The content hash of a data file (None if it cannot be read: reading it later says why)."""
    try:
        stat = Path(path).stat()
        return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    except OSError:
        return None


def run_identity(config: SFTConfig) -> dict[str, Any]:
    """What a checkpoint of a run with ``config`` records about the run (not its place in it)."""
    return {"method": method_of(config), "config": config.to_dict(),
            "data_sha256": {name: file_sha256(getattr(config.data, name)) for name in DATA_FILES}}


def new_session(resumed_from: str | Path | None) -> dict[str, Any]:
    """The history fields of the checkpoints this process will write: a fresh session id, and the
    sessions the resumed checkpoint descends from, it included (none for a new run)."""
    lineage: list[list[Any]] = []
    record = checkpoint_record(Path(resumed_from)) if resumed_from is not None else None
    if record is not None:
        lineage = [*record.get("lineage", []), [record["session"], record["sequence"]]]
    return {"session": uuid.uuid4().hex, "lineage": lineage}


def _refuse(field: str, now: Any, before: Any, checkpoint: Path) -> ConfigError:
    return ConfigError(
        f"--resume: {field} is {now!r} but {checkpoint} was saved by a run with {before!r}; a resumed run can "
        f"change only {', '.join(sorted(RESUMABLE_CHANGES))}. Drop the change, or start a new run in another "
        f"--output-dir")


def _known_identity(checkpoint: Path) -> dict[str, Any]:
    """What a checkpoint of an earlier version tells about its run: the run's saved configuration
    (if still beside it) and the LoRA shape of its adapter_config.json."""
    known: dict[str, Any] = {"config": {}}
    saved = checkpoint.parent / RUN_CONFIG_FILE
    if saved.is_file():
        saved_config = build_config(saved)
        known = {"method": method_of(saved_config), "config": saved_config.to_dict()}
    try:
        adapter = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        adapter = {}
    adapter = adapter if isinstance(adapter, dict) else {}
    lora = known["config"].setdefault("lora", {})
    saved_lora = dict(lora)
    for field, key in (("r", "r"), ("alpha", "lora_alpha"), ("target_modules", "target_modules")):
        if key in adapter and field not in lora:
            lora[field] = adapter[key]
    if "target_modules" in adapter and "target_modules" not in saved_lora:
        known["adapter_targets"] = True  # names PEFT resolved ("all-linear" among them), not the setting
    return known


def _same(field: str, now: Any, before: Any) -> bool:
    if field == "target_modules" and isinstance(now, list) and isinstance(before, list):
        return sorted(now) == sorted(before)  # PEFT saves them as a set
    return now == before


def check_resumable(config: SFTConfig, checkpoint: Path) -> None:
    """Refuse, naming the field, a resume of ``checkpoint`` whose run differs from this
    configuration in a way the saved state cannot continue."""
    record = checkpoint_record(checkpoint)
    saved = record if record is not None else _known_identity(checkpoint)
    current = run_identity(config)
    if "method" in saved and saved["method"] != current["method"]:
        raise _refuse("the method", current["method"].upper(), saved["method"].upper(), checkpoint)
    for group, fields in current["config"].items():
        for name, value in fields.items():
            before = saved["config"].get(group, {})
            if name == "target_modules" and saved.get("adapter_targets") and "all-linear" in value:
                continue  # PEFT's keyword against the layer names it chose: the shapes check it on load
            if name not in RESUMABLE_CHANGES and name in before and not _same(name, value, before[name]):
                raise _refuse(f"{group}.{name}", value, before[name], checkpoint)
    for name, digest in saved.get("data_sha256", {}).items():
        now = current["data_sha256"].get(name)
        if now is not None and digest != now:  # an unreadable file is named by the reader, with why
            path = getattr(config.data, name)
            raise ConfigError(
                f"--resume: data.{name} {path} is not the file {checkpoint} was trained on (its content changed: "
                f"sha256 {now[:12]} now, {str(digest)[:12]} then); the saved data "
                f"order cannot continue on other data. Restore the file, or start a new run in another --output-dir")
