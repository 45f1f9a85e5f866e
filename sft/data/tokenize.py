"""Conversations -> input_ids and labels, every assistant turn trained and everything else masked.

Masking is by position and works with any chat template. For each assistant turn, the
conversation before it is rendered with the generation prompt (exactly what the model is given
when it answers that turn) and the conversation through it is rendered too; both are tokenized,
and the first must be a token prefix of the second. The tokens between are the turn's answer:
its text, its end-of-turn token and whatever the template writes after it before the next turn.
The conversation through one answer must in turn be a token prefix of the next turn's prompt, so
the example is one token sequence in which every answer sits in the context it will have at
inference. A template that breaks either rule cannot be trained on this way, and says so.

Masking by token id would go wrong where the pad token is the EOS token (TinyLlama-Chat), and
searching the tokenized conversation for a response marker fails silently when the marker
tokenizes differently in context; neither is done here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sft.config.sections import TRAIN_ON
from sft.data.templates import (
    Message,
    encode_prompt,
    render_conversation,
    render_prompt,
    template_name,
    with_system_prompt,
)
from sft.errors import TemplateError

IGNORE_INDEX = -100

ALL_ASSISTANT_TURNS, LAST_ASSISTANT_TURN = TRAIN_ON
"""What ``data.train_on`` may say (defined with the configuration that validates it): every answer
of a conversation is trained, or only its last."""

TRUNCATION_MARGIN_TOKENS = 64
"""Tokens beyond max_seq_length that a message cut before tokenizing still yields, so that the
cut, which can change only the few tokens around it, never reaches the tokens that are kept."""


@dataclass
class EncodeStats:
    """What happened to each record on its way to token ids; read == kept + dropped."""

    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_no_supervised_tokens: int = 0
    prompt_tokens: int = 0
    supervised_tokens: int = 0
    dropped_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "dropped_ids"} | {
            "dropped_ids": self.dropped_ids[:50]}


@functools.lru_cache(maxsize=8)
def _longest_token_chars(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> int:
    """The length of the longest string in the vocabulary (``vocab_size`` keys the cache, so a
    token added later is seen)."""
    return max(len(token) for token in tokenizer.get_vocab())


def message_char_limit(tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> int:
    """The characters of one message that can matter within max_seq_length tokens.

    No token stands for more characters than the longest string of the vocabulary has (a
    byte-level token spells each byte with one character; a SentencePiece piece spells a space
    with one), so this many characters make at least max_seq_length + TRUNCATION_MARGIN_TOKENS
    tokens. Cutting a message here before tokenizing bounds the work of a huge record by the
    length budget, and leaves the kept tokens as they would be, the end-of-turn marker written
    after the cut falling beyond max_seq_length with the rest.
    """
    return (max_seq_length + TRUNCATION_MARGIN_TOKENS) * _longest_token_chars(tokenizer, len(tokenizer))


def _require_prefix(tokenizer: PreTrainedTokenizerBase, prefix: list[int], ids: list[int], what: str) -> None:
    """TemplateError unless ``prefix`` is where ``ids`` begins, showing the first tokens that differ."""
    if ids[:len(prefix)] == prefix:
        return
    at = next((i for i, (a, b) in enumerate(zip(prefix, ids, strict=False)) if a != b), min(len(prefix), len(ids)))
    raise TemplateError(
        f"{template_name(tokenizer)} cannot be trained on by position: {what}. From token {at} on, "
        f"the shorter rendering has {tokenizer.decode(prefix[at:at + 8])!r} where the longer one has "
        f"{tokenizer.decode(ids[at:at + 8])!r}. Use a template whose rendering of a conversation only grows "
        f"as turns are added (or a tokenizer without one, for the fallback)")


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[Message], max_seq_length: int,
                        train_on: str = ALL_ASSISTANT_TURNS) -> tuple[dict[str, list[int]], bool]:
    """input_ids and labels of one conversation within max_seq_length, and whether it was cut.

    ``messages`` is an optional system turn, then user and assistant turns alternating, ending
    with an assistant turn. Labels are -100 on every prompt token; answer tokens keep their ids
    when trained (every answer, or with ``last_assistant_turn`` only the last). There is exactly
    one BOS where the tokenizer adds one, even when the template writes it too.

    Truncation keeps the beginning: the sequence is cut at max_seq_length and then, so that it
    never ends with a prompt whose answer was cut away, after the last answer with a token left.
    A result with no supervised token (the first prompt alone fills max_seq_length, or the last
    answer is cut away under ``last_assistant_turn``) is returned as is; callers drop it.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on: expected one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if not messages or messages[-1]["role"] != "assistant":
        raise TemplateError("the last message of a training conversation must be the assistant's answer")
    limit = message_char_limit(tokenizer, max_seq_length)
    messages = [m | {"content": m["content"][:limit]} if len(m["content"]) > limit else m for m in messages]
    answer_turns = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
    input_ids: list[int] = []
    labels: list[int] = []
    answers: list[tuple[int, int]] = []  # [start, end) of each answer in input_ids
    for number, k in enumerate(answer_turns, 1):
        prompt = encode_prompt(tokenizer, render_prompt(tokenizer, messages[:k]))
        _require_prefix(tokenizer, input_ids, prompt,
                        f"the conversation through assistant turn {number - 1} is not a token prefix of "
                        f"the prompt of assistant turn {number}")
        through = encode_prompt(tokenizer, render_conversation(tokenizer, messages[:k + 1]))
        _require_prefix(tokenizer, prompt, through,
                        f"the prompt of assistant turn {number} (rendered with add_generation_prompt=True) "
                        f"is not a token prefix of the conversation through that turn")
        trained = train_on == ALL_ASSISTANT_TURNS or k == answer_turns[-1]
        answer = through[len(prompt):]
        labels += [IGNORE_INDEX] * (len(prompt) - len(input_ids)) + (
            answer if trained else [IGNORE_INDEX] * len(answer))
        answers.append((len(prompt), len(through)))
        input_ids = through
        if len(input_ids) >= max_seq_length:
            break  # later turns would start beyond the budget (a message cut above always ends here)
    end = min(len(input_ids), max_seq_length)
    answer_ends = [answer_end for start, answer_end in answers if start < end]
    if answer_ends:
        end = min(end, answer_ends[-1])
    truncated = end < len(input_ids) or len(answers) < len(answer_turns)
    return {"input_ids": input_ids[:end], "labels": labels[:end]}, truncated


