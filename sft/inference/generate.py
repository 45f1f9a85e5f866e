"""Greedy answers to many prompts at once: the one generation loop of evaluation, chat and benchmarks.

Prompts of different lengths are left-padded into one batch, so every row's next token lands in
the same column and one forward pass extends all rows by a token; a KV cache keeps each step to
that one new token. Position ids count only real tokens, so a left-padded prompt is seen exactly
as it would be alone. A row that ends its turn leaves the batch at once (its cache rows are
dropped), so the short answers stop paying for the steps of the long ones. Prompts are batched
in order of length, which keeps padding small. The logits are computed for the last position
only: the full [tokens, vocabulary] matrix of a long prompt would dwarf the model's own
activations. The cache writes each new token's keys and values into spare room of a buffer that
doubles when full (:class:`GrowingCache`) instead of concatenating: transformers' DynamicCache
copies the whole cache of every layer at every step, which at a thousand tokens and a batch of
64 costs more than the model's own step on a CPU.

``batch_size=1`` is the one-at-a-time path, kept for measuring what batching buys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicLayer

from sft.data.templates import Message, encode_prompt, render_prompt
from sft.data.tokenize import message_char_limit


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of a larger buffer: appending a token writes
    it in place, and only a full buffer is copied (into one twice as large), so the copies over a
    whole answer cost about two cache sizes instead of one per step."""

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None
    _length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_length = self._length + key_states.shape[-2]
        if self._buffers is None or new_length > self._buffers[0].shape[-2]:
            capacity = max(2 * new_length, 64)
            grown = []
            for old, states in zip(self._buffers or (None, None), (key_states, value_states), strict=True):
                buffer = states.new_empty((*states.shape[:-2], capacity, states.shape[-1]))
                if old is not None:
                    buffer[..., :self._length, :] = old[..., :self._length, :]
                grown.append(buffer)
            self._buffers = (grown[0], grown[1])
        keys, values = self._buffers
        keys[..., self._length:new_length, :] = key_states
        values[..., self._length:new_length, :] = value_states
        self._length = new_length
        self.keys, self.values = keys[..., :new_length, :], values[..., :new_length, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._buffers is not None:
            self._buffers = (self._buffers[0][indices], self._buffers[1][indices])
            self.keys, self.values = self._buffers[0][..., :self._length, :], self._buffers[1][..., :self._length, :]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("GrowingLayer is for greedy decoding, which never crops")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("GrowingLayer is for greedy decoding, which never repeats rows")

    def reset(self) -> None:
        self._buffers, self._length = None, 0
        super().reset()


class GrowingCache(Cache):
    """A cache of :class:`GrowingLayer`, one per decoder layer, created as the layers first write."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=GrowingLayer)


def generation_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message], positions: int | None,
                      tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The token ids generation starts from for ``messages`` (and the conversation's ``tools``),
    built by training's prompt code.

    As training does, a message is cut before tokenizing at the characters that can matter within
    ``positions`` tokens (:func:`~sft.data.tokenize.message_char_limit`): a cut prompt is still
    longer than the model's positions, so the callers' length checks refuse it as before, but a
    record of a hundred megabytes costs no more than that to refuse.
    """
    if positions is not None:
        limit = message_char_limit(tokenizer, positions)
        messages = [m | {"content": m["content"][:limit]} if isinstance(m.get("content"), str)
                    and len(m["content"]) > limit else m for m in messages]
    return encode_prompt(tokenizer, render_prompt(tokenizer, messages, tools))


@dataclass(frozen=True)
class Answer:
    text: str
    """The decoded new tokens, special tokens and the end-of-turn marker left out, outer
    whitespace stripped."""
    finished: bool
    """Whether the answer ended its turn (an end-of-turn id) within the token budget."""
    new_tokens: int
    """Tokens generated, the end-of-turn token included."""


def generate_greedy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]],
                    max_new_tokens: int, stop_ids: Sequence[int], batch_size: int = 8,
                    on_answer: Callable[[int, Answer], None] | None = None,
                    new_cache: Callable[[], Cache] = GrowingCache) -> list[Answer]:
    """Greedy answers to token-id prompts, in the prompts' order.

    ``on_answer(index, answer)`` is called as each answer completes (in completion order), so a
    caller can save answers as they come and resume after an interruption. ``new_cache`` makes
    each batch's KV cache (the benchmark compares transformers' DynamicCache).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    answers: list[Answer | None] = [None] * len(prompts)

    with torch.inference_mode():
        for start in range(0, len(by_length), batch_size):
            batch = by_length[start:start + batch_size]
            for row, tokens in _decode_batch(model, [prompts[i] for i in batch], max_new_tokens, set(stop_ids),
                                             pad_id, device, new_cache()):
                ended = tokens[-1] in stop_ids
                text = tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True).strip()
                answer = answers[batch[row]] = Answer(text, ended, len(tokens))
                if on_answer is not None:
                    on_answer(batch[row], answer)
    return answers  # type: ignore[return-value]


def _decode_batch(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int],
                  pad_id: int, device: torch.device, cache: Cache,
                  pick: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None
                  ) -> Iterator[tuple[int, list[int]]]:
    """Decode one left-padded batch, yielding (row, new tokens) as each row completes. Greedy, or
    ``pick(last logits [live rows, vocab], the prompt row of each live row)`` chooses the next ids
    (a sampler: sft.training.grpo_sampling)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    rows = list(range(len(prompts)))  # the prompt row of each live batch slot
    tokens: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        next_ids = logits.argmax(-1) if pick is None else pick(logits, rows)
        live = []
        for slot, (row, token) in enumerate(zip(rows, next_ids.tolist())):
            tokens[row].append(token)
            if token in stop_ids or step == max_new_tokens - 1:
                yield row, tokens[row]
            else:
                live.append(slot)
        if not live:
            return
        if len(live) < len(rows):
            keep = torch.tensor(live, device=device)
            cache.batch_select_indices(keep)
            next_ids, attention_mask, position_ids = next_ids[keep], attention_mask[keep], position_ids[keep]
            rows = [rows[slot] for slot in live]
        input_ids = next_ids[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
