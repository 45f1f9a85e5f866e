"""Llama's RMSNorm as one autograd node."""

from __future__ import annotations

import torch


class RMSNormFunction(torch.autograd.Function):
    """Llama's RMSNorm, weight * (x / rms(x)) computed in float32 and cast back to x's dtype before
    the weight, as transformers computes it; returns the output and the reciprocal rms. It keeps x
    and the reciprocal rms, as autograd does, but its backward is three passes over x instead of
    autograd's eight (timed in docs/performance.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, rstd, weight)
        ctx.mark_non_differentiable(rstd)
        return rms_norm_output(x, rstd, weight), rstd

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _: torch.Tensor | None):  # type: ignore[override]
        x, rstd, weight = ctx.saved_tensors
        x32 = x.float()
        grad_weight = None
        if ctx.needs_input_grad[1]:
            normalized = (x32 * rstd).to(x.dtype)
            grad_weight = (grad * normalized).flatten(0, -2).sum(0).to(weight.dtype)
        grad_normalized = (grad * weight).float()
        # d/dx of x * rstd: rstd * g - x * rstd^3 * mean(g * x)
        coefficient = torch.linalg.vecdot(grad_normalized, x32).unsqueeze(-1).mul_(rstd.pow(3)).div_(x.shape[-1])
        grad_x = grad_normalized.mul_(rstd).addcmul_(x32, coefficient, value=-1.0)
        return grad_x.to(x.dtype), grad_weight, None


def rms_norm_output(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The norm's output from its input and reciprocal rms (the forward's, and a rebuild's)."""
    normalized = (x.float() * rstd).to(x.dtype)  # a new tensor: the weight multiplies it in place
    return normalized.mul_(weight) if weight.dtype == normalized.dtype else weight * normalized
