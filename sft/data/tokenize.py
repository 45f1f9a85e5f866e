"""Conversations -> input_ids and labels, every assistant turn trained and everything else masked.

Masking is by position and works with any chat template. For each assistant turn, the
conversation before it is rendered with the generation prompt (exactly what the model is given
when it answers that turn) and the conversation through it is rendered too; both are tokenized,
and the first must be a token prefix of the second. The tokens between are the turn's answer:
its text (with its reasoning and tool calls, where the template writes them), its end-of-turn
token and whatever the template writes after it before the next turn.

Where the template is prefix-preserving (rendering more turns only appends tokens: SmolLM2,
TinyLlama, Qwen2.5, Llama 3.x, Gemma), the conversation through one answer is a token prefix of
the next turn's prompt, and the example is the conversation as the template renders it, each
answer in exactly the context it has at inference. Templates that are not re-render an earlier
answer differently once turns follow it, in one of two ways, and each answer is then taken as
rendered turn by turn and stitched:

* Something written after the end of the turn only when the turn is the last one (Phi-3 and
  Phi-3.5 close the conversation with an EOS after ``<|end|>``): the earlier answer is trained as
  the later turns see it, up to its end-of-turn marker, so the example is again exactly the final
  rendering and the trailing EOS is trained once, at the end.
* Something dropped from inside an answer once a later user turn follows (Qwen3 writes the
  ``<think>`` block, empty or not, only for the turns after the last user message): every answer
  is trained as the model writes it when it is the turn being generated, ``<think>`` block
  included, and each later prompt continues after it. This is what TRL's Qwen3 training template
  and LLaMA-Factory's reasoning templates train too. The alternative, one example that is the
  final rendering, would train earlier answers without a ``<think>`` block after the same
  ``<|im_start|>assistant`` header that the last answer follows with one: two behaviours for one
  context, the reasoning of every earlier turn lost, and a model that forgets to open its
  ``<think>``. The price is that a later answer sees earlier reasoning that inference strips;
  one example per turn would avoid it at a cost quadratic in the turns.

A template that changes the conversation *before* an answer once more turns follow cannot be
trained on this way, and says so; a system prompt that moves (Mistral-Instruct v0.3 writes it into
the last user turn) is pinned to the first user turn by ``sft.data.templates`` first, but a tool
list that moves the same way makes a conversation of more than one exchange an
:class:`UnsupportedRecord`.

What a template leaves out is checked, not assumed: an answer whose text, tool call or tool list
the template does not render (a template without tool support, a Llama 3.1 turn with two calls)
is an :class:`UnsupportedRecord`, which :func:`encode_records` drops and counts by reason, as
prepare counts its rejects. Reasoning the template does not render (most templates other than
Qwen3 drop a ``reasoning`` field) leaves the answer trained without it, and the turn is counted
in ``reasoning_dropped_turns``; reasoning written as ``<think>...</think>`` in the content is kept
as text wherever the template keeps the content.

Masking by token id would go wrong where the pad token is the EOS token (TinyLlama-Chat), and
searching the tokenized conversation for a response marker fails silently when the marker
tokenizes differently in context; neither is done here.
"""

from __future__ import annotations

import functools
import json
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


class UnsupportedRecord(TemplateError):
    """A record that uses what the tokenizer's chat template cannot render (tools, a tool call,
    the assistant's text beside a call); ``reason`` is the short code counted in the report."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class EncodeStats:
    """What happened to each record on its way to token ids; read == kept + dropped (both kinds).

    ``reasoning_dropped_turns`` counts answers whose ``reasoning`` the template did not render:
    they are trained without it."""

    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_no_supervised_tokens: int = 0
    dropped_unsupported: dict[str, int] = field(default_factory=dict)
    reasoning_dropped_turns: int = 0
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


def generation_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message], positions: int | None,
                      tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The token ids generation starts from for ``messages`` (and the conversation's ``tools``),
    built by training's prompt code.

    As training does, a message is cut before tokenizing at the characters that can matter within
    ``positions`` tokens (:func:`message_char_limit`): a cut prompt is still
    longer than the model's positions, so the callers' length checks refuse it as before, but a
    record of a hundred megabytes costs no more than that to refuse.
    """
    if positions is not None:
        limit = message_char_limit(tokenizer, positions)
        messages = [m | {"content": m["content"][:limit]} if isinstance(m.get("content"), str)
                    and len(m["content"]) > limit else m for m in messages]
    return encode_prompt(tokenizer, render_prompt(tokenizer, messages, tools))


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


