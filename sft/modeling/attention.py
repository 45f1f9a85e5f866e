"""Attention for padding-free packed batches that never crosses example boundaries.

The packing collator concatenates a micro-batch's examples into one row, with position ids that
restart at 0 for each example and the boundaries as ``cu_seq_lens_q`` (cumulative lengths, as in
FlashAttention's varlen API) and as a Python list, ``packed_boundaries``. ``varlen_sdpa``, our
attention function, keeps attention inside each example the cheapest way each device offers:

- CUDA, bfloat16/float16: one call of PyTorch's own variable-length FlashAttention kernel
  (``torch.nn.attention.varlen.varlen_attn``) over the whole row; no extra package. One SDPA call
  per example would be a Python loop of small kernels, which on a GPU is launch overhead.
- MPS, and CUDA in float32 (FlashAttention has no float32 kernel): one SDPA call over the row
  with a block-diagonal causal mask. Correct everywhere, and one kernel per layer.
- CPU: one causal FlashAttention call per example (PyTorch's CPU kernel, the one SDPA picks),
  written into one output (with the fused layers, the rotary embedding runs in the same function:
  PackedRotaryAttention). Measured faster here than the masked call (attention is quadratic,
  and the mask's cross-example blocks are pure waste on a device without launch costs).

``flash_attention_2`` (the ``flash-attn`` package's varlen kernel, through transformers) is used
on CUDA when installed; ``sdpa``/``eager`` let transformers build the block-diagonal mask from the
restarting position ids (only without a KV cache, so training runs with ``use_cache=False``).
Unpacked inputs (padded evaluation, generation with a KV cache) go through plain SDPA, so a model
loaded with ``varlen_sdpa`` works everywhere.

A packed row may also share prefixes (``packed_parents``, one entry per segment: the index of
the segment it continues, or -1): GRPO packs each prompt once, followed by its G answers, and an
answer's tokens attend to its prompt and causally to themselves, never to a sibling answer
(``Segment.prefix``). On the CPU each answer is one FlashAttention call over its prompt's keys and
its own, with a mask that makes the call causal from the prompt's end; elsewhere it is the masked
call (only ``varlen_sdpa`` reads the parents, so the trainer shares prefixes with it alone).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from sft.errors import ConfigError

VARLEN_SDPA = "varlen_sdpa"
VARLEN_KEYS = (VARLEN_SDPA, "sft_varlen")
"""Names our attention function is registered under. transformers refuses any name containing
"sdpa" for a family it marks as not supporting SDPA (Gemma 2, whose attention soft-caps its
scores), though ours computes soft caps exactly; such a family is loaded under the second name."""
HALF_DTYPES = (torch.bfloat16, torch.float16)


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed example; shapes as transformers' attention functions
    (query [1, heads, tokens, dim] in, [1, tokens, heads, dim] out). A layer's sliding window
    (``sliding_window``: a token sees itself and the window - 1 tokens before it) and soft-capped
    scores (``softcap``: Gemma 2) are honoured on every path; soft caps, which no fused kernel
    here computes, run an exact eager path."""
    boundaries = kwargs.get("packed_boundaries")
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if boundaries is None or query.shape[0] != 1:
        if softcap is not None:
            mask = attention_mask if attention_mask is not None else causal_mask(
                query.shape[2], key.shape[2], window, query.device)
            return eager_attention(query, key, value, mask, dropout, scaling, softcap), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    segments = packed_segments(boundaries, kwargs.get("packed_parents"))
    shared = any(segment.prefix is not None for segment in segments)
    if window is not None and window >= longest_context(segments):
        window = None  # no token sees as far back as the window: plain causal attention
    kind = query.device.type
    # The kernels below are called past autocast, which SDPA would have applied: under autocast q,
    # k and v arrive in mixed dtypes (v from the autocast projection, q and k rotated in float32)
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else query.dtype
    query, key, value = (tensor.to(dtype) for tensor in (query, key, value))
    if softcap is not None:
        mask = block_diagonal_causal_mask(boundaries, query.device, window, kwargs.get("packed_parents"))
        return eager_attention(query, key, value, mask, dropout, scaling, softcap), None
    if (kind == "cuda" and not shared and query.dtype in HALF_DTYPES and dropout == 0.0
            and torch_varlen_attention(window) is not None):
        return _flash_varlen(query, key, value, kwargs, boundaries, scaling, window), None
    if kind == "cpu" and (not shared or (dropout == 0.0 and window is None)):
        return _per_example(query, key, value, segments, dropout, scaling, window), None
    return _block_diagonal(query, key, value, boundaries, dropout, scaling, window,
                           kwargs.get("packed_parents")), None


