"""sft.data.tokenize: exact label masks, truncation, dropping, JSONL reading, padding; sft.loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from sft.data.sources import DataError
from sft.data.tokenize import IGNORE_INDEX, PaddingCollator, encode_record, encode_records, read_jsonl
from sft.training.loss import supervised_nll_sum
from tests.tiny import alpaca_records, write_jsonl

SMOLLM_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                 "Hugging Face<|im_end|>\n")
RECORD = {"id": "r1", "instruction": "Add the numbers.", "input": "2 and 3",
          "output": "The sum of two and three is five.", "source": "test"}
# Rendered prompt and response of RECORD without a system prompt, written out by hand.
RENDERED = {
    "chatml": (SMOLLM_SYSTEM + "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n"
               "<|im_start|>assistant\n",
               "The sum of two and three is five.<|im_end|>\n"),
    "zephyr": ("<|user|>\nAdd the numbers.\n\n2 and 3</s>\n<|assistant|>\n",
               "The sum of two and three is five.</s>\n"),
}


def tokenizer_of(request: pytest.FixtureRequest, kind: str) -> PreTrainedTokenizerFast:
    return request.getfixturevalue(f"{kind}_tokenizer")


def expected_ids(tokenizer: PreTrainedTokenizerFast, kind: str) -> tuple[list[int], list[int]]:
    """Prompt ids (with the BOS the model expects) and response ids of RECORD, by hand."""
    prompt_text, response_text = RENDERED[kind]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    if kind == "zephyr":
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    return prompt_ids, tokenizer(response_text, add_special_tokens=False).input_ids


def n_supervised(labels: list[int]) -> int:
    return sum(label != IGNORE_INDEX for label in labels)


@pytest.mark.parametrize("kind", ["chatml", "zephyr"])
def test_labels_mask_exactly_the_prompt(request, kind: str) -> None:
    tokenizer = tokenizer_of(request, kind)
    prompt_ids, response_ids = expected_ids(tokenizer, kind)
    example, truncated = encode_record(tokenizer, RECORD, max_seq_length=256, system_prompt=None)
    assert truncated is False
    assert example["input_ids"] == prompt_ids + response_ids
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert example["labels"].count(IGNORE_INDEX) == len(prompt_ids)
    assert n_supervised(example["labels"]) == len(response_ids)


def test_chatml_supervises_im_end_and_the_newline_after_it(chatml_tokenizer) -> None:
    example, _ = encode_record(chatml_tokenizer, RECORD, 256, None)
    im_end = chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    (newline,) = chatml_tokenizer("\n", add_special_tokens=False).input_ids
    assert example["labels"][-2:] == [im_end, newline]
    # The default SmolLM2 system prompt is part of the (masked) prompt.
    prompt_len = len(chatml_tokenizer(RENDERED["chatml"][0], add_special_tokens=False).input_ids)
    system_len = len(chatml_tokenizer(SMOLLM_SYSTEM, add_special_tokens=False).input_ids)
    assert example["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example["input_ids"][:system_len] == chatml_tokenizer(SMOLLM_SYSTEM, add_special_tokens=False).input_ids


def test_chatml_has_no_added_bos(chatml_tokenizer) -> None:
    example, _ = encode_record(chatml_tokenizer, RECORD, 256, None)
    im_start = chatml_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert example["input_ids"].count(im_start) == 3  # system, user, assistant headers only


def test_zephyr_supervises_eos_though_pad_is_eos(zephyr_tokenizer) -> None:
    tokenizer = zephyr_tokenizer
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    example, _ = encode_record(tokenizer, RECORD, 256, None)
    prompt_ids, _ = expected_ids(tokenizer, "zephyr")
    (newline,) = tokenizer("\n", add_special_tokens=False).input_ids
    assert example["labels"][-2:] == [eos, newline]
    eos_positions = [i for i, t in enumerate(example["input_ids"]) if t == eos]
    in_prompt = [i for i in eos_positions if i < len(prompt_ids)]
    in_response = [i for i in eos_positions if i >= len(prompt_ids)]
    assert len(in_prompt) == 1 and len(in_response) == 1  # end of user turn, end of answer
    assert all(example["labels"][i] == IGNORE_INDEX for i in in_prompt)
    assert all(example["labels"][i] == eos for i in in_response)


def test_zephyr_has_exactly_one_bos_at_position_0(zephyr_tokenizer) -> None:
    example, _ = encode_record(zephyr_tokenizer, RECORD, 256, "Be brief.")
    bos = zephyr_tokenizer.bos_token_id
    assert example["input_ids"].count(bos) == 1
    assert example["input_ids"][0] == bos
    assert example["labels"][0] == IGNORE_INDEX


@pytest.mark.parametrize("kind", ["chatml", "zephyr"])
def test_truncation_keeps_the_prompt_and_cuts_the_response(request, kind: str) -> None:
    tokenizer = tokenizer_of(request, kind)
    prompt_ids, response_ids = expected_ids(tokenizer, kind)
    assert len(response_ids) >= 4
    max_len = len(prompt_ids) + len(response_ids) - 3
    example, truncated = encode_record(tokenizer, RECORD, max_len, None)
    assert truncated is True
    assert len(example["input_ids"]) == len(example["labels"]) == max_len
    assert example["input_ids"] == prompt_ids + response_ids[:-3]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids[:-3]


@pytest.mark.parametrize("kind", ["chatml", "zephyr"])
def test_exact_fit_is_not_truncated(request, kind: str) -> None:
    tokenizer = tokenizer_of(request, kind)
    prompt_ids, response_ids = expected_ids(tokenizer, kind)
    example, truncated = encode_record(tokenizer, RECORD, len(prompt_ids) + len(response_ids), None)
    assert truncated is False
    assert example["input_ids"] == prompt_ids + response_ids


@pytest.mark.parametrize("cut", [0, 5])
@pytest.mark.parametrize("kind", ["chatml", "zephyr"])
def test_prompt_filling_max_length_leaves_no_supervised_token(request, kind: str, cut: int) -> None:
    tokenizer = tokenizer_of(request, kind)
    prompt_ids, _ = expected_ids(tokenizer, kind)
    max_len = len(prompt_ids) - cut
    example, truncated = encode_record(tokenizer, RECORD, max_len, None)
    assert truncated is True
    assert example["input_ids"] == prompt_ids[:max_len]
    assert example["labels"] == [IGNORE_INDEX] * max_len
    assert n_supervised(example["labels"]) == 0


def test_encode_records_drops_and_counts_on_a_designed_set(zephyr_tokenizer) -> None:
    tokenizer, max_len = zephyr_tokenizer, 64
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
    short = [{"id": f"short{i}", "instruction": f"Say {i}.", "input": "", "output": "Okay."} for i in range(3)]
    long_answer = [{"id": f"answer{i}", "instruction": f"Tell {i}.", "input": "", "output": long_text}
                   for i in range(2)]
    long_prompt = [{"id": f"prompt{i}", "instruction": f"Read {i}.", "input": long_text, "output": "Done."}
                   for i in range(2)]
    records = [short[0], long_prompt[0], long_answer[0], short[1], long_prompt[1], short[2], long_answer[1]]
    # The design holds for this tokenizer: shorts fit, long answers overflow, long prompts fill.
    assert len(tokenizer("<|user|>\nSay 0.</s>\n<|assistant|>\nOkay.</s>\n").input_ids) < max_len
    assert len(tokenizer("<|user|>\nTell 0.</s>\n<|assistant|>\n").input_ids) < max_len
    assert len(tokenizer(long_text, add_special_tokens=False).input_ids) > max_len
    examples, stats = encode_records(tokenizer, records, max_len, None)
    assert (stats.read, stats.kept, stats.dropped_no_supervised_tokens, stats.truncated) == (7, 5, 2, 2)
    assert stats.read == stats.kept + stats.dropped_no_supervised_tokens
    assert stats.dropped_ids == ["prompt0", "prompt1"]
    assert len(examples) == 5
    assert [len(e["input_ids"]) for e in examples][1] == max_len  # answer0, cut to max_len
    assert [len(e["input_ids"]) for e in examples][4] == max_len  # answer1
    assert stats.supervised_tokens == sum(n_supervised(e["labels"]) for e in examples)
    assert stats.prompt_tokens == sum(e["labels"].count(IGNORE_INDEX) for e in examples)
    kept_in_order = [r for r in records if not r["id"].startswith("prompt")]
    assert examples == [encode_record(tokenizer, r, max_len, None)[0] for r in kept_in_order]
    assert stats.as_dict()["dropped_ids"] == ["prompt0", "prompt1"]


def test_encode_records_keeps_everything_that_fits(chatml_tokenizer) -> None:
    records = alpaca_records(12)
    examples, stats = encode_records(chatml_tokenizer, records, 256, None)
    assert (stats.read, stats.kept, stats.dropped_no_supervised_tokens, stats.truncated) == (12, 12, 0, 0)
    assert stats.dropped_ids == []
    assert all(e["labels"][-2] == chatml_tokenizer.eos_token_id for e in examples)


def test_alpaca_records_are_distinct_and_deterministic() -> None:
    records = alpaca_records(30)
    assert records == alpaca_records(30)
    assert len({r["id"] for r in records}) == len({(r["instruction"], r["input"]) for r in records}) == 30
    assert {len(r["output"].split()) for r in records} <= set(range(1, 41))
    assert min(len(r["output"].split()) for r in records) == 1
    assert max(len(r["output"].split()) for r in records) == 40
    assert sum(bool(r["input"]) for r in records) == 10
    assert all(set(r) == {"id", "instruction", "input", "output", "source"} for r in records)


# --- read_jsonl ---------------------------------------------------------------------------------

def test_read_jsonl_round_trips_records_and_skips_blank_lines(tmp_path: Path) -> None:
    records = alpaca_records(4) + [{"instruction": "Übersetze 日本語 🙂", "output": "ok"}]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    path.write_text(path.read_text(encoding="utf-8") + "\n   \n", encoding="utf-8")
    assert read_jsonl(path) == records


def test_read_jsonl_names_file_and_line_of_broken_json(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:3:")
    assert "not valid JSON" in str(info.value)


@pytest.mark.parametrize("field, bad", [("instruction", 5), ("output", None), ("output", ["a"])])
def test_read_jsonl_names_file_line_and_field_of_a_non_string(tmp_path: Path, field: str, bad) -> None:
    record = {"instruction": "a", "output": "b"} | {field: bad}
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "x", "output": "y"}, record])
    with pytest.raises(DataError, match=f"field '{field}' must be a string") as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:2:")


def test_read_jsonl_missing_output_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "x"}])
    with pytest.raises(DataError, match="field 'output' must be a string") as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:1:")


@pytest.mark.parametrize("line", ['["instruction", "output"]', "null"])
def test_read_jsonl_rejects_a_line_that_is_not_an_object(tmp_path: Path, line: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:2:")


def test_read_jsonl_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="not found") as info:
        read_jsonl(path)
    assert str(path) in str(info.value)


# --- PaddingCollator ----------------------------------------------------------------------------

def toy_example(n: int, first_label: int) -> dict[str, list[int]]:
    return {"input_ids": list(range(10, 10 + n)),
            "labels": [IGNORE_INDEX] * first_label + list(range(10 + first_label, 10 + n))}


def test_collator_pads_to_a_multiple_of_8() -> None:
    examples = [toy_example(5, 2), toy_example(11, 4), toy_example(3, 1)]
    batch = PaddingCollator(pad_token_id=7)(examples)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (3, 16), "attention_mask": (3, 16), "labels": (3, 16), "shift_labels": (3, 16)}
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 11, 3]
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert batch["input_ids"][row].tolist() == example["input_ids"] + [7] * (16 - n)
        assert batch["labels"][row].tolist() == example["labels"] + [IGNORE_INDEX] * (16 - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (16 - n)


@pytest.mark.parametrize("longest, multiple, width", [(16, 8, 16), (17, 8, 24), (9, 1, 9), (1, 8, 8)])
def test_collator_width(longest: int, multiple: int, width: int) -> None:
    batch = PaddingCollator(0, pad_to_multiple_of=multiple)([toy_example(longest, 0), toy_example(1, 0)])
    assert tuple(batch["input_ids"].shape) == (2, width)


def test_collator_keeps_real_eos_labels_when_pad_is_eos(zephyr_tokenizer) -> None:
    tokenizer = zephyr_tokenizer
    eos = tokenizer.eos_token_id
    examples, _ = encode_records(tokenizer, alpaca_records(3), 256, None)
    batch = PaddingCollator(tokenizer.pad_token_id)(examples)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= max(len(e["input_ids"]) for e in examples)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert batch["input_ids"][row, n:].tolist() == [eos] * (width - n)
        assert batch["labels"][row, :n].tolist() == example["labels"]
        assert batch["labels"][row, n:].tolist() == [IGNORE_INDEX] * (width - n)
        # The answer's </s> (then "\n") stays supervised; padding </s> is not.
        assert batch["labels"][row, n - 2].item() == eos
        assert (batch["labels"][row] == eos).sum().item() == 1


# --- supervised_nll_sum -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_and_tokenizer(tiny_model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def reference_nll(model, examples: list[dict[str, list[int]]]) -> tuple[float, int]:
    """Per-example, unpadded: cross-entropy of the full logits at each supervised position."""
    total, count = 0.0, 0
    for example in examples:
        input_ids = torch.tensor([example["input_ids"]])
        with torch.no_grad():
            log_probs = F.log_softmax(model(input_ids=input_ids).logits[0].double(), dim=-1)
        for t in range(1, len(example["labels"])):
            target = example["labels"][t]
            if target != IGNORE_INDEX:
                total -= log_probs[t - 1, target].item()
                count += 1
    return total, count


def test_supervised_nll_sum_matches_a_per_example_reference(tiny_model_and_tokenizer) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    examples, _ = encode_records(tokenizer, alpaca_records(4), 256, None)
    batch = PaddingCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        nll, count = supervised_nll_sum(model, batch)
    expected_nll, expected_count = reference_nll(model, examples)
    assert count == expected_count == sum(n_supervised(e["labels"]) for e in examples)
    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert nll.item() == pytest.approx(expected_nll, abs=1e-4)


def test_supervised_nll_sum_ignores_a_label_at_position_0(tiny_model_and_tokenizer) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    ids = tokenizer("Blue sky and green tea.", add_special_tokens=False).input_ids
    examples = [{"input_ids": ids, "labels": list(ids)},  # every position supervised, 0 included
                {"input_ids": ids[:4], "labels": [IGNORE_INDEX, IGNORE_INDEX] + ids[2:4]}]
    batch = PaddingCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        nll, count = supervised_nll_sum(model, batch)
    expected_nll, expected_count = reference_nll(model, examples)
    assert count == expected_count == (len(ids) - 1) + 2
    assert nll.item() == pytest.approx(expected_nll, abs=1e-4)
