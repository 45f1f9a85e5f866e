"""The batched greedy loop gives the answers of one-at-a-time decoding and of transformers' generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.modeling.generate import Answer, generate_greedy

PROMPTS = ["the quick brown fox", "a", "jumps over the lazy dog while birds sing in the warm evening light",
           "river runs past the old mill", "sea"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def reference_tokens(model, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
    """transformers' own greedy generate, one prompt, cut after the first stop id."""
    output = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=0)
    new = output[0, len(prompt_ids):].tolist()
    for position, token in enumerate(new):
        if token in stop_ids:
            return new[:position + 1]
    return new


def test_batched_equals_one_at_a_time_and_transformers_generate(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    free_run = [reference_tokens(model, p, 12, stop_ids=[-1]) for p in prompts]
    # Stop ids the random model really emits, at different steps for different prompts, so rows
    # leave the batch at different times and some run to the token budget.
    stop_ids = sorted({free_run[0][3], free_run[2][6]})
    expected = [reference_tokens(model, p, 12, stop_ids) for p in prompts]
    assert len({len(tokens) for tokens in expected}) > 1

    batched = generate_greedy(model, tokenizer, prompts, 12, stop_ids, batch_size=4)
    one_at_a_time = generate_greedy(model, tokenizer, prompts, 12, stop_ids, batch_size=1)

    assert batched == one_at_a_time
    for answer, tokens in zip(batched, expected):
        ended = tokens[-1] in stop_ids
        assert answer == Answer(tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True).strip(),
                                finished=ended, new_tokens=len(tokens))


