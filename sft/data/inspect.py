"""`sft inspect`: one training example exactly as the model sees it, the trained tokens marked.

When a fine-tune misbehaves (it never stops, echoes the prompt, answers in the wrong voice), the
first question is what it was trained on. This command tokenizes one prepared conversation with
the same code and configuration as training (the model's tokenizer and chat template, the system
prompt, ``train_on``, ``max_seq_length``) and prints it back decoded, the trained tokens in colour
on a terminal or between ``[[`` and ``]]`` otherwise, with the counts. A conversation with tools
shows the tool list where the template puts it (masked, in the prompt), each call trained and each
tool result masked; one whose tools the template cannot render is the error training would drop it
for. ``--json`` prints the token ids, the labels and the text of each maximal run of trained or
masked tokens, for scripts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Any

from transformers import PreTrainedTokenizerBase

from sft.config import SFTConfig, StrictArgumentParser, add_config_arguments, config_from_args
from sft.data.prepared import read_conversations
from sft.data.templates import ensure_chat_template
from sft.data.tokenize import IGNORE_INDEX, UnsupportedRecord, encode_prepared
from sft.errors import DataError, run_command
from sft.modeling.models import load_tokenizer, resolve_model_path

TRAINED_COLOUR, RESET = "\x1b[1;32m", "\x1b[0m"
"""Bold green for trained tokens on a terminal."""


def build_parser() -> argparse.ArgumentParser:
    parser = StrictArgumentParser(
        prog="sft inspect",
        description="Show one training example as the model sees it, trained tokens highlighted.",
        epilog="Example: sft inspect --config configs/demo.yaml --index 3 (add --json for ids, labels and "
               "segments)")
    parser.add_argument("--file", metavar="PREPARED.jsonl", help="prepared conversations (default: data.train_file)")
    parser.add_argument("--index", type=int, default=0, metavar="N",
                        help="which conversation of the file, counting from 0 (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help='print {"input_ids", "labels", "segments": [{"text", "trained"}, ...]} instead')
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: print(inspect_example(config_from_args(args), args.file, args.index, args.json,
                                                     colour=_use_colour())))


def _use_colour() -> bool:
    """Colour on a terminal unless NO_COLOR is set (no-color.org); marks when piped."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def segments(tokenizer: PreTrainedTokenizerBase, example: dict[str, list[int]]) -> list[dict[str, Any]]:
    """The maximal runs of trained or masked tokens, each decoded with its special tokens."""
    runs = itertools.groupby(zip(example["input_ids"], example["labels"], strict=True),
                             key=lambda pair: pair[1] != IGNORE_INDEX)
    return [{"text": tokenizer.decode([token for token, _ in run], skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False),
             "trained": trained}
            for trained, run in runs]


def inspect_example(config: SFTConfig, path: str | None, index: int, as_json: bool, colour: bool = False) -> str:
    """What ``sft inspect`` prints for conversation ``index`` of ``path`` (default: the train file)."""
    path = path or config.data.train_file
    conversations = read_conversations(path)
    if not 0 <= index < len(conversations):
        raise DataError(f"{path}: no conversation {index}; the file holds {len(conversations)} "
                        f"(--index 0 to {len(conversations) - 1})")
    record = conversations[index]
    tokenizer = load_tokenizer(resolve_model_path(config.model.model), config.model.trust_remote_code)
    fallback = ensure_chat_template(tokenizer)
    data = config.data
    try:
        encoded = encode_prepared(tokenizer, record, data.max_seq_length, data.system_prompt, data.train_on)
    except UnsupportedRecord as exc:
        raise DataError(f"{path}: conversation {index} (id {record['id']}): training drops it ({exc.reason}): "
                        f"{exc}") from None
    example, truncated = encoded.example, encoded.truncated
    runs = segments(tokenizer, example)
    if as_json:
        return json.dumps({"input_ids": example["input_ids"], "labels": example["labels"], "segments": runs},
                          ensure_ascii=False)
    body = "".join(f"{TRAINED_COLOUR}{run['text']}{RESET}" if colour and run["trained"]
                   else f"[[{run['text']}]]" if run["trained"] else run["text"] for run in runs)
    trained = sum(label != IGNORE_INDEX for label in example["labels"])
    total = len(example["input_ids"])
    lines = [
        f"{path}, conversation {index} (id {record['id']}), {len(record['messages'])} messages; model "
        f"{config.model.model}{' (no chat template: the fallback one)' if fallback else ''}, "
        f"train_on {data.train_on}, system_prompt "
        f"{'none (the template default)' if data.system_prompt is None else repr(data.system_prompt)}"
        + (f"; a tool list of {len(record['tools'])} in the prompt" if record.get("tools") else ""),
        "",
        body,
        "",
        f"{total} tokens: {trained} trained ({'in colour' if colour else 'between [[ and ]]'}), "
        f"{total - trained} masked; max_seq_length {data.max_seq_length}"
        f"{', truncated' if truncated else ''}.",
    ]
    if encoded.reasoning_dropped:
        lines.append(f"The template does not render the reasoning of {encoded.reasoning_dropped} answer(s): "
                     "they are trained without it.")
    if trained == 0:
        lines.append("No token is trained: training drops this example (no answer token within max_seq_length).")
    return "\n".join(lines)
