"""Per-token log-probabilities of answer tokens through the supervised-only head.

The SFT loss needs only the sum of an answer's log-probabilities (sft.training.loss); GRPO weighs
every token by its own ratio and advantage, so it needs each one. As there, the model stops
before its head and the head runs on answer positions only, in chunks, with the family's logit
transform (sft.modeling.head) inside: no [tokens, vocabulary] logits outlive a chunk.

The gradient of log p(target_i) with respect to hidden_i is (one_hot - softmax)_i @ W, times the
transform's slope: a vector per token, computed in the forward pass while the chunk's softmax is
at hand, and scaled in the backward pass by each token's incoming gradient. The head's weight is
frozen under LoRA; where it is trained, its gradient is a sum over tokens weighted by those
incoming gradients, so the backward pass recomputes the chunks for it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sft.data.collate import SUPERVISED_POSITIONS
from sft.modeling.head import LogitRule, logit_rule
from sft.training.loss import (
    CHUNK_TOKENS,
    DEFAULT_CHUNK_TOKENS,
    NOT_MODEL_INPUTS,
    _matmul_dtype,
    chunk_buffers,
    chunk_log_probs,
    model_inputs,
    supervised_hidden_states,
)


class _LinearTokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk_tokens: int, rule: LogitRule) -> torch.Tensor:
        needs_hidden_grad, needs_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = _matmul_dtype(hidden, weight)
        head = weight.to(dtype)
        log_probs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        unit_grad_hidden = torch.empty_like(hidden) if needs_hidden_grad else None
        buffer, slopes = chunk_buffers(hidden, weight, chunk_tokens, rule, needs_hidden_grad)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                chunk, grad_logits = chunk_log_probs(hidden[rows].to(dtype), head, targets[rows], rule, buffer,
                                                      slopes, needs_hidden_grad)
                log_probs[rows] = chunk
                if grad_logits is not None:
                    unit_grad_hidden[rows] = (grad_logits.to(dtype) @ head).to(hidden.dtype)
        ctx.save_for_backward(unit_grad_hidden, hidden if needs_weight_grad else None,
                              weight if needs_weight_grad else None, targets)
        ctx.chunk_tokens, ctx.rule = chunk_tokens, rule
        return log_probs

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor):  # type: ignore[override]
        unit_grad_hidden, hidden, weight, targets = ctx.saved_tensors
        grad_hidden = grad_weight = None
        if unit_grad_hidden is not None:
            grad_hidden = unit_grad_hidden * grad_log_probs[:, None].to(unit_grad_hidden.dtype)
        if weight is not None:
            dtype = _matmul_dtype(hidden, weight)
            head = weight.to(dtype)
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
            buffer, slopes = chunk_buffers(hidden, weight, ctx.chunk_tokens, ctx.rule, True)
            with torch.autocast(hidden.device.type, enabled=False):
                for start in range(0, hidden.shape[0], ctx.chunk_tokens):
                    rows = slice(start, start + ctx.chunk_tokens)
                    h = hidden[rows].to(dtype)
                    _, grad_logits = chunk_log_probs(h, head, targets[rows], ctx.rule, buffer, slopes, True)
                    grad_weight += (grad_logits * grad_log_probs[rows, None].float()).T @ h.float()
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           chunk_tokens: int | None = None, rule: LogitRule | None = None) -> torch.Tensor:
    """[n] float32 log softmax(rule(hidden @ weight.T))[i, targets_i] for hidden [n, d], weight
    [vocab, d], without keeping more than chunk_tokens x vocab logits alive."""
    if hidden.shape[0] == 0:
        return hidden.sum(dim=-1).float() * 0.0  # keeps the graph connected
    chunk_tokens = chunk_tokens or CHUNK_TOKENS.get(hidden.device.type, DEFAULT_CHUNK_TOKENS)
    return _LinearTokenLogProbs.apply(hidden, weight, targets, chunk_tokens, rule or LogitRule())


def answer_token_logps(model: torch.nn.Module, batch: dict[str, Any], head: torch.nn.Module | None = None,
                       not_model_inputs: tuple[str, ...] = NOT_MODEL_INPUTS) -> torch.Tensor:
    """The log-probability of every scored token of a batch (packed or padded: positions whose
    ``shift_labels`` is not -100), flat, in batch order (row-major), float32. ``head`` defaults to
    the model's output embeddings (pass it when ``model`` is wrapped); ``not_model_inputs`` are
    the batch keys the model must not see."""
    inputs = model_inputs(batch, not_model_inputs)
    positions = batch[SUPERVISED_POSITIONS]
    targets = batch["shift_labels"].flatten().index_select(0, positions)
    rule = logit_rule(model, head)
    if rule is None:  # a final-logit transform sft does not know: the model's own logits
        logits = model(**inputs, use_cache=False).logits.flatten(0, 1).index_select(0, positions).float()
        return F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    hidden, weight, _ = supervised_hidden_states(model, inputs, positions, head)
    return linear_token_log_probs(hidden, weight, targets, rule=rule)
