"""Reference log-probabilities: computed once before training, cached on disk.

DPO compares the trained model's log-probability of each answer with the reference model's. The
reference never changes during a run, so its log-probabilities are computed in one pass before
training, from the very model that is about to be trained (before its new adapter is added, or
with the adapter disabled): no second model in memory, and no reference forward pass per step.

They are stored in the run's output directory (``reference_logps.safetensors``, one tensor per
split: train, val), each under a key made of:
- the token ids of every pair, in order: they are the data after the tokenization settings
  (template, system prompt, max_seq_length), so a change to the data or to how it is tokenized
  gives other ids, while a change that leaves every id as it was (a new ``source`` field, a
  longer max_seq_length that cuts nothing) rightly keeps the cache;
- the reference model: the base model's path and its weight files' names, sizes and modification
  times, the SFT adapter's content hash, and the dtype the log-probabilities were computed in.
A resumed run, or a rerun of the same configuration into the same directory, reads them back; any
change to those inputs recomputes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sft.files import atomic_paths, sha256_of_files
from sft.training.preference import REFERENCE_KEY, PairCollator, pairs_answer_logps

REFERENCE_FILE = "reference_logps.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def reference_identity(model_path: str, sft_adapter: str | None, dtype: torch.dtype) -> dict[str, Any]:
    """What the reference log-probabilities depend on besides the data (see the module docstring).

    Base weights are identified by name, size and modification time rather than hashed: reading a
    1.1B model's 4 GB to hash it would cost more than it protects against. The SFT adapter is
    small and often retrained in place, so its content is hashed."""
    base: dict[str, Any] = {"path": str(Path(model_path).resolve()) if Path(model_path).exists() else model_path}
    if Path(model_path).is_dir():
        base["weights"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                 for p in Path(model_path).iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    adapter = None
    if sft_adapter is not None:
        adapter = sha256_of_files([Path(sft_adapter, "adapter_config.json"),
                                   Path(sft_adapter, "adapter_model.safetensors")])
    return {"base": base, "sft_adapter_sha256": adapter, "dtype": str(dtype).removeprefix("torch.")}


def cache_key(pairs: list[dict[str, Any]], identity: dict[str, Any]) -> str:
    """A hash of every pair's token ids, in order, and of the reference identity."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for pair in pairs:
        digest.update(json.dumps([pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]]).encode())
    return digest.hexdigest()


def compute_reference_logps(model: torch.nn.Module, pairs: list[dict[str, Any]], batch_size: int,
                            collator: PairCollator, device: torch.device | str,
                            desc: str = "reference") -> torch.Tensor:
    """[pairs, 2] log-probabilities of each pair's chosen and rejected answer under ``model``
    with any adapter disabled."""
    adapter_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with adapter_off:
        return pairs_answer_logps(model, pairs, batch_size, collator, device, desc)


def cached_reference_logps(model: torch.nn.Module, splits: dict[str, list[dict[str, Any]]],
                           output_dir: str | Path, identity: dict[str, Any], batch_size: int, collator: PairCollator,
                           device: torch.device | str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The [pairs, 2] reference log-probabilities of each split's pairs, read from
    ``output_dir``'s cache where the split's key matches and computed (and stored) where not;
    and the names of the splits that were computed."""
    path = Path(output_dir, REFERENCE_FILE)
    stored, stored_keys = _read_cache(path)
    results, computed = {}, []
    for split, pairs in splits.items():
        key = cache_key(pairs, identity)
        if stored_keys.get(split) == key and split in stored and stored[split].shape == (len(pairs), 2):
            results[split] = stored[split]
        else:
            results[split] = compute_reference_logps(model, pairs, batch_size, collator, device,
                                                     desc=f"reference log-probs ({split})")
            computed.append(split)
        stored_keys[split] = key
    if computed:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a run killed while writing leaves no half file under the real name, nor a user's X.tmp touched
        with atomic_paths([path]) as (staging,):
            save_file({split: logps.contiguous() for split, logps in results.items()}, staging,
                      metadata={"keys": json.dumps({split: stored_keys[split] for split in results}),
                                "identity": json.dumps(identity)})
    return results, computed


def _read_cache(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and keys stored in ``path``; none if it does not exist or cannot be read (an
    unreadable cache is recomputed, never trusted)."""
    try:
        with safe_open(path, framework="pt") as file:
            keys = json.loads((file.metadata() or {}).get("keys", "{}"))
            return {name: file.get_tensor(name) for name in file.keys()}, keys  # noqa: SIM118
    except (OSError, SafetensorError, json.JSONDecodeError):
        return {}, {}


def attach_reference_logps(pairs: list[dict[str, Any]], logps: torch.Tensor) -> list[dict[str, Any]]:
    """The pairs with their [chosen, rejected] reference log-probabilities, as the collator reads them."""
    return [pair | {REFERENCE_KEY: row} for pair, row in zip(pairs, logps.tolist(), strict=True)]
