"""Answers to many prompts at once, greedy or sampled: the one generation loop of evaluation, chat, sampling,
GRPO and benchmarks.

Prompts of different lengths are left-padded into one batch, so every row's next token lands in
the same column and one forward pass extends all rows by a token; a KV cache keeps each step to
that one new token. Position ids count only real tokens, so a left-padded prompt is seen exactly
as it would be alone. A row that ends its turn leaves the batch (its cache rows are dropped)
once a quarter of the batch has ended, so the short answers stop paying for the steps of the long
ones without a copy of the whole cache at every ending. A prompt repeated in a batch (k answers,
a GRPO group) is read once and its cache copied to its rows. On a CPU with ``varlen_sdpa``
attention the prompts' pass runs as one packed row, no padding computed, and the cache is then
re-laid as the left-padded batch. Prompts are batched in order of length, which keeps padding
small. The logits are computed for the last position only: the full [tokens, vocabulary] matrix
of a long prompt would dwarf the model's own activations. The cache writes each new token's keys
and values into spare room of a buffer that doubles when full (:class:`GrowingCache`) instead of
concatenating: transformers' DynamicCache
copies the whole cache of every layer at every step, which at a thousand tokens and a batch of
64 costs more than the model's own step on a CPU.

``batch_size=1`` is the one-at-a-time path, kept for measuring what batching buys.

:func:`generate_sampled` runs the same loop drawing each token (temperature, top-k, top-p) with a
uniform number from a generator of its own prompt, seeded by the caller: a prompt's answer
depends on its seed, not on which prompts share its batch or whether an interrupted run is
resumed. It is the one sampler of the package: `sft sample` and `sft grpo` both draw with it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicLayer

from sft.modeling.attention import VARLEN_KEYS


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

    def unpack(self, index: torch.Tensor) -> None:
        """Re-lay a cache that one packed row wrote ([1, heads, tokens, dim]) as a batch of rows:
        row i's positions are the packed positions ``index[i]`` ([rows, width])."""
        if self._buffers is None:
            return
        rows, width = index.shape
        capacity = max(2 * width, 64)
        unpacked = []
        for old in self._buffers:
            buffer = old.new_empty((rows, old.shape[1], capacity, old.shape[-1]))
            buffer[:, :, :width] = old[0][:, index].transpose(0, 1)
            unpacked.append(buffer)
        self._buffers, self._length = (unpacked[0], unpacked[1]), width
        self.keys, self.values = self._buffers[0][..., :width, :], self._buffers[1][..., :width, :]

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

    def unpack(self, index: torch.Tensor) -> None:
        """GrowingLayer.unpack for every layer."""
        for layer in self.layers:
            layer.unpack(index)


@contextmanager
def decode_layout(model: torch.nn.Module) -> Iterator[int]:
    """A context in which, on a CPU, every linear layer's weight is stored column by column (the
    transposed matrix laid out contiguously, seen as the same [out, in] matrix): the same values,
    read in the order a matmul of a few rows wants. A decoding step multiplies each weight by one
    row per answer; with the weight in its usual row-major layout the CPU's matmul for a few rows
    runs several times below its speed on the transposed layout (SmolLM2-135M's linear layers at
    16 rows: 127 ms a step against 63 ms on the 2 cores measured; at 64 rows and beyond, and for
    the thousands of rows of a training step, the two are equal). Each weight is re-laid in place,
    one at a time, so the cost is one matrix of memory at a time and two copies of the weights per
    call, not a second copy of the model. On leaving, each weight is laid out row by row again: the
    same values bit for bit (a copy), the same Parameter objects. Elsewhere (CUDA, MPS) nothing
    changes. Yields the number of weights re-laid.

    The copies are made with inference mode off, even where the caller has it on: a weight copied
    in inference mode would be an inference tensor, which a later training step could not use."""
    changed: list[tuple[torch.nn.Parameter, int]] = []
    seen: set[int] = set()
    try:
        with torch.inference_mode(False), torch.no_grad():
            for module in model.modules():
                weight = getattr(module, "weight", None)
                if (not isinstance(module, torch.nn.Linear) or not isinstance(weight, torch.nn.Parameter)
                        or id(weight) in seen or type(weight.data) is not torch.Tensor or weight.dim() != 2
                        or not weight.is_floating_point() or not weight.is_contiguous() or min(weight.shape) < 2):
                    continue  # a merged copy (sft.modeling.lora.merged_weights) comes laid out already
                seen.add(id(weight))
                data = weight.data  # a new tensor object at every access: compare with this one
                laid = laid_for_decoding(data)
                if laid is not data:
                    weight.data = laid
                    changed.append((weight, weight.data_ptr()))
        yield len(changed)
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for weight, pointer in changed:
                if weight.data_ptr() == pointer:  # still ours: nothing replaced it meanwhile
                    weight.data = weight.data.contiguous()


