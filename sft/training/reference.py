"""Reference log-probabilities: computed once before training, cached on disk.

DPO compares the trained model's log-probability of each answer with the reference model's. The
reference never changes during a run, so its log-probabilities are computed in one pass before
training, from the very model that is about to be trained (before its new adapter is added, or
with the adapter disabled): no second model in memory, and no reference forward pass per step.
The same holds for KTO, whose records are an example's completion and the mismatched one its KL
term scores; a loss without a reference (SimPO, ORPO) skips all of this.

They are stored in the run's output directory (``reference_logps.safetensors``, one tensor per
split: train, val), each under a key made of:
- the token ids of every pair, in order: they are the data after the tokenization settings
  (template, system prompt, max_seq_length), so a change to the data or to how it is tokenized
  gives other ids, while a change that leaves every id as it was (a new ``source`` field, a
  longer max_seq_length that cuts nothing) rightly keeps the cache;
- the reference model: the base model's path and its weight files' names, sizes and modification
  times, the SFT adapter's content hash, and the dtype the log-probabilities were computed in.
A resumed run, or a rerun of the same configuration into the same directory, reads them back; any
change to those inputs recomputes them. The file also stores a sha256 of each tensor: a cache that
is unreadable, edited (its values no longer match their hash), not float32, holds values that are
no log-probabilities (NaN, infinite, above 0) or has metadata that is not ours is recomputed with a
note, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sft.files import atomic_paths, sha256_of_files
from sft.training.preference.collate import REFERENCE_KEY, PairCollator, answer_ids
from sft.training.preference.logps import pairs_answer_logps

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
    """A hash of every record's token ids (prompt, then its two answers), in order, and of the
    reference identity."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for pair in pairs:
        digest.update(json.dumps([pair["prompt_ids"], *answer_ids(pair)]).encode())
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
                           device: torch.device | str,
                           say: Callable[[str], None] = print) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The [pairs, 2] reference log-probabilities of each split's pairs, read from
    ``output_dir``'s cache where the split's key matches and computed (and stored) where not;
    and the names of the splits that were computed. A cache that fails its checks is recomputed,
    and ``say`` tells why."""
    path = Path(output_dir, REFERENCE_FILE)
    stored, stored_keys, problem = _read_cache(path)
    if problem is not None:
        say(f"note: {path} {problem}; recomputing the reference log-probabilities")
    results, computed = {}, []
    for split, pairs in splits.items():
        key = cache_key(pairs, identity)
        if stored_keys.get(split) == key and split in stored and stored[split].shape == (len(pairs), 2):
            results[split] = stored[split]
        else:
            results[split] = compute_reference_logps(model, pairs, batch_size, collator, device,
                                                     desc=f"reference log-probs ({split})").float()
            computed.append(split)
        stored_keys[split] = key
    if computed:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {split: logps.contiguous() for split, logps in results.items()}
        # a run killed while writing leaves no half file under the real name, nor a user's X.tmp touched
        with atomic_paths([path]) as (staging,):
            save_file(tensors, staging,
                      metadata={"keys": json.dumps({split: stored_keys[split] for split in results}),
                                "sha256": json.dumps({split: _sha256(t) for split, t in tensors.items()}),
                                "identity": json.dumps(identity)})
    return results, computed


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def _read_cache(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str | None]:
    """The tensors and keys stored in ``path`` and None; or nothing and what is wrong with it. It
    is used only if it is ours and intact: readable, each tensor float32 log-probabilities (finite,
    at most 0) whose sha256 is the one stored with it, so an edited or damaged cache is recomputed,
    never trusted."""
    if not path.exists():
        return {}, {}, None
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            keys, hashes = (json.loads(metadata.get(name, "null")) for name in ("keys", "sha256"))
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    except (OSError, SafetensorError, ValueError) as exc:  # JSON and UTF-8 errors are ValueErrors
        return {}, {}, f"is unreadable ({str(exc).splitlines()[0][:200]})"
    for name, entries in (("keys", keys), ("sha256", hashes)):
        if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
            return {}, {}, f"has no valid {name!r} metadata (not written by this version, or edited)"
    for split, tensor in tensors.items():
        if tensor.dtype != torch.float32:
            return {}, {}, f"holds {split} log-probabilities of dtype {tensor.dtype}, not float32"
        if not bool(torch.isfinite(tensor).all()) or bool((tensor > 0).any()):
            return {}, {}, f"holds {split} values that are not log-probabilities (NaN, infinite or above 0)"
        if hashes.get(split) != _sha256(tensor):
            return {}, {}, f"holds {split} log-probabilities that do not match their stored sha256 (edited or damaged)"
    return tensors, keys, None


def attach_reference_logps(pairs: list[dict[str, Any]], logps: torch.Tensor) -> list[dict[str, Any]]:
    """The pairs with their [chosen, rejected] reference log-probabilities, as the collator reads them."""
    return [pair | {REFERENCE_KEY: row} for pair, row in zip(pairs, logps.tolist(), strict=True)]