@dataclass
class Encoded:
    """One conversation's input_ids and labels, whether it was cut, and how many of its answers
    were trained without the reasoning the template did not render."""

    example: dict[str, list[int]]
    truncated: bool
    reasoning_dropped: int = 0


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[Message], max_seq_length: int,
                        train_on: str = ALL_ASSISTANT_TURNS, tools: list[dict[str, Any]] | None = None,
                        ) -> tuple[dict[str, list[int]], bool]:
    """input_ids and labels of one conversation within max_seq_length, and whether it was cut.

    ``messages`` is an optional system turn, then user and assistant turns alternating (an
    assistant turn with tool calls followed by the tools' results), ending with an assistant
    turn; ``tools`` the tool list the template puts in the prompt. Labels are -100 on every
    prompt token (tool results included); answer tokens keep their ids when trained (every
    answer, or with ``last_assistant_turn`` only the last). There is exactly one BOS where the
    tokenizer adds one, even when the template writes it too.

    Truncation keeps the beginning: the sequence is cut at max_seq_length and then, so that it
    never ends with a prompt whose answer was cut away, after the last answer with a token left.
    A result with no supervised token (the first prompt alone fills max_seq_length, or the last
    answer is cut away under ``last_assistant_turn``) is returned as is; callers drop it.
    """
    encoded = encode_turns(tokenizer, messages, max_seq_length, train_on, tools)
    return encoded.example, encoded.truncated


def encode_turns(tokenizer: PreTrainedTokenizerBase, messages: list[Message], max_seq_length: int,
                 train_on: str = ALL_ASSISTANT_TURNS, tools: list[dict[str, Any]] | None = None) -> Encoded:
    """:func:`encode_conversation` with the count of answers trained without their reasoning.

    A conversation using tools that the template refuses, or renders in a way that cannot be
    trained on, is an UnsupportedRecord (the template's tool support is the problem, not every
    record's); any other TemplateError is the template's and stops the run."""
    try:
        return _encode_turns(tokenizer, messages, max_seq_length, train_on, tools)
    except UnsupportedRecord:
        raise
    except TemplateError as exc:
        if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            raise UnsupportedRecord("template_refused_tools", str(exc)) from None
        raise


def _encode_turns(tokenizer: PreTrainedTokenizerBase, messages: list[Message], max_seq_length: int,
                  train_on: str, tools: list[dict[str, Any]] | None) -> Encoded:
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on: expected one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if not messages or messages[-1]["role"] != "assistant":
        raise TemplateError("the last message of a training conversation must be the assistant's answer")
    limit = message_char_limit(tokenizer, max_seq_length)
    messages = [_cut(message, limit) for message in messages]
    answer_turns = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
    input_ids: list[int] = []
    labels: list[int] = []
    answers: list[tuple[int, int]] = []  # [start, end) of each answer in input_ids
    reasoning_dropped = 0
    previous: tuple[list[int], list[int], Message] | None = None  # the last turn's prompt and answer, as rendered
    for number, k in enumerate(answer_turns, 1):
        prompt_text = render_prompt(tokenizer, messages[:k], tools)
        through_text = render_conversation(tokenizer, messages[:k + 1], tools)
        if number == 1 and tools:
            _require_tools_rendered(tokenizer, messages[:k], tools, prompt_text)
        _require_results_rendered(tokenizer, messages[:k], prompt_text)
        prompt = encode_prompt(tokenizer, prompt_text)
        through = encode_prompt(tokenizer, through_text)
        _require_prefix(tokenizer, prompt, through,
                        f"the prompt of assistant turn {number} (rendered with add_generation_prompt=True) "
                        f"is not a token prefix of the conversation through that turn")
        answer = through[len(prompt):]
        answer_text = (through_text[len(prompt_text):] if through_text.startswith(prompt_text)
                       else tokenizer.decode(answer, skip_special_tokens=False))
        reasoning_dropped += not _require_answer_rendered(tokenizer, messages[k], answer_text, number)
        if previous is None:
            new_prompt = prompt
        else:
            kept, new_prompt = _continue_after(tokenizer, *previous, prompt, number)
            cut = len(previous[1]) - kept  # what the earlier answer loses as the later turns render it
            if cut:
                del input_ids[len(input_ids) - cut:], labels[len(labels) - cut:]
                answers[-1] = (answers[-1][0], answers[-1][1] - cut)
        trained = train_on == ALL_ASSISTANT_TURNS or k == answer_turns[-1]
        labels += [IGNORE_INDEX] * len(new_prompt) + (answer if trained else [IGNORE_INDEX] * len(answer))
        input_ids += new_prompt
        answers.append((len(input_ids), len(input_ids) + len(answer)))
        input_ids += answer
        previous = (prompt, answer, messages[k])
        if len(input_ids) >= max_seq_length:
            break  # later turns would start beyond the budget (a message cut above always ends here)
    end = min(len(input_ids), max_seq_length)
    answer_ends = [answer_end for start, answer_end in answers if start < end]
    if answer_ends:
        end = min(end, answer_ends[-1])
    truncated = end < len(input_ids) or len(answers) < len(answer_turns)
    return Encoded({"input_ids": input_ids[:end], "labels": labels[:end]}, truncated, reasoning_dropped)


