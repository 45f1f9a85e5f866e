"""The one way a trained run is loaded for use: evaluation, chat, merge, IFEval.

``load_run`` gives the base model with the run's adapter (or the base alone), the tokenizer the
run saved (with the chat template training used), the run's configuration with this command's
flags on top, and the device policy. Two rules hold for every command:

- Nothing from a run directory decides whether code runs: ``trust_remote_code`` comes from the
  command line of the command being run, never from a saved configuration, so a run directory
  someone hands you cannot make ``sft eval`` import the Python files inside it.
- An adapter must fit its base exactly: every adapter weight has a LoRA layer of the same shape
  in the base and every LoRA layer of the base gets a weight, else the load is refused naming
  the base the adapter was trained on. PEFT alone would load a 30-layer adapter into a 2-layer
  model (or the reverse) without a word and generate garbage. Shapes are not enough: the base's
  fingerprint recorded beside the adapter (sft.modeling.fingerprint) must match this base's too,
  so another base of the same shapes (other weights, another vocabulary) is refused naming both.
  An adapter saved before fingerprints were recorded loads, with a note.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sft.config import DPOConfig, SFTConfig, build_config, config_class_of, saved_run_config
from sft.data.templates import ensure_chat_template
from sft.errors import ConfigError, ModelNotFoundError, UserError
from sft.modeling.attention import resolve_attention
from sft.modeling.devices import DevicePolicy, device_policy
from sft.modeling.fingerprint import base_fingerprint, fingerprint_difference, read_adapter_origin
from sft.modeling.lora import check_adapter_config, peft_wrapping
from sft.modeling.models import check_4bit_supported, load_model, load_tokenizer, resolve_model_path
from sft.training.checkpoints import SFT_ADAPTER_DIR, safetensors_damage

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoadedRun:
    model: torch.nn.Module
    """The base model, wrapped with the adapter when there is one; in eval mode on its device."""
    tokenizer: PreTrainedTokenizerBase
    config: SFTConfig
    """The run's saved configuration (defaults without one) with the command's flags on top."""
    policy: DevicePolicy
    adapter_dir: Path | None
    model_name: str
    """The base model's name as the user gave it (or the run saved it)."""

    @property
    def has_adapter(self) -> bool:
        return isinstance(self.model, PeftModel)

    def adapter(self, enabled: bool) -> contextlib.AbstractContextManager:
        """A context in which the adapter is on or off (the base model alone)."""
        if enabled or not self.has_adapter:
            return contextlib.nullcontext()
        return self.model.disable_adapter()

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


def run_config(adapter_dir: str | Path | None, config_path: str | Path | None = None,
               overrides: dict[str, Any] | None = None) -> SFTConfig:
    """The configuration a run was trained with (else ``config_path``, else the defaults), with
    ``overrides`` (flat field names, as flags) on top; trust_remote_code only from the overrides."""
    saved = saved_run_config(adapter_dir) if adapter_dir is not None else None
    overrides = dict(overrides or {})
    overrides["trust_remote_code"] = bool(overrides.get("trust_remote_code", False))
    return build_config(saved or config_path, overrides)


def check_adapter_dir(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's PEFT config, after checking the directory holds an intact adapter."""
    config_file = adapter_dir / ADAPTER_CONFIG
    if not adapter_dir.is_dir():
        raise ConfigError(f"{adapter_dir}: no such directory; pass a training output directory (or checkpoint-N)")
    if not config_file.is_file():
        raise ConfigError(f"{adapter_dir}: no {ADAPTER_CONFIG} here; train first (python -m sft.train_sft) or pass "
                          f"a training output directory (or checkpoint-N)")
    try:
        adapter_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelNotFoundError(f"{config_file}: not a readable adapter config ({exc})") from None
    if not isinstance(adapter_config, dict):
        raise ModelNotFoundError(f"{config_file}: not an adapter config (expected a JSON object)")
    check_adapter_config(config_file, adapter_config)
    problem = safetensors_damage(adapter_dir / ADAPTER_WEIGHTS)
    if problem:
        raise ModelNotFoundError(f"{problem}; only intact safetensors adapters are loaded (retrain, or pass an "
                                 f"intact checkpoint-N)")
    return adapter_config


_NOTED_UNCHECKED: set[Path] = set()


def base_fingerprint_of(model: PreTrainedModel, model_name: str) -> dict[str, Any]:
    """The fingerprint of a loaded base and of its own tokenizer's vocabulary (left out when its
    tokenizer cannot be read here: the weights are compared still)."""
    try:
        tokenizer = load_tokenizer(resolve_model_path(model_name))
    except (UserError, OSError, ValueError):
        tokenizer = None
    return base_fingerprint(model, tokenizer)


def base_difference(adapter_dir: Path, fingerprint: dict[str, Any], model_name: str, trained_on: Any) -> str | None:
    """How the base an adapter records differs from this one (None: it does not, or the adapter was
    saved before bases were recorded, which loads with a note, once)."""
    origin = read_adapter_origin(adapter_dir)
    if origin is None:
        if adapter_dir not in _NOTED_UNCHECKED:
            _NOTED_UNCHECKED.add(adapter_dir)
            print(f"note: {adapter_dir} does not record which base it was trained on (saved by an earlier version or "
                  f"another tool), so it is loaded on {model_name!r} unchecked; it was trained on {trained_on!r}",
                  file=sys.stderr)
        return None
    return fingerprint_difference(origin["base_fingerprint"], fingerprint)


def attach_adapter(base: PreTrainedModel, adapter_dir: Path, model_name: str,
                   fingerprint: dict[str, Any] | None = None) -> PeftModel:
    """``base`` with the adapter of ``adapter_dir``, refused unless the two fit weight for weight
    and the adapter was trained on this base (by its recorded fingerprint; ``fingerprint`` is the
    base's, computed here when not given)."""
    trained_on = check_adapter_dir(adapter_dir).get("base_model_name_or_path")

    def refuse(why: str) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"{adapter_dir}: this adapter does not fit the base model {model_name!r} ({why}); it was trained on "
            f"{trained_on!r}. Pass that base model with --model.")

    try:
        with peft_wrapping():
            model = PeftModel.from_pretrained(base, str(adapter_dir))
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        raise refuse("weights of other shapes") from None
    with safe_open(adapter_dir / ADAPTER_WEIGHTS, framework="pt") as weights:
        saved = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}  # noqa: SIM118
    expected = {key: tuple(value.shape) for key, value in get_peft_model_state_dict(model).items()}
    extra, missing = sorted(saved.keys() - expected.keys()), sorted(expected.keys() - saved.keys())
    if extra:
        raise refuse(f"{len(extra)} of its weights have no place in it, e.g. {extra[0]}")
    if missing:
        raise refuse(f"{len(missing)} of its LoRA layers would get no weights, e.g. {missing[0]}")
    mismatched = [key for key in saved if saved[key] != expected[key]]
    if mismatched:
        raise refuse(f"{mismatched[0]} is {saved[mismatched[0]]} in the adapter but {expected[mismatched[0]]} here")
    difference = base_difference(adapter_dir, fingerprint or base_fingerprint_of(base, model_name), model_name,
                                 trained_on)
    if difference is not None:
        raise refuse(f"{difference}: another base, though of the same shapes")
    return model