def eager_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                    dropout: float, scaling: float | None, softcap: float | None = None) -> torch.Tensor:
    """Attention written out as the families' own eager functions compute it (scores, soft cap,
    mask, float32 softmax), for what no kernel here supports. ``mask``: boolean (True attends) or
    additive, broadcasting to [batch, heads, queries, keys]. Returns [batch, tokens, heads, dim]."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask[..., :key.shape[2]]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0.0)
    return (weights @ value).transpose(1, 2).contiguous()


def causal_mask(queries: int, keys: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[queries, keys] boolean causal mask, the queries being the last of the keys (a KV cache),
    with a sliding window where given."""
    query_positions = torch.arange(keys - queries, keys, device=device)[:, None]
    key_positions = torch.arange(keys, device=device)[None, :]
    mask = key_positions <= query_positions
    if window is not None:
        mask &= key_positions > query_positions - window
    return mask


def example_lengths(boundaries: list[int]) -> list[int]:
    """The packed examples' lengths from their boundaries ([0, end of the first, ...])."""
    return [end - start for start, end in itertools.pairwise(boundaries)]


@dataclass(frozen=True)
class Segment:
    """A span of a packed row, [start, end): its tokens attend causally to each other and to all
    of ``prefix`` (the span of the segment it continues, earlier in the row), if any."""
    start: int
    end: int
    prefix: tuple[int, int] | None = None


def packed_segments(boundaries: Sequence[int], parents: Sequence[int] | None = None) -> list[Segment]:
    """The segments of a packed row from its boundaries and, where prefixes are shared, each
    segment's parent (the index of the segment it continues, or -1). A parent comes before its
    children and continues nothing itself (one level: a prompt and its answers)."""
    spans = list(itertools.pairwise(boundaries))
    if parents is None:
        return [Segment(start, end) for start, end in spans]
    if len(parents) != len(spans):
        raise ValueError(f"packed_parents: {len(parents)} entries for {len(spans)} segments")
    segments = []
    for index, ((start, end), parent) in enumerate(zip(spans, parents)):
        if parent < 0:
            segments.append(Segment(start, end))
            continue
        if parent >= index or parents[parent] >= 0:
            raise ValueError(f"packed_parents: segment {index} continues segment {parent}, which is not an "
                             f"earlier segment without a parent")
        segments.append(Segment(start, end, spans[parent]))
    return segments


def longest_context(segments: Sequence[Segment]) -> int:
    """The most keys any token of the row attends to: its segment's length plus its prefix's."""
    return max(segment.end - segment.start + (segment.prefix[1] - segment.prefix[0] if segment.prefix else 0)
               for segment in segments)


