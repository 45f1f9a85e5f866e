"""A reward function for the GRPO recipe tests: the tiny random model's answers all fail (or all
pass) the same instructions, so the verifier alone gives every group equal rewards and no signal."""

from __future__ import annotations


def answer_length(prompts: list, completions: list[str], records: list[dict]) -> list[float]:
    return [len(completion) / 40 for completion in completions]