def folded_adapter(adapter_dir: Path) -> Path | None:
    """The SFT adapter a DPO run (or one of its checkpoint-N) was trained on top of, or None.

    Such a run keeps a copy in its own sft_adapter/ folder; its adapter fits base + that adapter
    merged, not the base alone, so loading folds that one in first."""
    for run_dir in (adapter_dir, adapter_dir.parent):
        if (run_dir / SFT_ADAPTER_DIR / ADAPTER_CONFIG).is_file():
            return run_dir / SFT_ADAPTER_DIR
    return None


def trained_by(adapter_dir: Path) -> str:
    """``sft`` or ``dpo``: the method that trained the adapter of a run directory or checkpoint-N,
    by its recorded origin, else (an earlier version) by the run it is in."""
    origin = read_adapter_origin(adapter_dir)
    if origin is not None:
        return origin["method"]
    saved = saved_run_config(adapter_dir)
    if folded_adapter(adapter_dir) is not None or (saved is not None and config_class_of(saved) is DPOConfig):
        return "dpo"
    return "sft"


def load_run(adapter_dir: str | Path | None, config: SFTConfig, model_name: str | None = None,
             device: str | None = None) -> LoadedRun:
    """Base model (+ adapter), tokenizer, configuration and device policy of a run, ready to use.

    The tokenizer comes from the adapter directory when there is one: it carries the chat
    template training used (the fallback included). A DPO run trained on top of an SFT adapter is
    loaded on base + that adapter merged, so ``adapter(False)`` is its reference model. A run
    trained on a 4-bit base is loaded in 4-bit where that can run (CUDA), else on the
    full-precision base, which its adapter fits."""
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
    if adapter_dir is not None:
        check_adapter_dir(adapter_dir)
    name = model_name or config.model.model
    policy = device_policy(device or config.training.device, config.model.dtype)
    quantized = config.model.load_in_4bit and policy.device.startswith("cuda")
    if quantized:
        check_4bit_supported(policy.device)
    model_path = resolve_model_path(name)
    trust = config.model.trust_remote_code
    tokenizer = load_tokenizer(str(adapter_dir) if adapter_dir is not None else model_path, trust)
    ensure_chat_template(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(model_path, policy.load_dtype, resolve_attention(config.model.attn_implementation,
                                                                         policy.device), trust,
                       load_in_4bit_compute=policy.compute_dtype if quantized else None, device=policy.device)
    if adapter_dir is not None:
        fingerprint = base_fingerprint_of(model, name)  # of the raw base: folding the SFT adapter leaves it as is
        sft_adapter = folded_adapter(adapter_dir)
        if sft_adapter is not None:  # a DPO run's adapter continues base + its SFT adapter
            model = attach_adapter(model, sft_adapter, name, fingerprint).merge_and_unload()
        model = attach_adapter(model, adapter_dir, name, fingerprint)
    if not quantized:  # a 4-bit model is placed on its GPU when loaded
        model = model.to(policy.device)
    return LoadedRun(model.eval(), tokenizer, config, policy, adapter_dir, name)


def check_prompt_fits(run: LoadedRun, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt the model cannot read: past its positions, it would answer garbage."""
    limit = run.max_positions
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ConfigError(f"the prompt is {prompt_tokens} tokens and up to {max_new_tokens} new tokens are asked "
                          f"for, but {run.model_name} takes {limit} positions; shorten the prompt or lower "
                          f"--max-new-tokens")
