"""Preference pairs -> token ids: one prompt, two answers cut to the same budget.

Each answer is tokenized as SFT tokenizes a conversation (sft.data.tokenize), as the last
assistant turn after the pair's prompt, only that turn scored: the prompt is the template's
rendering with its generation prompt and the one BOS the model expects, and the answer is what the
rendering of the whole conversation adds to it, so it ends with exactly one end-of-turn marker.
Chosen and rejected thus continue the very same prompt ids: a pair whose two sequences differed
in their prompt tokens, or whose answer ended with two end-of-turn tokens, would teach a
preference for the tokenization rather than for the answer.

Truncation keeps the prompt and cuts both answers to the same budget, ``max_seq_length`` minus the
prompt's length, so that the longer answer is not the only one to lose its end. A pair whose
prompt leaves no answer token is dropped and counted: it carries no preference signal, and its
zero log-probabilities would give a loss of exactly ln 2 that moves nothing. So is a pair whose
two answers differ only beyond the cut: its two token sequences are the same, and prepare's
``chosen_equals_rejected`` rule, which refuses such a pair in the text, would be undone by the cut.

KTO's unpaired examples (a prompt, one completion and its label) are tokenized as one answer of a
pair is (encode_unpaired), and dropped and counted likewise when the prompt leaves no token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sft.data.templates import with_system_prompt
from sft.data.tokenize import IGNORE_INDEX, LAST_ASSISTANT_TURN, encode_conversation

ANSWERS = ("chosen", "rejected")
"""The two answers of a pair, in the order every tensor of this package stores them."""


@dataclass
class PairStats:
    """What happened to each pair on its way to token ids; read == kept + dropped."""

    read: int = 0
    kept: int = 0
    truncated: int = 0
    """Kept pairs whose answers were cut to fit max_seq_length."""
    dropped_no_answer_tokens: int = 0
    """Pairs whose prompt alone fills max_seq_length."""
    dropped_identical_after_truncation: int = 0
    """Pairs whose chosen and rejected answers are the same tokens once cut to max_seq_length."""
    prompt_tokens: int = 0
    chosen_tokens: int = 0
    rejected_tokens: int = 0
    dropped_ids: list[str] = field(default_factory=list)
    kept_rows: list[int] = field(default_factory=list)
    """The position of each kept pair in the list encoded (ids may repeat; positions do not)."""

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in {"dropped_ids", "kept_rows"}} | {
            "dropped_ids": self.dropped_ids[:50]}


def encode_answer(tokenizer: PreTrainedTokenizerBase, prompt: list[dict[str, Any]], answer: str,
                  max_seq_length: int) -> tuple[list[int], list[int], bool]:
    """The prompt's ids, the answer's ids after it (cut so that both fit in ``max_seq_length``,
    possibly to nothing) and whether the answer was cut."""
    example, cut = encode_conversation(tokenizer, [*prompt, {"role": "assistant", "content": answer}],
                                       max_seq_length, LAST_ASSISTANT_TURN)
    scored = next((i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX), len(example["labels"]))
    return example["input_ids"][:scored], example["input_ids"][scored:], cut


def encode_pair(tokenizer: PreTrainedTokenizerBase, pair: dict[str, Any], max_seq_length: int,
                system_prompt: str | None) -> tuple[dict[str, list[int]], bool]:
    """``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (and the ``id``) of one pair (as
    ``sft.data.prepared.read_preferences`` gives it, with the configured system prompt where the
    pair has none), each answer within ``max_seq_length`` together with the prompt, and whether
    either answer was cut. Answers left empty (the prompt fills the budget) are returned as they
    are; callers drop the pair."""
    prompt = with_system_prompt(pair["prompt"], system_prompt)
    answers, truncated = {}, False
    for side in ANSWERS:
        prompt_ids, answers[side], cut = encode_answer(tokenizer, prompt, pair[side], max_seq_length)
        truncated = truncated or cut
    ids = {"prompt_ids": prompt_ids} | {f"{side}_ids": answer for side, answer in answers.items()}
    return ({"id": pair["id"]} if "id" in pair else {}) | ids, truncated


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: list[dict[str, Any]], max_seq_length: int,
                 system_prompt: str | None, desc: str = "tokenizing pairs",
                 progress: bool = True) -> tuple[list[dict[str, list[int]]], PairStats]:
    """Encode every pair, dropping (and counting) those left with no answer token."""
    stats = PairStats()
    encoded = []
    for row, pair in enumerate(tqdm(pairs, desc=desc, disable=None if progress else True, leave=False)):
        stats.read += 1
        example, truncated = encode_pair(tokenizer, pair, max_seq_length, system_prompt)
        if not example["chosen_ids"] or example["chosen_ids"] == example["rejected_ids"]:
            if example["chosen_ids"]:
                stats.dropped_identical_after_truncation += 1
            else:
                stats.dropped_no_answer_tokens += 1
            stats.dropped_ids.append(str(pair.get("id", stats.read)))
            continue
        stats.kept += 1
        stats.kept_rows.append(row)
        stats.truncated += truncated
        stats.prompt_tokens += len(example["prompt_ids"])
        stats.chosen_tokens += len(example["chosen_ids"])
        stats.rejected_tokens += len(example["rejected_ids"])
        encoded.append(example)
    return encoded, stats


@dataclass
class UnpairedStats:
    """What happened to each unpaired (KTO) example on its way to token ids; read == kept + dropped."""

    read: int = 0
    kept: int = 0
    truncated: int = 0
    """Kept examples whose completion was cut to fit max_seq_length."""
    dropped_no_answer_tokens: int = 0
    """Examples whose prompt alone fills max_seq_length."""
    desirable: int = 0
    """Kept examples labeled desirable (the others are undesirable)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dropped_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "dropped_ids"} | {
            "undesirable": self.kept - self.desirable, "dropped_ids": self.dropped_ids[:50]}


def encode_unpaired(tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]], max_seq_length: int,
                    system_prompt: str | None, desc: str = "tokenizing examples",
                    progress: bool = True) -> tuple[list[dict[str, Any]], UnpairedStats]:
    """``prompt_ids``, ``completion_ids`` and ``label`` (and the ``id``) of every unpaired example (as
    ``sft.data.prepared.read_unpaired`` gives them), tokenized as a pair's answers are, dropping
    (and counting) those left with no completion token."""
    stats = UnpairedStats()
    encoded = []
    for row, example in enumerate(tqdm(examples, desc=desc, disable=None if progress else True, leave=False)):
        stats.read += 1
        prompt = with_system_prompt(example["prompt"], system_prompt)
        prompt_ids, completion_ids, cut = encode_answer(tokenizer, prompt, example["completion"], max_seq_length)
        if not completion_ids:
            stats.dropped_no_answer_tokens += 1
            stats.dropped_ids.append(str(example.get("id", row + 1)))
            continue
        stats.kept += 1
        stats.truncated += cut
        stats.desirable += example["label"]
        stats.prompt_tokens += len(prompt_ids)
        stats.completion_tokens += len(completion_ids)
        encoded.append(({"id": example["id"]} if "id" in example else {})
                       | {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": example["label"]})
    return encoded, stats
