"""Answers sampled from the policy for GRPO: temperature and top-p, each answer seeded on its own.

Every answer draws from its own random generator, seeded by (run seed, step, the prompt's place
in the step, the answer's index in its group), with one uniform number per token (inverse-CDF
sampling). So what an answer draws depends on nothing else in the batch, and a resumed run
draws at step N exactly what the uninterrupted run drew there. The drawing is `sft sample`'s
(sft.modeling.generate.generate_sampled: left-padded rows, a growing KV cache, finished rows
leaving the batch); temperature 0 is greedy. Kept apart from the trainer so a faster sampler can
replace it behind ``sample_answers``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from sft.modeling.generate import Answer, Sampling, generate_greedy, generate_sampled


def answer_seed(seed: int, step: int, position: int, sample: int) -> int:
    """The seed of one answer: sample ``sample`` of the prompt at ``position`` of step ``step``."""
    digest = hashlib.sha256(f"{seed}/{step}/{position}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64


def sample_answers(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]],
                   seeds: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int], temperature: float = 1.0,
                   top_p: float = 1.0, batch_size: int = 16) -> list[Answer]:
    """One answer per prompt, the answer of prompts[i] drawn with seeds[i], in the prompts' order;
    the most likely tokens where ``temperature`` is 0."""
    if temperature == 0:
        return generate_greedy(model, tokenizer, prompts, max_new_tokens, stop_ids, batch_size)
    return generate_sampled(model, tokenizer, prompts, max_new_tokens, stop_ids, seeds,
                            Sampling(temperature, top_p=top_p), batch_size)