def laid_for_decoding(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] CPU weight as :func:`decode_layout` lays it out (the same matrix, stored
    transposed); the weight itself elsewhere, or if laid out so already."""
    if weight.device.type != "cpu" or weight.dim() != 2 or weight.stride() == (1, weight.shape[0]):
        return weight
    return weight.t().contiguous().t()


@dataclass(frozen=True)
class Answer:
    text: str
    """The decoded new tokens, special tokens and the end-of-turn marker left out, outer
    whitespace stripped."""
    finished: bool
    """Whether the answer ended its turn (an end-of-turn id) within the token budget."""
    new_tokens: int
    """Tokens generated, the end-of-turn token included."""
    token_ids: tuple[int, ...] = field(default=(), compare=False, repr=False)
    """The generated ids themselves, the end-of-turn token included: what a policy-gradient step
    scores (decoding and re-tokenizing the text need not give them back)."""


Chooser = Callable[[torch.Tensor, list[int]], torch.Tensor]
"""The next token of each live row, from the rows' last logits and their rows in the batch."""


def generate_greedy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]],
                    max_new_tokens: int, stop_ids: Sequence[int], batch_size: int = 8,
                    on_answer: Callable[[int, Answer], None] | None = None,
                    new_cache: Callable[[], Cache] = GrowingCache) -> list[Answer]:
    """Greedy answers to token-id prompts, in the prompts' order.

    ``on_answer(index, answer)`` is called as each answer completes (in completion order), so a
    caller can save answers as they come and resume after an interruption. ``new_cache`` makes
    each batch's KV cache (the benchmark compares transformers' DynamicCache).
    """
    return _generate(model, tokenizer, prompts, max_new_tokens, stop_ids, batch_size, on_answer, new_cache,
                     lambda batch: lambda logits, rows: logits.argmax(-1))


