"""Which base model, and which method, an adapter was trained with: recorded beside it, by content.

An adapter fits any base of the same shapes, so the shapes cannot tell a base from another (a
random init, a fine-tuned variant, another vocabulary of the same size): PEFT loads it on either
without a word, and the answers are garbage. So every adapter the trainer saves (the run's and
each checkpoint's) has ADAPTER_ORIGIN beside it: the method that trained it (sft or dpo) and a
fingerprint of its base: a sha256 of a few rows of the input and output embeddings, and one of
the tokenizer's vocabulary. Loading compares the fingerprint with the base it is given.

The embeddings are the weights to take: no LoRA merge changes them (a DPO run's base merged with
its SFT adapter has the raw base's fingerprint), QLoRA does not quantize them, and another base
of the same shapes differs there. Rows are hashed after rounding to bfloat16, so one base loaded
in float32 on a CPU and in bfloat16 on a GPU has one fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from sft.errors import ModelNotFoundError

ADAPTER_ORIGIN = "adapter_origin.json"
METHODS = ("sft", "dpo")


def _rows_sha256(weight: torch.Tensor) -> dict[str, Any]:
    n = weight.shape[0]
    rows = sorted({i for i in (0, 1, 2, 3, n // 4, n // 2, 3 * n // 4, n - 1) if 0 <= i < n})
    picked = weight.detach()[rows].to("cpu", torch.bfloat16).contiguous()
    return {"shape": list(weight.shape), "rows": rows,
            "sha256": hashlib.sha256(picked.view(torch.int16).numpy().tobytes()).hexdigest()}


def vocabulary_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def base_fingerprint(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> dict[str, Any]:
    """The fingerprint of ``model``'s base weights (adapters merged into it or not) and of its
    tokenizer's vocabulary (None: not known)."""
    fingerprint: dict[str, Any] = {}
    for role, module in (("input_embeddings", model.get_input_embeddings()),
                         ("output_embeddings", model.get_output_embeddings())):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.device.type != "meta":
            fingerprint[role] = _rows_sha256(weight)
    fingerprint["vocabulary_sha256"] = vocabulary_sha256(tokenizer) if tokenizer is not None else None
    return fingerprint


def write_adapter_origin(adapter_dir: str | Path, method: str, fingerprint: dict[str, Any]) -> None:
    Path(adapter_dir, ADAPTER_ORIGIN).write_text(
        json.dumps({"method": method, "base_fingerprint": fingerprint}, indent=2) + "\n", encoding="utf-8")


def read_adapter_origin(adapter_dir: Path) -> dict[str, Any] | None:
    """The adapter's recorded origin; None for an adapter saved before it was recorded (or by
    another tool). A file that is there but not ours is refused: it would vouch for nothing."""
    path = adapter_dir / ADAPTER_ORIGIN
    if not path.exists():
        return None
    try:
        origin = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{path}: unreadable ({exc}); restore it from the run, or delete it to load the "
                                 f"adapter unchecked") from None
    if not (isinstance(origin, dict) and origin.get("method") in METHODS
            and isinstance(origin.get("base_fingerprint"), dict)):
        raise ModelNotFoundError(f"{path}: not an adapter origin (method and base_fingerprint); restore it from the "
                                 f"run, or delete it to load the adapter unchecked")
    return origin


def fingerprint_difference(saved: dict[str, Any], base: dict[str, Any]) -> str | None:
    """What differs between an adapter's recorded base and ``base`` (None: nothing that both know)."""
    for role in ("input_embeddings", "output_embeddings"):
        if role in saved and role in base and saved[role] != base[role]:
            what = "shape" if saved[role].get("shape") != base[role]["shape"] else "weights"
            return f"its {role.replace('_', ' ')} have other {what}"
    if saved.get("vocabulary_sha256") and base.get("vocabulary_sha256") \
            and saved["vocabulary_sha256"] != base["vocabulary_sha256"]:
        return "its tokenizer has another vocabulary"
    return None