def test_each_answer_is_reported_once_as_it_completes(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    reported: list[tuple[int, Answer]] = []
    answers = generate_greedy(model, tokenizer, prompts, 5, [tokenizer.eos_token_id], batch_size=2,
                              on_answer=lambda index, answer: reported.append((index, answer)))
    assert sorted(index for index, _ in reported) == list(range(len(PROMPTS)))
    assert all(answers[index] == answer for index, answer in reported)
    assert all(answer.new_tokens == 5 and not answer.finished for answer in answers)


def test_long_answers_grow_the_cache_and_still_equal_transformers_generate(model_and_tokenizer) -> None:
    """100 new tokens after prompts of 1 to 13: every row's cache outgrows its first buffer (64
    positions) at least once, and rows leave the batch between growths."""
    from sft.modeling.generate import GrowingCache

    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    free_run = [reference_tokens(model, p, 100, stop_ids=[-1]) for p in prompts]
    stop_ids = sorted({free_run[1][40], free_run[3][75]} - set(free_run[0]))
    expected = [reference_tokens(model, p, 100, stop_ids) for p in prompts]
    assert len({len(tokens) for tokens in expected}) > 1 and max(map(len, expected)) == 100

    batched = generate_greedy(model, tokenizer, prompts, 100, stop_ids, batch_size=5)
    for answer, tokens in zip(batched, expected):
        assert answer.new_tokens == len(tokens)
        assert answer.text == tokenizer.decode(tokens[:-1] if tokens[-1] in stop_ids else tokens,
                                               skip_special_tokens=True).strip()

    cache = GrowingCache()
    with torch.inference_mode():
        model(input_ids=torch.tensor([prompts[2]]), past_key_values=cache, use_cache=True)
        for _ in range(70):
            model(input_ids=torch.tensor([[5]]), past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.keys.shape[-2] == len(prompts[2]) + 70 and layer._buffers[0].shape[-2] >= layer.keys.shape[-2]


def test_ended_rows_leave_the_batch_a_quarter_at_a_time(model_and_tokenizer, monkeypatch) -> None:
    """In a batch of 10, rows end at different steps; an ended row keeps its slot (decoding padding
    nothing reads) until a quarter of the batch has ended, and the live rows' answers are those of
    transformers' generate run alone."""
    from sft.modeling.generate import GrowingLayer

    model, tokenizer = model_and_tokenizer
    words = "the quick brown fox jumps over the lazy dog while birds sing in warm evening light".split()
    prompts = [tokenizer(" ".join(words[i:i + 3 + i % 4])).input_ids for i in range(10)]
    free_run = [reference_tokens(model, p, 30, stop_ids=[-1]) for p in prompts]
    stop_ids = sorted({free_run[0][4], free_run[5][11], free_run[8][20]})
    expected = [reference_tokens(model, p, 30, stop_ids) for p in prompts]
    ends = sorted(len(tokens) for tokens in expected if tokens[-1] in stop_ids)
    assert len(set(ends)) >= 3 and len(ends) < 10  # several endings at different steps, some rows run on

    selections = []
    original = GrowingLayer.batch_select_indices
    monkeypatch.setattr(GrowingLayer, "batch_select_indices",
                        lambda self, indices: selections.append(len(indices)) or original(self, indices))
    batched = generate_greedy(model, tokenizer, prompts, 30, stop_ids, batch_size=10)
    for answer, tokens in zip(batched, expected):
        assert answer.new_tokens == len(tokens) and answer.finished == (tokens[-1] in stop_ids)
        assert answer.text == tokenizer.decode(tokens[:-1] if answer.finished else tokens,
                                               skip_special_tokens=True).strip()
    layers = len(model.model.layers)
    compactions = len(selections) // layers
    assert 0 < compactions < len(set(ends))  # fewer cache copies than steps at which rows ended
    assert all(rows < 10 for rows in selections)


def linear_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: module.weight for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


@pytest.mark.parametrize("tied", [False, True])
def test_decode_layout_lays_weights_column_major_and_puts_them_back_bit_for_bit(tied: bool) -> None:
    """Inside, each linear weight (a tied head once) is the same Parameter seen as the same matrix,
    stored transposed; the logits agree with the row-major ones to float rounding; on leaving each
    weight is row-major again with the very same bits, and none is an inference tensor although the
    caller had inference mode on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft.modeling.generate import decode_layout

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    weights = linear_weights(model)
    before = {name: weight.detach().clone() for name, weight in weights.items()}
    ids = torch.randint(0, 96, (3, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with torch.inference_mode(), decode_layout(model) as relaid:
        assert relaid == len(weights)  # 7 a layer and the head, tied or not: each Parameter once
        for name, weight in linear_weights(model).items():
            assert weight is weights[name] and weight.stride() == (1, weight.shape[0]), name
            assert torch.equal(weight, before[name]), name
        if tied:
            assert model.lm_head.weight is model.model.embed_tokens.weight
        inside = model(input_ids=ids).logits
    torch.testing.assert_close(inside, expected, rtol=1e-5, atol=1e-5)
    for name, weight in linear_weights(model).items():
        assert weight is weights[name] and weight.is_contiguous() and not weight.is_inference(), name
        assert torch.equal(weight, before[name]), name


def test_generation_leaves_a_lora_model_trainable_with_row_major_weights(tiny_model_dir: Path) -> None:
    """Answering re-lays the weights for its steps only: afterwards the base weights are contiguous
    again and equal to what they were, and a training step through the adapter runs."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.eval()
    generate_greedy(model, tokenizer, [tokenizer(p).input_ids for p in PROMPTS], 6, [tokenizer.eos_token_id],
                    batch_size=3)
    for name, p in model.named_parameters():
        assert p.is_contiguous() and torch.equal(p, before[name]), name
    model.train()
    ids = torch.tensor([tokenizer(PROMPTS[2]).input_ids])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_" in name)


def test_a_packed_prompt_pass_fills_the_cache_a_padded_one_fills(tiny_model_dir: Path, monkeypatch) -> None:
    """With varlen_sdpa the prompts of a batch run as one packed row (no padding computed) and the
    cache is re-laid as the left-padded batch: the last logits and every real position's keys
    and values equal those of the padded pass, and so do the greedy and sampled answers."""
    import sft.modeling.attention  # noqa: F401  (registers varlen_sdpa)
    from sft.modeling import generate
    from sft.modeling.generate import GrowingCache, Sampling, generate_sampled

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation="varlen_sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    assert generate._prefill_packed(model, GrowingCache(), prompts, torch.device("cpu"))
    packed_cache, padded_cache = GrowingCache(), GrowingCache()
    with torch.no_grad():
        packed = generate._packed_prompt_pass(model, packed_cache, prompts, torch.device("cpu"))
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
        padded = model(input_ids=torch.tensor([[0] * (width - len(p)) + p for p in prompts]), attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0), past_key_values=padded_cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    assert packed_cache.get_seq_length() == padded_cache.get_seq_length() == width
    for ours, theirs in zip(packed_cache.layers, padded_cache.layers):
        assert ours.keys.shape == theirs.keys.shape == (len(prompts), *theirs.keys.shape[1:])
        for row, n in enumerate(lengths):
            torch.testing.assert_close(ours.keys[row, :, width - n:], theirs.keys[row, :, width - n:], atol=1e-5,
                                       rtol=1e-5)
            torch.testing.assert_close(ours.values[row, :, width - n:], theirs.values[row, :, width - n:], atol=1e-5,
                                       rtol=1e-5)
    answers = {}
    for packing in (True, False):
        if not packing:
            monkeypatch.setattr(generate, "_prefill_packed", lambda *_: False)
        answers[packing] = (generate_greedy(model, tokenizer, prompts, 10, [-1], batch_size=5),
                            generate_sampled(model, tokenizer, prompts, 10, [-1], list(range(len(prompts))),
                                             Sampling(0.9, top_p=0.9), batch_size=5))
    assert answers[True] == answers[False]