@dataclass(frozen=True)
class Sampling:
    """How a token is drawn from the model's next-token distribution."""

    temperature: float = 1.0
    """Divides the logits: below 1 sharper, above 1 flatter; must be > 0."""
    top_k: int = 0
    """Draw among the k likeliest tokens only; 0 for no limit."""
    top_p: float = 1.0
    """Draw among the likeliest tokens whose probabilities sum to top_p (nucleus); 1 for no limit."""

    def __post_init__(self) -> None:
        if not self.temperature > 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs temperature > 0, top_k >= 0 and 0 < top_p <= 1, got {self}")

    def choose(self, logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """The next token of each row of [rows, vocabulary] logits, given one uniform number in
        [0, 1) per row: the first token whose cumulative probability passes it (inverse-CDF
        sampling), counting in vocabulary order, or from the likeliest down where top_p < 1."""
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if 0 < self.top_k < probs.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            probs = probs * (logits >= kth)
            probs = probs / probs.sum(-1, keepdim=True)
        if self.top_p >= 1:
            return _inverse_cdf(probs, uniforms, None)
        # The nucleus of most rows lies within the likeliest few hundred tokens: a top-k of those
        # costs a fifteenth of sorting the whole vocabulary, which costs as much as the model's own
        # step on a CPU. The rows whose nucleus reaches further (a flat distribution) are sorted
        # whole, alone, so one of them does not make the whole batch pay. Either way the kept tokens,
        # their order and every draw are those of a full sort: the cumulative sums of a prefix are
        # the prefix of the cumulative sums.
        top, order = probs.topk(min(NUCLEUS_PREFIX, probs.shape[-1]), dim=-1)
        wide = top.cumsum(dim=-1)[:, -1] < self.top_p if top.shape[-1] < probs.shape[-1] else None
        if wide is None or not bool(wide.any()):
            return _nucleus(top, order, uniforms, self.top_p)
        chosen = torch.empty(len(probs), dtype=torch.long, device=probs.device)
        narrow = ~wide
        if bool(narrow.any()):
            chosen[narrow] = _nucleus(top[narrow], order[narrow], uniforms[narrow], self.top_p)
        chosen[wide] = _nucleus(*probs[wide].sort(dim=-1, descending=True), uniforms[wide], self.top_p)
        return chosen


NUCLEUS_PREFIX = 256
"""Likeliest tokens looked at first for top-p: a nucleus is nearly always far smaller than the vocabulary."""


def _nucleus(ordered: torch.Tensor, order: torch.Tensor, uniforms: torch.Tensor, top_p: float) -> torch.Tensor:
    """Draw from probabilities in descending order (``order`` their token ids), keeping each
    token whose likelier tokens hold less than top_p: the smallest set reaching it."""
    return _inverse_cdf(ordered * ((ordered.cumsum(dim=-1) - ordered) < top_p), uniforms, order)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """The first token of each row whose cumulative probability passes its uniform number (scaled
    to the row's total), as a vocabulary id (``order`` maps positions to ids where given)."""
    cumulative = probs.cumsum(dim=-1)
    threshold = uniforms.to(cumulative)[:, None] * cumulative[:, -1:]
    index = torch.searchsorted(cumulative, threshold, right=True).clamp(max=probs.shape[-1] - 1)
    return (index if order is None else order.gather(1, index)).squeeze(1)


def generate_sampled(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]],
                     max_new_tokens: int, stop_ids: Sequence[int], seeds: Sequence[int], sampling: Sampling,
                     batch_size: int = 8, on_answer: Callable[[int, Answer], None] | None = None,
                     new_cache: Callable[[], Cache] = GrowingCache) -> list[Answer]:
    """Sampled answers to token-id prompts, in the prompts' order; prompt i's tokens are drawn
    with uniform numbers from a CPU generator seeded by ``seeds[i]``, one number a token (repeat a
    prompt with other seeds for several answers), so an answer is the same whatever its batch and
    on every device its logits agree on. ``on_answer`` and ``new_cache`` as in :func:`generate_greedy`."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")

    def chooser(batch: list[int]) -> Chooser:
        generators = [torch.Generator().manual_seed(seeds[index]) for index in batch]

        def choose(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
            uniforms = torch.cat([torch.rand(1, generator=generators[row]) for row in rows])
            return sampling.choose(logits, uniforms.to(logits.device))
        return choose

    return _generate(model, tokenizer, prompts, max_new_tokens, stop_ids, batch_size, on_answer, new_cache, chooser)


def _generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]],
              max_new_tokens: int, stop_ids: Sequence[int], batch_size: int,
              on_answer: Callable[[int, Answer], None] | None, new_cache: Callable[[], Cache],
              chooser: Callable[[list[int]], Chooser]) -> list[Answer]:
    """Answers in batches of prompts of similar length; ``chooser(batch)`` gives the token
    choice of a batch (its prompt indices)."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    answers: list[Answer | None] = [None] * len(prompts)

    with decode_layout(model), torch.inference_mode():
        for start in range(0, len(by_length), batch_size):
            batch = by_length[start:start + batch_size]
            for row, tokens in _decode_batch(model, [prompts[i] for i in batch], max_new_tokens, set(stop_ids),
                                             pad_id, device, new_cache(), chooser(batch)):
                ended = tokens[-1] in stop_ids
                text = tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True).strip()
                answer = answers[batch[row]] = Answer(text, ended, len(tokens), tuple(tokens))
                if on_answer is not None:
                    on_answer(batch[row], answer)
    return answers  # type: ignore[return-value]


