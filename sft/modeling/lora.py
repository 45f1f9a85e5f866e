"""LoRA adapters through PEFT, with a cheaper dropout on CPU.

PEFT applies ``nn.Dropout`` to the input of every adapted layer. On CPU that dropout costs more
than the adapter's own matmuls; FastDropout draws 16 random bits per element and keeps a one-byte
mask (sft.modeling.kernels.dropout says why and how). Adapters that read the same input (q, k, v;
gate, up) share one mask, as in a fused QKV adapter, where PEFT draws one per adapter. The
adapters, their names and the saved files are PEFT's own; on other devices PEFT's dropout is kept.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from sft.config.sections import MAX_LORA_SCALE
from sft.errors import ModelNotFoundError
from sft.modeling.generate import laid_for_decoding
from sft.modeling.kernels.dropout import DropoutFunction


class _LastInput:
    """One slot shared by a model's dropouts: the last input tensor and its dropped-out copy."""

    def __init__(self) -> None:
        self.input: weakref.ReferenceType | None = None
        self.output: torch.Tensor | None = None


class FastDropout(torch.nn.Module):
    """Inverted dropout like ``nn.Dropout``, drawing 16 random bits per element.

    Dropouts created with the same ``shared`` slot give one mask to consecutive adapters that read
    the very same input tensor (q, k and v read the attention input; gate and up the MLP input),
    as one fused QKV adapter would: one draw and one saved copy instead of three.
    """

    def __init__(self, p: float, shared: _LastInput | None = None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        slot = self.shared
        if slot is not None and slot.input is not None and slot.input() is x:
            return slot.output
        output = DropoutFunction.apply(x, self.p)
        if slot is not None:
            slot.input, slot.output = weakref.ref(x), output
        return output

    def extra_repr(self) -> str:
        return f"p={self.p}"


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """PEFT (0.21) reads ``model.is_gradient_checkpointing``, which transformers 5 reports as
    deprecated on every wrap: a warning about PEFT's code that users cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        yield


def add_lora(model: torch.nn.Module, config: LoraConfig, device: str) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; on CPU their dropout is FastDropout. (sft.modeling.fusion
    then runs the adapted layers that read one input as one function.)"""
    with peft_wrapping():
        model = get_peft_model(model, config)
    if device == "cpu" and config.lora_dropout > 0:
        shared = _LastInput()
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name, dropout in module.lora_dropout.items():
                    if isinstance(dropout, torch.nn.Dropout):
                        module.lora_dropout[name] = FastDropout(dropout.p, shared)
    return model


def check_adapter_config(path: Path, adapter_config: dict[str, Any]) -> None:
    """Refuse an adapter_config.json that PEFT would stumble over with a traceback (an edited or
    foreign file): a peft_type other than LORA, a rank that is not a positive integer, a scale that
    is not a finite number of sane size, target modules that are not names."""
    def refuse(why: str) -> ModelNotFoundError:
        return ModelNotFoundError(f"{path}: {why}; only LoRA adapters as sft or PEFT save them are loaded (retrain, "
                                  f"or restore the file)")

    peft_type = adapter_config.get("peft_type")
    if peft_type != "LORA":
        raise refuse("no peft_type" if peft_type is None else f"peft_type is {peft_type!r}, not 'LORA'")
    r, alpha = adapter_config.get("r"), adapter_config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise refuse(f"r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha <= MAX_LORA_SCALE * r:
        raise refuse(f"lora_alpha must be a number in (0, {MAX_LORA_SCALE} * r], got {alpha!r}")
    modules = adapter_config.get("target_modules")
    if modules is not None and not isinstance(modules, str) and not (
            isinstance(modules, list) and all(isinstance(name, str) for name in modules)):
        raise refuse(f"target_modules must be a list of module names, got {modules!r}"[:300])


@contextlib.contextmanager
def merged_weights(model: torch.nn.Module) -> Iterator[bool]:
    """A context in which each LoRA layer's base weight is replaced by base + the active adapter's
    update, so a layer is one matmul where it was three: long generation (`sft ifeval`, `sft
    sample`, and sampling through a model still being trained: `sft grpo`). The base tensors are set aside, not changed, and put back as
    they were on leaving: bit for bit, in any precision, which PEFT's merge and unmerge (adding
    the update in and taking it out again) are not. The cost is a merged copy of the adapted
    weights while inside. Yields whether it merged: a model with other adapters than plain LoRA on
    a plain ``nn.Linear`` (4-bit, DoRA, sharded weights), disabled or already merged ones, runs as
    it is. On a CPU the merged copy is stored transposed, as :func:`sft.modeling.generate.decode_layout`
    lays out the weights for answering."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    mergeable = bool(layers) and all(
        isinstance(m.base_layer, torch.nn.Linear) and type(m.base_layer.weight.data) is torch.Tensor
        and not m.disable_adapters and not m.merged and not getattr(m, "lora_variant", None)
        and all(a in m.lora_A for a in m.active_adapters) for m in layers)
    if not mergeable:
        yield False
        return
    saved: list[tuple[LoraLayer, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.base_layer.weight
                merged = weight.detach().float()
                for adapter in layer.active_adapters:
                    merged = merged + layer.get_delta_weight(adapter).float()
                saved.append((layer, weight.data))
                # on a CPU in the layout decoding wants (sft.modeling.generate.decode_layout),
                # made so here rather than re-laid there: the copy is dropped on leaving anyway
                weight.data = laid_for_decoding(merged.to(weight.dtype))
                layer.merged_adapters = list(layer.active_adapters)
        yield True
    finally:
        for layer, original in saved:
            layer.base_layer.weight.data = original
            layer.merged_adapters = []