@functools.lru_cache(maxsize=256)
def _after_prefix_mask(prefix: int, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[length, prefix + length] additive mask: every query sees the whole prefix and, causally,
    its own segment (the CPU kernel's ``is_causal`` aligns the diagonal to the first key instead)."""
    allowed = torch.ones(length, prefix + length, dtype=torch.bool, device=device).tril_(prefix)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


def _per_example(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: list[Segment],
                 dropout: float, scaling: float | None, window: int | None = None) -> torch.Tensor:
    gqa = query.shape[1] != key.shape[1]
    if dropout == 0.0 and window is None:
        return _PerExampleAttention.apply(query, key, value, segments, scaling)
    lengths = [segment.end - segment.start for segment in segments]  # no shared prefixes here
    # split, not slicing: the backward of a split is one concatenation, while each slice's
    # backward writes a zero-filled gradient of the whole row (examples x tokens of work).
    outputs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, enable_gqa=gqa,
                                       **_causal_within(q.shape[2], window, q.device))
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def _causal_within(length: int, window: int | None, device: torch.device) -> dict:
    """SDPA's arguments for causal attention over one example, windowed where the window is shorter."""
    if window is None or window >= length:
        return {"is_causal": True}
    return {"attn_mask": causal_mask(length, length, window, device)}


class _PerExampleAttention(torch.autograd.Function):
    """One causal FlashAttention call (PyTorch's CPU kernel, as SDPA picks it) per example, written
    into one [1, tokens, heads, dim] output. That output is what the backward pass keeps (SDPA's
    own calls each keep theirs, and the concatenation the output projection reads is a second
    copy), so the output projection's saved input and attention's are one tensor."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,  # type: ignore[override]
                segments: list[Segment], scale: float | None) -> torch.Tensor:
        output, log_sum_exps = _attend(query, key, value, segments, scale)
        ctx.save_for_backward(query, key, value, output, *log_sum_exps)
        ctx.segments, ctx.scale = segments, scale
        return output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        query, key, value, output, *log_sum_exps = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        for segment, grad_q, grad_k, grad_v in _attend_backward(grad, query, key, value, output, log_sum_exps,
                                                                ctx.segments, ctx.scale):
            own = slice(segment.start, segment.end)
            dq[:, :, own].copy_(grad_q)
            for target, result in ((dk, grad_k), (dv, grad_v)):
                _write_keys(target, result, segment)
        return dq, dk, dv, None, None


def _write_keys(target: torch.Tensor, result: torch.Tensor, segment: Segment,
                transform: Callable[[torch.Tensor, slice], torch.Tensor] = lambda part, span: part) -> None:
    """Write a segment's key (or value) gradient, [1, heads, prefix + length, dim], into the row's
    [1, heads, tokens, dim] ``target``: its own part copied, its prefix's part added (the prefix's
    own segment, earlier in the row, has already been written). ``transform(part, span)`` maps a
    part to what is written (the part itself, or the transposed rotary embedding of the span's
    positions)."""
    own = slice(segment.start, segment.end)
    if segment.prefix is None:
        target[:, :, own].copy_(transform(result, own))
        return
    start, end = segment.prefix
    span = slice(start, end)
    target[:, :, own].copy_(transform(result[:, :, end - start:], own))
    target[:, :, span].add_(transform(result[:, :, :end - start], span))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor,
           transpose: bool = False) -> torch.Tensor:
    """transformers' rotary embedding, x * cos + rotate_half(x) * sin, written into ``out`` in three
    kernels (transformers' takes five, and more backward); with ``transpose``, its transpose:
    the gradient with respect to x. x and out: [..., tokens, dim]; cos and sin broadcast to them."""
    half = x.shape[-1] // 2
    torch.mul(x, cos, out=out)
    # forward: out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2; transposed: x2 s2 and -x1 s1 instead
    sign = 1.0 if transpose else -1.0
    first, second = (sin[..., half:], sin[..., :half]) if transpose else (sin[..., :half], sin[..., half:])
    out[..., :half].addcmul_(x[..., half:], first, value=sign)
    out[..., half:].addcmul_(x[..., :half], second, value=-sign)
    return out


class PackedRotaryAttention(torch.autograd.Function):
    """Rotary embedding and causal attention within each packed example, from the q, k and v
    projections ([1, tokens, heads x dim]) to attention's output ([1, tokens, heads x dim]), as a
    Llama attention computes them between its projections. One FlashAttention call (PyTorch's CPU
    kernel) per example, as in _PerExampleAttention. The backward pass writes each example's
    gradients, rotated back, straight into one [1, tokens, q + k + v widths] tensor and hands
    out column blocks of it, so a fused q/k/v projection reads them without concatenating."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,  # type: ignore[override]
                cos: torch.Tensor, sin: torch.Tensor, segments: list[Segment], scale: float | None) -> torch.Tensor:
        dim = cos.shape[-1]
        q, k, v = (_heads_first(t, dim) for t in (query, key, value))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = rotary(q, cos, sin, torch.empty_like(q)), rotary(k, cos, sin, torch.empty_like(k))
        output, log_sum_exps = _attend(q, k, v, segments, scale)
        ctx.save_for_backward(q, k, v, output, cos, sin, *log_sum_exps)
        ctx.segments, ctx.scale = segments, scale
        return output.flatten(2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        q, k, v, output, cos, sin, *log_sum_exps = ctx.saved_tensors
        widths = [t.shape[1] * t.shape[3] for t in (q, k, v)]
        joined = grad.new_empty(1, grad.shape[1], sum(widths))
        grads = joined.split(widths, dim=-1)
        dq, dk, dv = (_heads_first(g, q.shape[-1]) for g in grads)
        grad = grad.contiguous().view(output.shape)

        def rotated_back(part: torch.Tensor, span: slice) -> torch.Tensor:
            return rotary(part, cos[:, :, span], sin[:, :, span], torch.empty_like(part), transpose=True)

        for segment, grad_q, grad_k, grad_v in _attend_backward(grad, q, k, v, output, log_sum_exps,
                                                                ctx.segments, ctx.scale):
            own = slice(segment.start, segment.end)
            rotary(grad_q, cos[:, :, own], sin[:, :, own], dq[:, :, own], transpose=True)
            if segment.prefix is None:  # straight into the joined gradient, no temporary
                rotary(grad_k, cos[:, :, own], sin[:, :, own], dk[:, :, own], transpose=True)
            else:
                _write_keys(dk, grad_k, segment, rotated_back)
            _write_keys(dv, grad_v, segment)
        return *grads, None, None, None, None


def _heads_first(projection: torch.Tensor, dim: int) -> torch.Tensor:
    """[1, tokens, heads x dim] as [1, heads, tokens, dim], a view (as Llama's attention takes it)."""
    return projection.view(1, projection.shape[1], -1, dim).transpose(1, 2)


def _segment_keys(key: torch.Tensor, value: torch.Tensor, segment: Segment
                  ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A segment's keys and values ([1, heads, prefix + length, dim]: its prefix's, then its own)
    and the CPU kernel's causal arguments for them."""
    own = slice(segment.start, segment.end)
    if segment.prefix is None:
        return key[:, :, own], value[:, :, own], {"is_causal": True}
    span = slice(*segment.prefix)
    keys, values = (torch.cat([t[:, :, span], t[:, :, own]], dim=2) for t in (key, value))
    mask = _after_prefix_mask(span.stop - span.start, segment.end - segment.start, key.dtype, key.device)
    return keys, values, {"is_causal": False, "attn_mask": mask}


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: list[Segment],
            scale: float | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Causal FlashAttention per segment (after its prefix, where it has one) into one
    [1, tokens, heads, dim] output; with each segment's log-sum-exp, which the backward kernel takes."""
    _, heads, tokens, dim = query.shape
    output = query.new_empty(1, tokens, heads, dim)
    log_sum_exps = []
    for segment in segments:
        keys, values, causal = _segment_keys(key, value, segment)
        result, log_sum_exp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query[:, :, segment.start:segment.end], keys, values, 0.0, causal["is_causal"],
            attn_mask=causal.get("attn_mask"), scale=scale)
        output[:, segment.start:segment.end].copy_(result.transpose(1, 2))
        log_sum_exps.append(log_sum_exp)
    return output, log_sum_exps