def _cut(message: Message, limit: int) -> Message:
    """The message with its text and reasoning cut to ``limit`` characters each."""
    return message | {key: message[key][:limit] for key in ("content", "reasoning")
                      if isinstance(message.get(key), str) and len(message[key]) > limit}


def _require_tools_rendered(tokenizer: PreTrainedTokenizerBase, messages: list[Message], tools: list[dict[str, Any]],
                            prompt_text: str) -> None:
    """UnsupportedRecord unless the tool list changes the first prompt and each tool is named in it."""
    missing = [repr(tool_name(tool)) for tool in tools if tool_name(tool) not in prompt_text]
    if missing or prompt_text == render_prompt(tokenizer, messages):
        raise UnsupportedRecord("template_drops_tools", f"{template_name(tokenizer)} does not render the tool list "
                                f"(it has no tool support): {', '.join(missing) or 'the tools'} not in the prompt")


def _require_results_rendered(tokenizer: PreTrainedTokenizerBase, before: list[Message], prompt_text: str) -> None:
    """UnsupportedRecord unless the results of the tool turns just before an answer (the last of
    ``before``) are in its prompt, as written or as a JSON string (Llama 3.1 writes them ``tojson``)."""
    for turn in reversed(before):
        if turn["role"] != "tool":
            return
        result = turn["content"].strip()
        if result not in prompt_text and json.dumps(result, ensure_ascii=False) not in prompt_text:
            raise UnsupportedRecord("template_drops_tool_results", f"{template_name(tokenizer)} does not render "
                                    f"the tool result {turn['content'][:40]!r} (it has no tool role)")


def tool_name(tool: dict[str, Any]) -> str:
    """The function name of an OpenAI-style tool or tool call (``{"type": "function", "function": {...}}``)."""
    return tool.get("function", tool)["name"]


def split_think(content: str) -> tuple[str, str]:
    """``(reasoning, answer)`` of content that opens with a ``<think>...</think>`` block."""
    head, sep, tail = content.partition("</think>")
    if not sep or "<think>" not in head:
        return "", content
    return head.split("<think>", 1)[1].strip(), tail.strip()


def _require_answer_rendered(tokenizer: PreTrainedTokenizerBase, message: Message, answer_text: str,
                             number: int) -> bool:
    """UnsupportedRecord unless the rendered answer holds the message's text and each tool call's
    name; whether it holds the message's reasoning too (True where there is none)."""
    inline_reasoning, text = split_think(message["content"])
    text = text.strip()
    missing = [f"text {text[:40]!r}"] if text and text not in answer_text else []
    missing += [f"tool call {tool_name(call)!r}" for call in message.get("tool_calls") or ()
                if tool_name(call) not in answer_text]
    if missing:
        reason = "template_drops_tool_calls" if message.get("tool_calls") else "template_drops_answer"
        raise UnsupportedRecord(reason, f"{template_name(tokenizer)} does not render the {' and the '.join(missing)} "
                                        f"of assistant turn {number}")
    reasoning = (message.get("reasoning") or inline_reasoning).strip()
    return not reasoning or reasoning in answer_text


