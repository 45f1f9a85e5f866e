"""Prepared records -> input_ids and labels, and the collator that batches them.

Masking is by position: prompt and response are tokenized separately and concatenated, and the
labels are -100 over exactly the prompt's positions. Masking by token id would go wrong where the
pad token is the EOS token (TinyLlama-Chat), and searching the joint tokenization for a response
marker fails silently when the marker tokenizes differently in context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sft.data.sources import DataError, describe_json_type
from sft.data.templates import encode_prompt, encode_text, record_messages, split_prompt_response

IGNORE_INDEX = -100


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


def encode_record(tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], max_seq_length: int,
                  system_prompt: str | None) -> tuple[dict[str, list[int]], bool]:
    """input_ids and labels of one record, truncated on the response side to max_seq_length,
    and whether the response was truncated.

    The response includes the end-of-turn token(s), which are supervised so the model learns to
    stop. A result whose labels are all -100 (the prompt alone fills max_seq_length) is returned
    as is; callers drop it.
    """
    prompt_text, response_text = split_prompt_response(tokenizer, record_messages(record, system_prompt))
    prompt_ids = encode_prompt(tokenizer, prompt_text)[:max_seq_length]
    full_response_ids = encode_text(tokenizer, response_text)
    response_ids = full_response_ids[:max_seq_length - len(prompt_ids)]
    example = {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }
    return example, len(response_ids) < len(full_response_ids)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a prepared JSONL file (one object per line, blank lines skipped).

    Anything unusable raises DataError naming the file, the line and, for a bad field, the field
    and what was expected: a missing file, invalid UTF-8, a line that is not JSON (or nests too
    deeply to parse), a line that is not an object, an ``instruction`` or ``output`` that is not
    a string, an ``input`` that is neither a string nor null, or text holding a lone surrogate.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; expected a prepared JSONL file")
    if not path.is_file():
        raise DataError(f"{path} not found: run `python scripts/prepare_sft_data.py` first "
                                f"(or set train_file / val_file)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line_number = exc.object.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line_number}: not valid UTF-8 ({exc.reason}); expected UTF-8 JSONL, "
                        f"as prepare_sft_data.py writes") from None
    records = []
    for line_number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_number}:{exc.colno}: not valid JSON: {exc.msg}") from None
        except RecursionError:
            raise DataError(f"{path}:{line_number}: not valid JSON: nested too deeply to parse; "
                            f"expected a JSON object of strings") from None
        except ValueError as exc:  # e.g. an integer literal longer than Python converts
            raise DataError(f"{path}:{line_number}: not valid JSON: {exc}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line_number}: expected a JSON object, got {describe_json_type(record)}")
        for key in ("instruction", "output", "input"):
            _check_text_field(path, line_number, record, key)
        records.append(record)
    return records


def _check_text_field(path: Path, line_number: int, record: dict[str, Any], key: str) -> None:
    """Raise DataError unless ``record[key]`` is usable text (``input`` may be absent or null)."""
    where = f"{path}:{line_number}: field {key!r}"
    value = record.get(key)
    if key == "input" and value is None:
        return
    if key not in record:
        raise DataError(f"{where} must be a string, but it is missing")
    if not isinstance(value, str):
        raise DataError(f"{where} must be a string, got {describe_json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where} must be valid Unicode text, but holds a lone surrogate "
                        f"(an unpaired \\ud800-\\udfff escape)") from None


def encode_records(tokenizer: PreTrainedTokenizerBase, records: list[dict[str, Any]], max_seq_length: int,
                   system_prompt: str | None, desc: str = "tokenizing",
                   progress: bool = True) -> tuple[list[dict], EncodeStats]:
    """Encode every record, dropping (and counting) those left with no supervised token."""
    stats = EncodeStats()
    examples = []
    for record in tqdm(records, desc=desc, disable=None if progress else True, leave=False):
        stats.read += 1
        example, truncated = encode_record(tokenizer, record, max_seq_length, system_prompt)
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


def shifted_labels(labels: list[int]) -> list[int]:
    """The target of each position: the next token's label within the same example, -100 at its end.

    Shifting per example (rather than over a packed row) keeps the last token of one example from
    being trained to predict the first token of the next.
    """
    return labels[1:] + [IGNORE_INDEX]


class PaddingCollator:
    """Pads a list of examples to the longest one; padding is never attended to nor supervised."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(examples), width), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
            "labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long),
            "shift_labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long),
        }
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(example["input_ids"])
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = torch.tensor(example["labels"])
            batch["shift_labels"][row, :n] = torch.tensor(shifted_labels(example["labels"]))
        return batch


class PackingCollator:
    """Concatenates a micro-batch's examples into one row with no padding at all.

    Position ids restart at 0 for each example, and the example boundaries travel with the batch
    both as tensors (``cu_seq_lens_q/k``, ``max_length_q/k``: FlashAttention's varlen API) and as
    a Python list (``packed_boundaries``, read by sft.modeling.attention without a device sync).
    """

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, Any]:
        lengths = [len(e["input_ids"]) for e in examples]
        boundaries = [0]
        for length in lengths:
            boundaries.append(boundaries[-1] + length)
        cu_seq_lens = torch.tensor(boundaries, dtype=torch.int32)
        return {
            "input_ids": torch.tensor([[t for e in examples for t in e["input_ids"]]]),
            "position_ids": torch.tensor([[p for n in lengths for p in range(n)]]),
            "labels": torch.tensor([[t for e in examples for t in e["labels"]]]),
            "shift_labels": torch.tensor([[t for e in examples for t in shifted_labels(e["labels"])]]),
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
            "packed_boundaries": boundaries,
        }