def _prefill_packed(model: torch.nn.Module, cache: Cache, prompts: list[list[int]], device: torch.device) -> bool:
    """Whether the prompt pass runs packed: prompts of different lengths, a cache that can be
    re-laid, attention that keeps packed prompts apart (``varlen_sdpa``), on the CPU, where it
    is measured (on CUDA and MPS the padded pass stays until it is measured there)."""
    lengths = {len(p) for p in prompts}
    return (len(lengths) > 1 and isinstance(cache, GrowingCache)
            and getattr(model.config, "_attn_implementation", None) in VARLEN_KEYS
            and device.type == "cpu")


def _packed_prompt_pass(model: torch.nn.Module, cache: GrowingCache, prompts: list[list[int]],
                        device: torch.device) -> torch.Tensor:
    """The prompt pass of a batch as one packed row: no padding computed (a left-padded batch
    computes every row to the longest prompt's length: 64 IFEval prompts of 74 tokens on average
    are padded to 4x that). The cache is then re-laid as the left-padded batch the decoding steps
    extend; its padding positions hold copies of a real token's keys, which the attention mask
    hides as it hid the pad tokens' own. Returns each prompt's last logits, [prompts, vocabulary]."""
    lengths = [len(p) for p in prompts]
    boundaries = [0, *itertools.accumulate(lengths)]
    input_ids = torch.tensor([[t for p in prompts for t in p]], device=device)
    position_ids = torch.tensor([[i for n in lengths for i in range(n)]], device=device)
    last = torch.tensor(boundaries[1:], device=device) - 1
    logits = model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True,
                   packed_boundaries=boundaries, logits_to_keep=last).logits[0]
    width = max(lengths)
    # row i, column j holds packed position end_i - width + j; padding columns repeat the row's first token
    offsets = torch.arange(width, device=device) - width
    index = (torch.tensor(boundaries[1:], device=device)[:, None] + offsets)
    index = torch.maximum(index, torch.tensor(boundaries[:-1], device=device)[:, None])
    cache.unpack(index)
    return logits


def _decode_batch(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int],
                  pad_id: int, device: torch.device, cache: Cache,
                  choose: Chooser) -> Iterator[tuple[int, list[int]]]:
    """Decode one left-padded batch, yielding (row, new tokens) as each row completes.

    A prompt that appears several times in the batch (k answers to one prompt, a GRPO group) is
    read once: its keys, values and last logits are copied to each of its rows after the prompt
    pass, which is most of the work of short answers to long prompts."""
    distinct: dict[tuple[int, ...], int] = {}
    first = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    unique = [list(p) for p in distinct]
    width = max(len(p) for p in unique)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in unique], device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if _prefill_packed(model, cache, unique, device):
        logits = _packed_prompt_pass(model, cache, unique, device)
    else:
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in unique], device=device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    if len(unique) < len(prompts):
        rows_of = torch.tensor(first, device=device)
        cache.batch_select_indices(rows_of)
        logits, attention_mask, position_ids = logits[rows_of], attention_mask[rows_of], position_ids[rows_of]
    rows: list[int | None] = list(range(len(prompts)))  # the prompt row of each batch slot; None: ended
    tokens: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        live = [slot for slot, row in enumerate(rows) if row is not None]
        chosen = choose(logits[live] if len(live) < len(rows) else logits, [rows[slot] for slot in live]).tolist()
        next_ids = [pad_id] * len(rows)
        for slot, token in zip(live, chosen):
            row = rows[slot]
            tokens[row].append(token)
            if token in stop_ids or step == max_new_tokens - 1:
                yield row, tokens[row]
                rows[slot] = None
            else:
                next_ids[slot] = token
        live = [slot for slot, row in enumerate(rows) if row is not None]
        if not live:
            return
        # Dropping ended rows copies every layer's cache, the largest tensors here: done once a
        # quarter of the rows have ended, not at every ending, the ended rows meanwhile decoding
        # padding that nothing reads (rows never see each other, so the live rows' tokens are the same).
        ids = torch.tensor(next_ids, device=device)
        if 4 * (len(rows) - len(live)) >= len(rows):
            keep = torch.tensor(live, device=device)
            cache.batch_select_indices(keep)
            ids, attention_mask, position_ids = ids[keep], attention_mask[keep], position_ids[keep]
            rows = [rows[slot] for slot in live]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
        logits = model(input_ids=ids[:, None], attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