def _continue_after(tokenizer: PreTrainedTokenizerBase, earlier_prompt: list[int], earlier_answer: list[int],
                    earlier: Message, prompt: list[int], number: int) -> tuple[int, list[int]]:
    """How many tokens of the earlier answer to keep, and the tokens of ``prompt`` to append after
    them: the next turns and the assistant header (see the module docstring)."""
    _require_prefix(tokenizer, earlier_prompt, prompt,
                    f"the prompt of assistant turn {number - 1} is not a token prefix of the prompt of assistant "
                    f"turn {number} (the template renders the conversation before an answer differently once "
                    f"more turns follow)")
    rest = prompt[len(earlier_prompt):]  # the earlier answer as the later turns see it, then the new turns
    same = next((i for i, (a, b) in enumerate(zip(earlier_answer, rest, strict=False)) if a != b),
                min(len(earlier_answer), len(rest)))
    if same == len(earlier_answer):
        return same, rest[same:]  # prefix-preserving
    # The later rendering is the earlier answer with a part left out: the longest tail of the answer
    # that continues the common head in `rest` says where the left-out part ends.
    overlap = next((m for m in range(len(earlier_answer) - same, 0, -1)
                    if rest[same:same + m] == earlier_answer[len(earlier_answer) - m:]), 0)
    history = tokenizer.decode(rest[:same + overlap], skip_special_tokens=False)
    _, text = split_think(earlier["content"])
    if text.strip() not in history:
        raise TemplateError(
            f"{template_name(tokenizer)} cannot be trained on by position: once turn {number} follows, assistant "
            f"turn {number - 1} is rendered as {history[:80]!r}, which is not its answer with a part left out")
    if overlap:
        return len(earlier_answer), rest[same + overlap:]  # a part inside the answer left out: train it as written
    return same, rest[same:]  # a tail after the end of turn left out: train the answer as the later turns see it


def encode_record(tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], max_seq_length: int,
                  system_prompt: str | None, train_on: str = ALL_ASSISTANT_TURNS) -> tuple[dict[str, list[int]], bool]:
    """:func:`encode_conversation` of a prepared record (``sft.data.prepared.read_conversations``),
    with the configured system prompt where the record has none."""
    encoded = encode_prepared(tokenizer, record, max_seq_length, system_prompt, train_on)
    return encoded.example, encoded.truncated


def encode_prepared(tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], max_seq_length: int,
                    system_prompt: str | None, train_on: str = ALL_ASSISTANT_TURNS) -> Encoded:
    """:func:`encode_record` with the count of answers trained without their reasoning."""
    return encode_turns(tokenizer, with_system_prompt(record["messages"], system_prompt), max_seq_length, train_on,
                        record.get("tools"))


def encode_records(tokenizer: PreTrainedTokenizerBase, records: list[dict[str, Any]], max_seq_length: int,
                   system_prompt: str | None, *, train_on: str = ALL_ASSISTANT_TURNS, desc: str = "tokenizing",
                   progress: bool = True) -> tuple[list[dict], EncodeStats]:
    """Encode every record, dropping (and counting) those left with no supervised token and those
    using what the template cannot render (counted by reason)."""
    stats = EncodeStats()
    examples = []
    for record in tqdm(records, desc=desc, disable=None if progress else True, leave=False):
        stats.read += 1
        try:
            encoded = encode_prepared(tokenizer, record, max_seq_length, system_prompt, train_on)
        except UnsupportedRecord as exc:
            stats.dropped_unsupported[exc.reason] = stats.dropped_unsupported.get(exc.reason, 0) + 1
            stats.dropped_ids.append(str(record.get("id", stats.read)))
            continue
        example = encoded.example
        n_supervised = sum(label != IGNORE_INDEX for label in example["labels"])
        if n_supervised == 0:
            stats.dropped_no_supervised_tokens += 1
            stats.dropped_ids.append(str(record.get("id", stats.read)))
            continue
        stats.truncated += encoded.truncated
        stats.reasoning_dropped_turns += encoded.reasoning_dropped
        stats.kept += 1
        stats.prompt_tokens += len(example["labels"]) - n_supervised
        stats.supervised_tokens += n_supervised
        examples.append(example)
    return examples, stats
