"""Attention for padding-free packed batches that never crosses example boundaries.

The packing collator concatenates a micro-batch's examples into one row, with position ids that
restart at 0 for each example and the boundaries as ``cu_seq_lens_q`` (cumulative lengths, as in
FlashAttention's varlen API). Three ways keep attention inside each example:

- ``varlen_sdpa`` (ours, the default off CUDA): one causal SDPA call per example. On CPU this
  measured faster than one call over the whole row with a block-diagonal mask (attention is
  quadratic, and the mask's cross-example blocks are pure waste).
- ``sdpa`` / ``eager``: transformers builds the block-diagonal mask from the restarting position
  ids (it does so only without a KV cache, so training runs with ``use_cache=False``).
- ``flash_attention_2`` on CUDA when the ``flash-attn`` package is installed: its varlen kernel.

Unpacked inputs (padded evaluation, generation with a KV cache) go through plain SDPA, so a model
loaded with ``varlen_sdpa`` works everywhere.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

VARLEN_SDPA = "varlen_sdpa"


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention per packed example; shapes as transformers' attention functions
    (query [1, heads, tokens, dim] in, [1, tokens, heads, dim] out)."""
    boundaries = kwargs.get("packed_boundaries")
    if boundaries is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    outputs = [
        F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                       dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
        for start, end in zip(boundaries[:-1], boundaries[1:])
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
# Padded inputs need SDPA's usual mask; packed rows ignore it.
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, sdpa_mask)


def resolve_attention(requested: str, device: str) -> str:
    """The implementation for ``auto``: FlashAttention varlen on CUDA when installed, else ours."""
    if requested != "auto":
        if requested == "flash_attention_2" and not flash_attention_available(device):
            raise RuntimeError("attn_implementation flash_attention_2 needs a CUDA device and "
                               "`pip install flash-attn`")
        return requested
    return "flash_attention_2" if flash_attention_available(device) else VARLEN_SDPA


def flash_attention_available(device: str) -> bool:
    return device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None