def encode_record(tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], max_seq_length: int,
                  system_prompt: str | None, train_on: str = ALL_ASSISTANT_TURNS) -> tuple[dict[str, list[int]], bool]:
    """:func:`encode_conversation` of a prepared record (``sft.data.prepared.read_conversations``),
    with the configured system prompt where the record has none."""
    return encode_conversation(tokenizer, with_system_prompt(record["messages"], system_prompt), max_seq_length,
                               train_on)


def encode_records(tokenizer: PreTrainedTokenizerBase, records: list[dict[str, Any]], max_seq_length: int,
                   system_prompt: str | None, *, train_on: str = ALL_ASSISTANT_TURNS, desc: str = "tokenizing",
                   progress: bool = True) -> tuple[list[dict], EncodeStats]:
    """Encode every record, dropping (and counting) those left with no supervised token."""
    stats = EncodeStats()
    examples = []
    for record in tqdm(records, desc=desc, disable=None if progress else True, leave=False):
        stats.read += 1
        example, truncated = encode_record(tokenizer, record, max_seq_length, system_prompt, train_on)
        n_supervised = sum(label != IGNORE_INDEX for label in example["labels"])
        if n_supervised == 0:
            stats.dropped_no_supervised_tokens += 1
            stats.dropped_ids.append(str(record.get("id", stats.read)))
            continue
        stats.truncated += truncated
        stats.kept += 1
        stats.prompt_tokens += len(example["labels"]) - n_supervised
        stats.supervised_tokens += n_supervised
        examples.append(example)
    return examples, stats
