"""Pair tokenization: one prompt shared by both answers, one BOS, one end-of-turn, one budget."""

from __future__ import annotations

import pytest

from sft.data.pairs import encode_pair, encode_pairs
from sft.data.templates import encode_prompt, ensure_chat_template, render_prompt, with_system_prompt
from tests.tiny import build_tokenizer
from tests.training.tiny_pairs import preference_records

KINDS = ["chatml", "zephyr", "llama-spm", "plain"]


@pytest.fixture(scope="module", params=KINDS)
def tokenizer(request: pytest.FixtureRequest):
    tokenizer = build_tokenizer(request.param)
    ensure_chat_template(tokenizer)  # plain: the fallback template
    return tokenizer


def _end_of_turn(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() \
        else tokenizer.eos_token_id


@pytest.mark.parametrize("index", range(10))
def test_both_answers_continue_the_prompt_generation_sees(tokenizer, index: int) -> None:
    pair = preference_records(10)[index]
    encoded, truncated = encode_pair(tokenizer, pair, 512, None)
    assert not truncated
    assert encoded["prompt_ids"] == encode_prompt(tokenizer, render_prompt(tokenizer, pair["prompt"]))
    end = _end_of_turn(tokenizer)
    for side in ("chosen", "rejected"):
        answer = encoded[f"{side}_ids"]
        sequence = encoded["prompt_ids"] + answer
        assert answer.count(end) == 1, tokenizer.convert_ids_to_tokens(answer)
        assert answer[-1] == end or tokenizer.decode(answer[answer.index(end) + 1:]).strip() == ""
        if tokenizer.bos_token_id is not None and tokenizer.bos_token != "<|im_start|>":
            assert sequence.count(tokenizer.bos_token_id) == 1
            assert sequence[0] == tokenizer.bos_token_id
        assert tokenizer.decode(answer, skip_special_tokens=True).strip() == pair[side]


def test_a_chatml_pair_token_by_token(chatml_tokenizer) -> None:
    pair = {"prompt": [{"role": "user", "content": "Name a colour."}], "chosen": "Blue.", "rejected": "No."}
    encoded, _ = encode_pair(chatml_tokenizer, pair, 512, None)
    tokens = {side: chatml_tokenizer.convert_ids_to_tokens(encoded[f"{side}_ids"]) for side in ("chosen", "rejected")}
    assert tokens["chosen"][-2:] == tokens["rejected"][-2:] == ["<|im_end|>", "Ċ"]
    assert chatml_tokenizer.decode(encoded["prompt_ids"]).endswith("Name a colour.<|im_end|>\n<|im_start|>assistant\n")


def test_both_answers_are_cut_to_the_same_budget(chatml_tokenizer) -> None:
    long_text = " ".join(["the quick brown fox"] * 40)
    pair = {"prompt": [{"role": "user", "content": "Say it."}], "chosen": long_text, "rejected": long_text + " again",
            "id": "long"}
    short = {"prompt": pair["prompt"], "chosen": long_text, "rejected": "Short.", "id": "mixed"}
    full, _ = encode_pair(chatml_tokenizer, pair, 4096, None)
    prompt_length = len(full["prompt_ids"])
    max_seq_length = prompt_length + 20
    cut, truncated = encode_pair(chatml_tokenizer, pair, max_seq_length, None)
    assert truncated
    assert cut["prompt_ids"] == full["prompt_ids"]  # the prompt is kept whole
    assert cut["chosen_ids"] == full["chosen_ids"][:20] and cut["rejected_ids"] == full["rejected_ids"][:20]
    mixed, truncated = encode_pair(chatml_tokenizer, short, max_seq_length, None)
    assert truncated and len(mixed["chosen_ids"]) == 20
    assert mixed["rejected_ids"] == encode_pair(chatml_tokenizer, short, 4096, None)[0]["rejected_ids"]
    examples, stats = encode_pairs(chatml_tokenizer, [pair, short], max_seq_length, None, progress=False)
    # The long pair's answers differ only beyond the cut: it carries no preference and is dropped.
    assert (stats.read, stats.kept, stats.truncated, stats.dropped_no_answer_tokens) == (2, 1, 1, 0)
    assert stats.dropped_identical_after_truncation == 1 and [e["id"] for e in examples] == ["mixed"]
    assert stats.chosen_tokens == 20 and stats.rejected_tokens == len(mixed["rejected_ids"])


def test_a_pair_with_no_answer_token_left_is_dropped_and_counted(chatml_tokenizer) -> None:
    pairs = preference_records(3)
    pairs[1] = pairs[1] | {"prompt": [{"role": "user", "content": "word " * 200}], "id": "huge-prompt"}
    examples, stats = encode_pairs(chatml_tokenizer, pairs, 64, None, progress=False)
    assert (stats.read, stats.kept, stats.dropped_no_answer_tokens) == (3, 2, 1)
    assert stats.dropped_ids == ["huge-prompt"]
    assert len(examples) == 2 and all(e["chosen_ids"] and e["rejected_ids"] for e in examples)


def test_system_prompt_is_added_only_where_a_pair_has_none(zephyr_tokenizer) -> None:
    plain, with_own = preference_records(4)[2], preference_records(4)[3]
    assert with_own["prompt"][0]["role"] == "system"
    for pair in (plain, with_own):
        encoded, _ = encode_pair(zephyr_tokenizer, pair, 512, "Answer in French.")
        expected = with_system_prompt(pair["prompt"], "Answer in French.")
        assert encoded["prompt_ids"] == encode_prompt(zephyr_tokenizer, render_prompt(zephyr_tokenizer, expected))
    assert "Answer in French." not in zephyr_tokenizer.decode(encode_pair(zephyr_tokenizer, with_own, 512,
                                                                          "Answer in French.")[0]["prompt_ids"])


def test_an_earlier_exchange_is_prompt_and_only_the_last_answer_is_scored(chatml_tokenizer) -> None:
    pair = preference_records(5)[4]
    assert [m["role"] for m in pair["prompt"]] == ["user", "assistant", "user"]
    encoded, _ = encode_pair(chatml_tokenizer, pair, 512, None)
    assert "Hi, how can I help?" in chatml_tokenizer.decode(encoded["prompt_ids"])
    assert chatml_tokenizer.decode(encoded["chosen_ids"]) == pair["chosen"] + "<|im_end|>\n"
