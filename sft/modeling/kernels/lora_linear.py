"""A group of LoRA linear layers that read one input, run as one autograd node.

For layers i of a group (q, k and v; gate and up; or one layer alone):

    output_i = x @ W_i.T + bias_i + alpha_i * (dropout(x) @ A_i.T) @ B_i.T

- one base matmul against the group's weights concatenated ([sum of outputs, d]);
- one dropout mask for the group, and one matmul with the group's A matrices concatenated;
- each B product added into its slice of the output in the same kernel as its scaling (addmm);
- for the backward pass only the one-byte mask, the rank-r products and what the dropped-out
  input is rebuilt from are kept. The caller may name tensors kept anyway from which the input is
  rebuilt (an RMSNorm's input and 1/rms), so that no activation is kept twice; the input
  gradient is one matmul against the concatenated weights.

The alphas passed in are the LoRA scalings times 1 / (1 - p): the mask is applied unscaled.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from sft.modeling.kernels.dropout import apply_keep_mask, random_keep_mask
from sft.modeling.kernels.dtypes import compute_dtype

Rebuild = tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]
"""(function, tensors): ``function(*tensors)`` gives the input again from tensors kept anyway."""


def offsets(sizes: Sequence[int]) -> list[int]:
    """Where each of ``sizes`` starts when they are laid one after another."""
    return list(itertools.accumulate(sizes[:-1], initial=0))


def lora_forward(flat: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, p: float, alphas: Sequence[float],
                 sizes: Sequence[int], ranks: Sequence[int], a_cat: torch.Tensor, b_list: Sequence[torch.Tensor],
                 scratch: bool = False):
    """The group's output [rows, sum of sizes] for flat [rows, d], all in one dtype; with the
    dropout mask (None without dropout) and the rank-r products. ``scratch``: flat is the
    caller's own and may be overwritten (by its dropped-out copy, after the base matmul read it)."""
    out = flat @ w.T if bias is None else torch.addmm(bias, flat, w.T)
    keep = random_keep_mask(flat.shape, p, flat.device) if p > 0.0 else None
    dropped = flat if keep is None else apply_keep_mask(flat, keep, out=flat if scratch else None)
    low = dropped @ a_cat.T
    for col, row, size, rank, b, alpha in zip(offsets(sizes), offsets(ranks), sizes, ranks, b_list, alphas):
        out[:, col:col + size].addmm_(low[:, row:row + rank], b.T, alpha=alpha)
    return out, keep, low


def lora_backward(grad_out: torch.Tensor, w: torch.Tensor, a_cat: torch.Tensor, b_list: Sequence[torch.Tensor],
                  dropped: torch.Tensor, keep: torch.Tensor | None, low: torch.Tensor, alphas: Sequence[float],
                  sizes: Sequence[int], ranks: Sequence[int], input_grad: bool, own_dropped: bool = False):
    """Gradients of lora_forward's output: for flat (None unless ``input_grad``), each A, each B.
    ``own_dropped``: ``dropped`` is the caller's own, free once read, and takes flat's gradient
    (writing into memory just used is faster than into a new tensor)."""
    grad_low, grad_b = [], []
    for col, row, size, rank, b, alpha in zip(offsets(sizes), offsets(ranks), sizes, ranks, b_list, alphas):
        g = grad_out[:, col:col + size]
        grad_low.append((g @ b).mul_(alpha))
        # as [rank, size] and transposed: g read row by row, not down its columns (docs/performance.md)
        grad_b.append((low[:, row:row + rank].T @ g).mul_(alpha).T)
    grad_low = torch.cat(grad_low, dim=1)
    grad_a = list((grad_low.T @ dropped).split(list(ranks)))
    grad_flat = None
    if input_grad:
        # the adapters' part first, masked in place; the base matmul then adds itself into it
        # inside the matmul kernel (beta 1), where adding it afterwards would be one more pass
        grad_flat = torch.mm(grad_low, a_cat, out=dropped) if own_dropped else grad_low @ a_cat
        if keep is not None:
            apply_keep_mask(grad_flat, keep, out=grad_flat)
        grad_flat.addmm_(grad_out, w)
    return grad_flat, grad_a, grad_b


