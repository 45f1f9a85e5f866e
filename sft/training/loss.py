"""Loss over supervised positions only.

The language-model head is the largest matmul of a small model's step (SmolLM2: 49,152 x 576),
and a full [tokens, vocab] logits tensor, its softmax and their gradients dominate memory. Only
answer tokens carry a loss, so the head runs on their hidden states alone, in chunks, with the
gradient of each chunk computed during the forward pass (softmax minus one-hot, times the head
weight): no chunk of logits is kept for the backward pass, and none is computed twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from sft.data.collate import SUPERVISED_POSITIONS
from sft.data.tokenize import IGNORE_INDEX
from sft.modeling.head import LogitRule, logit_rule
from sft.modeling.kernels.dtypes import compute_dtype as _matmul_dtype

NOT_MODEL_INPUTS = ("labels", "shift_labels", SUPERVISED_POSITIONS)
"""Batch keys the loss reads and the model must not see."""

CHUNK_TOKENS = {"cuda": 2048}
"""Supervised positions per head matmul, by device: bounds the logits alive at once to that many
x vocab (2048 x 32,000 float32 logits are 262 MB). 512 where not listed (CPU, MPS: memory is
what the chunks save there); a GPU has memory to spare and pays per kernel launch, so it gets
fewer, larger chunks. The GPU value is a reasoned default, not yet a measured one."""
DEFAULT_CHUNK_TOKENS = 512


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk_tokens: int, rule: LogitRule) -> torch.Tensor:
        needs_hidden_grad, needs_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # the head's matmul in one dtype for both operands; everything after it (log-sum-exp, the
        # loss, its gradient) accumulates in float32
        dtype = _matmul_dtype(hidden, weight)
        head = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight_grad else None
        buffer, slopes = chunk_buffers(hidden, weight, chunk_tokens, rule, needs_hidden_grad or needs_weight_grad)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_tokens):
                h = hidden[start:start + chunk_tokens].to(dtype)
                t = targets[start:start + chunk_tokens]
                log_probs, grad_logits = chunk_log_probs(h, head, t, rule, buffer, slopes,
                                                         needs_hidden_grad or needs_weight_grad, negated=True)
                total -= log_probs.sum()
                if grad_logits is not None:
                    if needs_hidden_grad:
                        if grad_hidden.dtype == dtype:  # straight into its rows, no copy
                            torch.mm(grad_logits.to(dtype), head, out=grad_hidden[start:start + chunk_tokens])
                        else:
                            grad_hidden[start:start + chunk_tokens] = grad_logits.to(dtype) @ head
                    if needs_weight_grad:
                        grad_weight += grad_logits.T @ h.float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_total.float()
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype),
                None, None, None)


def chunk_buffers(hidden: torch.Tensor, weight: torch.Tensor, chunk_tokens: int, rule: LogitRule,
                  with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float32 logits buffer every chunk of ``hidden`` reuses (see chunk_log_probs), and, where
    a soft cap needs them for a gradient, the slopes buffer: the derivative of a soft cap, 1 - tanh^2,
    differs per logit."""
    buffer = torch.empty(min(chunk_tokens, hidden.shape[0]), weight.shape[0], dtype=torch.float32,
                         device=hidden.device)
    slopes = torch.empty_like(buffer) if rule.softcap is not None and with_grad else None
    return buffer, slopes


def _apply_rule_(logits: torch.Tensor, rule: LogitRule, slopes: torch.Tensor | None) -> torch.Tensor | float:
    """The family's transform on raw head outputs, in place; returns d(transformed) / d(raw): a
    number, or with a soft cap the tensor ``slopes`` (left unset when None: no gradient needed)."""
    if rule.scale != 1.0:
        logits.mul_(rule.scale)
    if rule.softcap is None:
        return rule.scale
    tanh = logits.div_(rule.softcap).tanh_()
    if slopes is not None:  # scale * (1 - tanh^2)
        torch.mul(tanh, tanh, out=slopes).sub_(1.0).mul_(-rule.scale)
    tanh.mul_(rule.softcap)
    return slopes if slopes is not None else rule.scale


