"""Inverted dropout from a one-byte keep mask drawn 16 random bits per element.

On CPU ``nn.Dropout`` costs more than a LoRA adapter's own matmuls: drawing one float per element
through ``bernoulli_`` is a large share of a training step (docs/performance.md), and its float mask
doubles the memory the input costs. Here four elements share one 64-bit draw and the mask kept for
the backward pass is one byte per element. The drop probability is rounded to a multiple of
1/65,536 (0.05 -> 0.0500031).
"""

from __future__ import annotations

import math

import torch

_INT16_MIN = -(2**15)


def random_keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A boolean mask, True with probability 1 - p (p rounded to a multiple of 2**-16 on CPU and
    CUDA; elsewhere, MPS say, drawn as floats, where 64-bit integer draws are not a given)."""
    if device.type not in ("cpu", "cuda"):
        return torch.rand(shape, device=device) >= p
    count = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, device=device)
    bits = words.view(torch.int16)[:count].view(shape)
    return bits >= _INT16_MIN + round(p * 2**16)


def apply_keep_mask(x: torch.Tensor, keep: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x with the elements the boolean mask drops set to zero: a product with the mask's bytes (0
    or 1), which PyTorch runs vectorized. ``torch.where`` and a product with the boolean mask
    itself run element by element (slower; measured in docs/performance.md). (The product converts the bytes to x's dtype on the way: a caller applying one
    mask twice may convert it once and pass the converted mask.)"""
    return torch.mul(x, keep.view(torch.uint8) if keep.dtype == torch.bool else keep, out=out)


class DropoutFunction(torch.autograd.Function):
    """Inverted dropout with drop probability ``p``: x * keep / (1 - p), keeping only the mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:  # type: ignore[override]
        keep = random_keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return apply_keep_mask(x, keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return apply_keep_mask(grad, keep).mul_(ctx.scale), None