def side_by_side(grads: Sequence[torch.Tensor | None], rows: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The gradients as one [rows, sum of widths] tensor without a copy, where they are column
    blocks of one such tensor, in order (as SwiGLUDownFunction returns them); else None."""
    if any(g is None or g.dtype != dtype for g in grads):
        return None
    total = sum(g.shape[-1] for g in grads)
    expected = grads[0].data_ptr()
    for g in grads:
        try:
            flat = g.view(rows, g.shape[-1])
        except RuntimeError:  # strides that no [rows, width] view has
            return None
        if (flat.stride(1) != 1 or (rows > 1 and flat.stride(0) != total) or flat.data_ptr() != expected
                or g.untyped_storage().data_ptr() != grads[0].untyped_storage().data_ptr()):
            return None
        expected += g.shape[-1] * g.element_size()
    return grads[0].as_strided((rows, total), (total, 1))


class FusedLoraFunction(torch.autograd.Function):
    """outputs_i = x @ W_i.T + bias_i + alpha_i * (dropout(x) @ A_i.T) @ B_i.T for a group of layers.

    ``own_storage``: whether each output gets storage of its own (else it is a view of the group's
    one output tensor); ``rebuild``: None, or how to rebuild x in the backward pass instead of
    keeping it; ``weight``: the group's base weights concatenated ([sum of outputs, d]);
    ``alphas``: the LoRA scalings (times 1 / (1 - p) with dropout); ``sizes``: the layers' output
    widths; ``ranks``: their ranks; ``adapters``: each layer's A, then each layer's B."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, own_storage: tuple[bool, ...], rebuild: Rebuild | None,  # type: ignore[override]
                weight: torch.Tensor, bias: torch.Tensor | None, p: float, alphas: tuple[float, ...],
                sizes: tuple[int, ...], ranks: tuple[int, ...], *adapters: torch.Tensor) -> tuple[torch.Tensor, ...]:
        count = len(sizes)
        dtype = compute_dtype(x, weight)
        ctx.input_dtype, ctx.input_shape = x.dtype, x.shape
        w, a_cat = weight.to(dtype), torch.cat([a.to(dtype) for a in adapters[:count]])
        b_list = [b.to(dtype) for b in adapters[count:]]
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            out, keep, low = lora_forward(flat, w, None if bias is None else bias.to(dtype),
                                          p, alphas, sizes, ranks, a_cat, b_list)
        # Keep the input, not its dropped-out copy (rebuilt in the backward pass), or instead what
        # the caller says it is rebuilt from. (A copy converted under autocast is the one tensor
        # kept of its size: the recipe gives x, not its converted copy.)
        as_is = flat.dtype == x.dtype and flat.data_ptr() == x.data_ptr()
        ctx.rebuild, kept = rebuild if rebuild is not None and as_is else (None, (flat,))
        ctx.save_for_backward(w, a_cat, *b_list, keep, low, *kept)
        ctx.meta = (alphas, sizes, ranks)
        ctx.adapter_dtypes = [t.dtype for t in adapters]
        lead = x.shape[:-1]
        return tuple(out[:, start:start + size].clone().view(*lead, size) if own else
                     out[:, start:start + size].view(*lead, size)
                     for start, size, own in zip(offsets(sizes), sizes, own_storage))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):  # type: ignore[override]
        alphas, sizes, ranks = ctx.meta
        count = len(sizes)
        w, a_cat, *rest = ctx.saved_tensors
        b_list, (keep, low, *kept) = rest[:count], rest[count:]
        rebuilt = ctx.rebuild is not None
        flat = ctx.rebuild(*kept).reshape(-1, w.shape[1]) if rebuilt else kept[0]
        # a rebuilt input is this pass's own: its dropped-out copy overwrites it
        keep = None if keep is None else keep.to(w.dtype)  # converted once for both of its uses
        dropped = flat if keep is None else apply_keep_mask(flat, keep, out=flat if rebuilt else None)
        rows, lead = dropped.shape[0], ctx.input_shape[:-1]
        grad_out = side_by_side(grads, rows, w.dtype)
        if grad_out is None:
            # cat reads strided gradients as they are (a reshape first would copy each of them)
            grad_out = torch.cat([torch.zeros(*lead, size, dtype=w.dtype, device=w.device) if g is None
                                  else g.to(w.dtype) for g, size in zip(grads, sizes)], dim=-1).view(rows, -1)
        grad_x, grad_a, grad_b = lora_backward(grad_out, w, a_cat, b_list, dropped, keep, low, alphas, sizes, ranks,
                                               ctx.needs_input_grad[0], own_dropped=rebuilt or keep is not None)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.input_shape).to(ctx.input_dtype)
        adapter_grads = [g.to(d) for g, d in zip((*grad_a, *grad_b), ctx.adapter_dtypes)]
        return (grad_x, None, None, None, None, None, None, None, None, *adapter_grads)
