"""Answers sampled from the policy for GRPO: temperature and top-p, each answer seeded on its own.

Every answer draws from its own random generator, seeded by (run seed, step, the prompt's place
in the step, the answer's index in its group), with one uniform number per token (inverse-CDF
sampling). So what an answer draws depends on nothing else in the batch, and a resumed run
draws at step N exactly what the uninterrupted run drew there. Decoding is the batched loop of
sft.inference.generate (left-padded rows, a growing KV cache, finished rows leaving the batch),
with this module choosing the tokens. Kept apart from the trainer so a faster sampler can
replace it behind ``sample_answers``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from sft.inference.generate import GrowingCache, _decode_batch


def answer_seed(seed: int, step: int, position: int, sample: int) -> int:
    """The seed of one answer: sample ``sample`` of the prompt at ``position`` of step ``step``."""
    digest = hashlib.sha256(f"{seed}/{step}/{position}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64


def choose_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The next token of each row of [rows, vocab] logits, given one uniform number in [0, 1) per
    row: the first token whose cumulative probability exceeds it (after temperature and top-p);
    the most likely token where ``temperature`` is 0."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # keep each token whose preceding mass is below top_p: the smallest set reaching it
        probs = probs * ((probs.cumsum(dim=-1) - probs) < top_p)
    cumulative = probs.cumsum(dim=-1)
    threshold = uniforms.to(cumulative)[:, None] * cumulative[:, -1:]
    index = torch.searchsorted(cumulative, threshold, right=True).clamp(max=probs.shape[-1] - 1)
    return (index if order is None else order.gather(1, index)).squeeze(1)


def sample_answers(model: torch.nn.Module, prompts: Sequence[list[int]], seeds: Sequence[int], max_new_tokens: int,
                   stop_ids: Sequence[int], pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
                   batch_size: int = 16) -> list[list[int]]:
    """One sampled answer per prompt (token ids, the end-of-turn id last where the answer ended),
    the answer of prompts[i] drawn with seeds[i], in the prompts' order."""
    if len(seeds) != len(prompts):
        raise ValueError("one seed per prompt")
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    device = next(model.parameters()).device
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    answers: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        for start in range(0, len(by_length), batch_size):
            batch = by_length[start:start + batch_size]

            def pick(logits: torch.Tensor, rows: list[int], batch: list[int] = batch) -> torch.Tensor:
                uniforms = torch.cat([torch.rand(1, generator=generators[batch[row]]) for row in rows])
                return choose_tokens(logits, uniforms.to(logits.device), temperature, top_p)

            for row, tokens in _decode_batch(model, [prompts[i] for i in batch], max_new_tokens, set(stop_ids), pad_id,
                                             device, GrowingCache(), pick):
                answers[batch[row]] = tokens
    return answers