def chunk_log_probs(h: torch.Tensor, head: torch.Tensor, t: torch.Tensor, rule: LogitRule, buffer: torch.Tensor,
                    slopes: torch.Tensor | None, with_grad: bool,
                    negated: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(t_i) of one chunk of hidden states ``h`` ([rows, d], in the matmul dtype) under the
    family's ``rule``, each pass over one float32 logits ``buffer`` in place: the normalizer is
    max + log(sum(exp(logits - max))) as logsumexp computes it, without logsumexp's [rows, vocab]
    temporary. With ``with_grad`` also d log p(t_i) / d raw logits ([rows, vocab], in ``buffer``),
    or with ``negated`` that of -log p (softmax - one_hot), the loss's, without a pass to negate."""
    logits = buffer[:h.shape[0]]
    if h.dtype == torch.float32:
        torch.mm(h, head.T, out=logits)
    else:
        logits.copy_(h @ head.T)
    slope = _apply_rule_(logits, rule, None if slopes is None else slopes[:h.shape[0]])
    target_logits = logits.gather(1, t[:, None]).squeeze(1)
    peak = logits.amax(dim=-1, keepdim=True)
    exponentials = logits.sub_(peak).exp_()
    sums = exponentials.sum(dim=-1, keepdim=True)
    log_probs = target_logits - (sums.log() + peak).squeeze(1)
    if not with_grad:
        return log_probs, None
    grad_logits = exponentials.div_(sums)  # softmax, in the same buffer
    rows = torch.arange(t.shape[0], device=t.device)
    if negated:
        grad_logits[rows, t] -= 1.0
    else:
        grad_logits.neg_()[rows, t] += 1.0
    if isinstance(slope, torch.Tensor) or slope != 1.0:  # through the family's transform
        grad_logits.mul_(slope)
    return log_probs, grad_logits


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_tokens: int | None = None, rule: LogitRule | None = None) -> torch.Tensor:
    """sum_i CE(rule(hidden_i @ weight.T), targets_i) for hidden [n, d], weight [vocab, d], targets
    [n], without keeping more than chunk_tokens x vocab logits alive; ``rule`` is the model's own
    final-logit transform (sft.modeling.head), none by default."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0  # keeps the graph connected when a batch has no supervised token
    chunk_tokens = chunk_tokens or CHUNK_TOKENS.get(hidden.device.type, DEFAULT_CHUNK_TOKENS)
    return _LinearCrossEntropySum.apply(hidden, weight, targets, chunk_tokens, rule or LogitRule())


def supervised_forward(model: torch.nn.Module, batch: dict[str, Any], head: torch.nn.Module | None = None,
                       logits_in_forward: bool = False) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Run the model on a batch (packed or padded) and return the sum of next-token negative
    log-likelihoods over its supervised positions (``shift_labels`` != -100), their number, and
    the model's outputs. The model computes no logits at all; the head runs on supervised
    positions only. ``head`` defaults to the model's output embeddings (pass it when ``model``
    is wrapped, e.g. by DDP).

    ``logits_in_forward`` has the model's own forward compute the logits of the supervised
    positions instead (all positions of a padded batch), for wrappers whose weights exist only
    inside a forward call: FSDP shards the head's weight outside it. Same loss, more memory. The
    same path runs for a model whose logits are not its head's output under a transform sft knows
    (sft.modeling.head); known transforms (soft caps, logit scaling) run inside the head's chunks."""
    inputs = model_inputs(batch)
    shift_labels = batch["shift_labels"]
    supervised = shift_labels != IGNORE_INDEX
    rule = None if logits_in_forward else logit_rule(model, head)
    if rule is None:
        if shift_labels.shape[0] == 1:  # packed: one row, keep the supervised positions only
            keep = supervised[0].nonzero().squeeze(1)
            outputs = model(**inputs, use_cache=False, logits_to_keep=keep)
            logits, targets = outputs.logits[0], shift_labels[0, keep]
        else:
            outputs = model(**inputs, use_cache=False)
            logits, targets = outputs.logits[supervised], shift_labels[supervised]
        nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        return nll, supervised.sum(), outputs
    positions = batch.get(SUPERVISED_POSITIONS)
    if positions is None:  # a batch from another collator: the boolean mask (a sync on a GPU)
        positions = supervised.flatten().nonzero().squeeze(1)
    hidden, weight, outputs = supervised_hidden_states(model, inputs, positions, head)
    nll = linear_cross_entropy_sum(hidden, weight, shift_labels.flatten().index_select(0, positions), rule=rule)
    return nll, positions.new_tensor(positions.numel()), outputs


def model_inputs(batch: dict[str, Any], not_model_inputs: tuple[str, ...] = NOT_MODEL_INPUTS) -> dict[str, Any]:
    """The entries of a batch the model takes: all but ``not_model_inputs``, which the loss reads."""
    return {key: value for key, value in batch.items() if key not in not_model_inputs}


def supervised_hidden_states(model: torch.nn.Module, inputs: dict[str, Any], positions: torch.Tensor,
                             head: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The last hidden states at ``positions`` of the flattened batch (row-major), the weight of the
    head that scores them (``head``, by default the model's output embeddings) and the model's
    outputs. The model stops before its head: it computes no logits at all."""
    outputs = model(**inputs, output_hidden_states=True, use_cache=False,
                    logits_to_keep=torch.zeros(0, dtype=torch.long, device=positions.device))
    head = head if head is not None else model.get_output_embeddings()
    return outputs.hidden_states[-1].flatten(0, 1).index_select(0, positions), head.weight, outputs


def supervised_totals(model: torch.nn.Module, batches: Iterable[tuple[dict[str, Any], bool]],
                      head: torch.nn.Module | None = None, logits_in_forward: bool = False) -> torch.Tensor:
    """[sum of negative log-likelihoods, number of supervised tokens] over batches, in float64 on
    the model's device; a batch whose flag is False runs but is not counted (processes sharded
    unevenly still run the same forward passes, which FSDP needs). The validation loss of training
    and of ``sft eval`` is this, divided: a mean over all tokens, not a mean of per-batch means."""
    totals = None
    with torch.no_grad():
        for inputs, counted in batches:
            nll, count, _ = supervised_forward(model, inputs, head, logits_in_forward)
            if totals is None:
                totals = torch.zeros(2, dtype=torch.float64, device=nll.device)
            if counted:
                totals += torch.stack([nll.double(), count.double()])
    return totals if totals is not None else torch.zeros(2, dtype=torch.float64)


def supervised_nll_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token negative log-likelihoods over the supervised positions of one batch, and
    their count (a sum, so callers can average over all tokens of many batches)."""
    nll, count, _ = supervised_forward(model, batch)
    return nll, int(count)