def _attend_backward(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     output: torch.Tensor, log_sum_exps: list[torch.Tensor], segments: list[Segment],
                     scale: float | None) -> Iterator[tuple[Segment, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each segment with its query gradient ([1, heads, length, dim]) and its key and value
    gradients ([1, heads, prefix + length, dim]: the prefix's part first), from _attend's output
    and log-sum-exps and the output's gradient ([1, tokens, heads, dim])."""
    for segment, log_sum_exp in zip(segments, log_sum_exps):
        own = slice(segment.start, segment.end)
        keys, values, causal = _segment_keys(key, value, segment)
        yield segment, *torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad[:, own].transpose(1, 2), query[:, :, own], keys, values, output[:, own].transpose(1, 2),
            log_sum_exp, 0.0, causal["is_causal"], attn_mask=causal.get("attn_mask"), scale=scale)


def block_diagonal_causal_mask(boundaries: list[int], device: torch.device, window: int | None = None,
                               parents: Sequence[int] | None = None) -> torch.Tensor:
    """[tokens, tokens] boolean mask: True where a token may attend (same example, not later, and
    within ``window`` tokens where given: itself and window - 1 before it). With ``parents``
    (as packed_segments checks them), a segment's tokens also attend to all of its parent
    segment, the window counted in positions (a segment's continue its parent's)."""
    lengths = torch.tensor(example_lengths(boundaries), device=device)
    example = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    same_example = example[:, None] == example[None, :]
    mask = same_example.tril_()
    if parents is None:
        if window is not None:
            mask.triu_(-(window - 1))
        return mask
    parent = torch.tensor(list(parents), device=device)[example]
    mask |= parent[:, None] == example[None, :]
    if window is not None:
        starts = torch.tensor(boundaries[:-1], device=device)
        prefix = torch.where(parent >= 0, lengths[parent.clamp(min=0)], 0)
        positions = torch.arange(len(example), device=device) - starts[example] + prefix
        mask &= positions[:, None] - positions[None, :] < window
    return mask


def _block_diagonal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, boundaries: list[int],
                    dropout: float, scaling: float | None, window: int | None = None,
                    parents: Sequence[int] | None = None) -> torch.Tensor:
    mask = block_diagonal_causal_mask(boundaries, query.device, window, parents)
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                            enable_gqa=query.shape[1] != key.shape[1])
    return output.transpose(1, 2).contiguous()


