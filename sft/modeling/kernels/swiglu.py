"""A SwiGLU MLP's down projection with its LoRA adapter as one autograd node:
down(silu(gate) * up), the activation computed inside and recomputed in the backward pass."""

from __future__ import annotations

import torch

from sft.modeling.kernels.dropout import apply_keep_mask
from sft.modeling.kernels.dtypes import compute_dtype
from sft.modeling.kernels.lora_linear import lora_backward, lora_forward


class SwiGLUDownFunction(torch.autograd.Function):
    """down(silu(gate) * up) for a LoRA down projection (a group of one; arguments as
    FusedLoraFunction's), keeping only gate, up (which the gate/up group's output holds anyway),
    the dropout mask and the rank-r product: the activation, the product and its dropped-out copy
    are recomputed in the backward pass. gate's and up's gradients come back as column blocks of
    one tensor, as the gate/up group's output lies, so that its backward reads them as they are."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                p: float, alphas: tuple[float, ...], sizes: tuple[int, ...], ranks: tuple[int, ...],
                a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(gate, weight)
        ctx.input_dtypes = (gate.dtype, up.dtype)
        w, a_cast, b_cast = weight.to(dtype), a.to(dtype), b.to(dtype)
        with torch.autocast(gate.device.type, enabled=False):
            hidden = torch.nn.functional.silu(gate.to(dtype)).mul_(up.to(dtype)).view(-1, gate.shape[-1])
            out, keep, low = lora_forward(hidden, w, None if bias is None else bias.to(dtype), p, alphas, sizes,
                                          ranks, a_cast, [b_cast], scratch=True)
        ctx.save_for_backward(gate, up, w, a_cast, b_cast, keep, low)
        ctx.meta = (alphas, sizes, ranks, dtype)
        ctx.adapter_dtypes = (a.dtype, b.dtype)
        return out.view(*gate.shape[:-1], sizes[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        gate, up, w, a_cat, b, keep, low = ctx.saved_tensors
        alphas, sizes, ranks, dtype = ctx.meta
        shape = gate.shape
        gate, up = (t.to(dtype).view(-1, t.shape[-1]) for t in (gate, up))
        # gate's and up's gradients side by side in one tensor; up's is the activation times the
        # product's gradient, computed in place where the activation lies
        width = gate.shape[-1]
        joined = gate.new_empty(gate.shape[0], 2 * width)
        activation = torch.ops.aten.silu.out(gate, out=joined[:, width:])
        hidden = activation * up
        keep = None if keep is None else keep.to(dtype)  # converted once for both of its uses
        dropped = hidden if keep is None else apply_keep_mask(hidden, keep, out=hidden)
        grad_hidden, grad_a, grad_b = lora_backward(grad.reshape(-1, sizes[0]).to(dtype), w, a_cat, [b], dropped,
                                                    keep, low, alphas, sizes, ranks, True, own_dropped=True)
        grad_up = activation.mul_(grad_hidden)
        grad_gate = torch.ops.aten.silu_backward.grad_input(grad_hidden.mul_(up), gate, grad_input=joined[:, :width])
        return (grad_gate.view(shape).to(ctx.input_dtypes[0]), grad_up.view(shape).to(ctx.input_dtypes[1]),
                None, None, None, None, None, None,
                grad_a[0].to(ctx.adapter_dtypes[0]), grad_b[0].to(ctx.adapter_dtypes[1]))
