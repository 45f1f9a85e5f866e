"""LoRA adapters through PEFT, with a cheaper dropout on CPU.

PEFT applies ``nn.Dropout`` to the input of every adapted layer. On CPU that dropout costs more
than the adapter's own matmuls: drawing one float per element through ``bernoulli_`` took 14 % of
a SmolLM2 training step, and its float mask doubles the memory the input costs. FastDropout
draws 16 random bits per element (four elements per 64-bit draw, about 3x faster) and keeps a
one-byte mask. The drop probability is rounded to a multiple of 1/65,536 (0.05 -> 0.0500031).
The adapters, their names and the saved files are PEFT's own.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

_INT16_MIN = -(2**15)


def random_keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A boolean mask, True with probability 1 - p (p rounded to a multiple of 2**-16)."""
    count = 1
    for size in shape:
        count *= size
    words = torch.randint(-(2**63), 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, device=device)
    bits = words.view(torch.int16)[:count].view(shape)
    return bits >= _INT16_MIN + round(p * 2**16)


class _DropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:  # type: ignore[override]
        keep = random_keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x * keep.to(x.dtype).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.dtype).mul_(ctx.scale), None


class FastDropout(torch.nn.Module):
    """Inverted dropout like ``nn.Dropout``, drawing 16 random bits per element."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return _DropoutFunction.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def add_lora(model: torch.nn.Module, config: LoraConfig, device: str) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; on CPU their dropout is FastDropout."""
    model = get_peft_model(model, config)
    if device == "cpu" and config.lora_dropout > 0:
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name, dropout in module.lora_dropout.items():
                    if isinstance(dropout, torch.nn.Dropout):
                        module.lora_dropout[name] = FastDropout(dropout.p)
    return model