def _flash_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: dict, boundaries: list[int],
                  scaling: float | None, window: int | None = None) -> torch.Tensor:
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None or cu_seq_lens.device != query.device:
        cu_seq_lens = torch.tensor(boundaries, dtype=torch.int32, device=query.device)
    max_length = kwargs.get("max_length_q") or max(example_lengths(boundaries))
    q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, key, value))  # [tokens, heads, dim]
    output = torch_varlen_attention(window)(q, k, v, cu_seq_lens.to(torch.int32), cu_seq_lens.to(torch.int32),
                                            int(max_length), int(max_length), scaling)
    return output.unsqueeze(0)


@functools.cache
def torch_varlen_attention(window: int | None = None) -> Callable | None:
    """PyTorch's variable-length FlashAttention as f(q, k, v, cu_q, cu_k, max_q, max_k, scale), causal
    (within ``window`` where given), [tokens, heads, dim] in and out, or None where this torch has
    none (or none with a window). Its keyword arguments changed between releases (``is_causal`` in
    2.10, ``window_size`` after; ``enable_gqa`` and ``scale`` came later), so they are read off the
    signature."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" in parameters:
        causal = {"window_size": (-1 if window is None else window - 1, 0)}
    elif window is None:
        causal = {"is_causal": True}
    else:
        return None

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
               max_q: int, max_k: int, scale: float | None) -> torch.Tensor:
        options = dict(causal)
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in parameters:
                options["enable_gqa"] = True
            else:
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if scale is not None and "scale" in parameters:
            options["scale"] = scale
        elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-6:
            raise RuntimeError("this torch's varlen_attn has no scale argument; use attn_implementation: sdpa")
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **options)

    return attend


for _key in VARLEN_KEYS:
    AttentionInterface.register(_key, varlen_sdpa_attention)
    # Padded inputs need SDPA's usual mask; packed rows ignore it.
    ALL_MASK_ATTENTION_FUNCTIONS.register(_key, sdpa_mask)


def shares_prompts_by_default(packing: bool, attention: str | None, device: str) -> bool:
    """Whether training packs a prompt once before its answers (GRPO's groups, DPO's pairs) unless
    told otherwise: in packed rows, where our attention reads the shared prefixes and a packed
    row's tokens cost compute in proportion (the CPU, where it is measured); not on CUDA or MPS,
    where the shared row takes the masked path instead of the varlen kernel and is not measured."""
    return packing and attention in VARLEN_KEYS and device.startswith("cpu")


def resolve_attention(requested: str, device: str) -> str:
    """The implementation for ``auto``: FlashAttention varlen on CUDA when installed, else ours."""
    if requested != "auto":
        if requested == "flash_attention_2" and not flash_attention_available(device):
            raise ConfigError(f"attn_implementation: flash_attention_2 needs a CUDA device and `pip install "
                              f"flash-attn`, and this run is on {device}; use auto (or varlen_sdpa)")
        return requested
    return "flash_attention_2" if flash_attention_available(device) else VARLEN_SDPA


def flash_attention_available(device: str) -> bool:
    return device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None
