"""The dtype a matmul over operands of mixed precision runs in."""

from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Autocast's dtype where autocast is on for ``x``'s device, else ``weight``'s.

    Inputs and weights need not agree: LoRA layers in float32 over a bfloat16 base promote the
    residual stream to float32 while the base (and the head) stay bfloat16, and under fp16
    autocast the weights are float32. A custom autograd function sees whatever dtypes arrive, so
    it casts both operands to this one dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype
