"""A corpus of bad and odd source files, each run through the ``prepare`` CLI.

Every case must end in exactly one of two ways:

* exit code 2 with a single ``error: ...`` line on stderr that names the file
  (and, for a parse error, the line), no traceback, and nothing written; or
* exit code 0 with a ``prepare_report.json`` whose counts add up
  (``read == kept + sum(rejected) + replaced`` per source and in total) and a
  ``rejects.jsonl`` with one strict-JSON line, with a ``reason``, per
  rejected or replaced record.

The table says which, and what exactly is expected. Decisions this corpus
pins down (documented in ``sft/data/sources.py`` and ``sft/data/formats.py``):
a record repeating ``instruction``,
``input`` or ``output`` is rejected as ``<field>_duplicate_key``; NaN and
Infinity are numbers, so ``<field>_not_string``; nesting too deep to parse
is a file-level error naming the line; a 10 MB instruction is kept; escaped
control characters are kept, raw ones are a syntax error; a file mixing
shapes, or of no known shape, is an error naming the records; a conversation
that breaks the turn order (a tool turn without a call before it) or holds a broken tool call is a
reject; a CSV row with a
value too many is an error naming its line.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sft.data.prepare import DPO, REJECTS_FILE, REPORT_FILE, SFT, Method, _json_line, main
from sft.data.prepared import read_conversations
from sft.data.sources import DuplicateKeysObject, iter_records
from sft.errors import DataError

GOOD = {"instruction": "Name a colour.", "output": "Blue."}
GOOD2 = {"instruction": "Name a fruit.", "input": "", "output": "Apple."}
DEEP = 100_000  # far beyond what Python's json parser can recurse into
BIG_DIGITS = "1" * 5000  # beyond sys.get_int_max_str_digits() (4300 by default)
TEN_MB = 10 * 1024 * 1024


class Directory:
    """A directory where a file is expected."""


@dataclass(frozen=True)
class Link:
    """A symbolic link to ``target`` (relative to the case's directory)."""

    target: str


FileSpec = bytes | Directory | Link


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def jsonl(*items: Any) -> bytes:
    """JSONL bytes; a ``str`` item is taken as a raw line, anything else is dumped."""
    lines = [item if isinstance(item, str) else dumps(item) for item in items]
    return ("\n".join(lines) + "\n").encode("utf-8")


def array(*items: Any) -> bytes:
    """A pretty JSON array, one item per line from line 2 on; ``str`` items are raw."""
    rows = [item if isinstance(item, str) else dumps(item) for item in items]
    return ("[\n" + ",\n".join(rows) + "\n]\n").encode("utf-8")


def parquet(*rows: dict[str, Any]) -> bytes:
    """A Parquet table of ``rows`` (nested lists and objects become list and struct columns)."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(list(rows)), buffer)
    return buffer.getvalue()


def csv_bytes(*rows: list[str]) -> bytes:
    """CSV text of ``rows`` (the first is the header), quoted as Python's csv module does."""
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue().encode("utf-8")


def turns(*pairs: str, key: str = "messages", role: str = "role", content: str = "content") -> dict[str, Any]:
    """A conversation record from alternating ``role, text`` arguments."""
    return {key: [{role: r, content: c} for r, c in zip(pairs[::2], pairs[1::2])]}


CHAT = turns("user", "Name a colour.", "assistant", "Blue.")
CHAT2 = turns("system", "Be brief.", "user", "Name a fruit.", "assistant", "Apple.")
SHARE = turns("human", "Hi", "gpt", "Hello!", "human", "Bye", "gpt", "Bye!", key="conversations", role="from",
              content="value")


@dataclass(frozen=True)
class Case:
    """One hostile input and what ``main`` must do with it."""

    id: str
    files: dict[str, FileSpec]
    sources: tuple[str, ...] = ()  # default: every file, in order
    error: tuple[str, ...] | None = None  # fragments of the error line, if an error
    names: str | None = None  # the path the error must name (default: first source)
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    replaced: int = 0
    check: Callable[[Path], None] | None = None  # extra assertions on the out dir
    method: Method = SFT  # which preparation runs: conversations (SFT) or preference pairs (DPO)

    def source_names(self) -> tuple[str, ...]:
        return self.sources or tuple(self.files)


def written(out_dir: Path, name: str) -> list[dict[str, Any]]:
    """Parse a written JSONL file strictly: UTF-8, no NaN/Infinity literals."""
    text = (out_dir / name).read_bytes().decode("utf-8")
    assert text == "" or text.endswith("\n")
    # split on "\n" only: str.splitlines would also split on U+2028 inside strings
    return [json.loads(line, parse_constant=_no_constants) for line in text.split("\n")[:-1]]


def _no_constants(name: str) -> Any:
    raise AssertionError(f"non-standard JSON literal {name} written")


def kept_records(out_dir: Path, method: Method = SFT) -> list[dict[str, Any]]:
    return written(out_dir, method.train_file) + written(out_dir, method.val_file)


# --- per-case extra checks -------------------------------------------------


def user_texts(out_dir: Path) -> set[str]:
    return {m["content"] for r in kept_records(out_dir) for m in r["messages"] if m["role"] == "user"}


def check_control_chars_kept(out_dir: Path) -> None:
    texts = user_texts(out_dir)
    assert "nul\x00here" in texts and "esc \x1b[31mred" in texts


def check_crlf_normalized(out_dir: Path) -> None:
    [row] = kept_records(out_dir)
    assert row["messages"] == [{"role": "user", "content": "line one\nline two"},
                               {"role": "assistant", "content": "a\nb"}]


def check_ten_mb_kept(out_dir: Path) -> None:
    lengths = sorted(len(text) for text in user_texts(out_dir))
    assert lengths[-1] == TEN_MB


def check_nan_written_as_string(out_dir: Path) -> None:
    [reject] = written(out_dir, REJECTS_FILE)
    assert reject["record"]["score"] == "NaN"
    assert reject["record"]["other"] == ["Infinity", "-Infinity"]


def check_surrogate_reject_escaped(out_dir: Path) -> None:
    raw = (out_dir / REJECTS_FILE).read_text(encoding="utf-8")
    assert "\\ud800" in raw
    [reject] = written(out_dir, REJECTS_FILE)
    assert reject["record"]["instruction"] == "a\ud800"


def check_later_duplicate_wins(out_dir: Path) -> None:
    [row] = kept_records(out_dir)
    assert row["messages"][-1]["content"] == "third"
    assert [r["position"] for r in written(out_dir, REJECTS_FILE)] == [1, 2]


def check_duplicate_key_reject(out_dir: Path) -> None:
    [reject] = written(out_dir, REJECTS_FILE)
    assert reject["reason"] == "output_duplicate_key"
    assert reject["position"] == 2


def check_unicode_line_separator_kept(out_dir: Path) -> None:
    assert user_texts(out_dir) >= {"a\u2028b"}


def check_broken_turns(out_dir: Path) -> None:
    found = [(r["position"], r["reason"], r.get("detail")) for r in written(out_dir, REJECTS_FILE)]
    assert found == [(line, reason, detail) for line, (_, reason, detail) in enumerate(_BROKEN_TURNS, start=2)]


def check_broken_pairs(out_dir: Path) -> None:
    found = [(r["position"], r["reason"], r.get("detail")) for r in written(out_dir, REJECTS_FILE)]
    assert found == [(index, reason, detail) for index, (_, reason, detail) in enumerate(_BROKEN_PAIRS, start=1)]


def check_csv_cells(out_dir: Path) -> None:
    assert user_texts(out_dir) == {"Sort a, b and c.\n\nc, a, b", "Say \"hi\"\non two lines."}


def check_roles_mapped(out_dir: Path) -> None:
    roles = {tuple(m["role"] for m in r["messages"]) for r in kept_records(out_dir)}
    assert roles == {("user", "assistant", "user", "assistant"), ("user", "assistant"),
                     ("system", "user", "assistant")}


# --- the corpus ------------------------------------------------------------

_NON_STRINGS = [
    ("number", 3),
    ("float", 2.5),
    ("bool", True),
    ("list", ["a"]),
    ("object", {"text": "a"}),
    ("null", None),
]


def _non_string_cases() -> list[Case]:
    """Every field x every non-string JSON type; a null input means "no input"."""
    cases = []
    for name in ("instruction", "input", "output"):
        for kind, value in _NON_STRINGS:
            record = {"instruction": "i", "input": "x", "output": "o", name: value}
            if name == "input" and value is None:
                outcome: dict[str, Any] = {"kept": 2}
            else:
                outcome = {"kept": 1, "rejected": {f"{name}_not_string": 1}}
            cases.append(
                Case(f"{name}_is_{kind}", {"a.jsonl": jsonl(GOOD, record)}, **outcome)
            )
    return cases


_DEEP_ARRAY = "[" * DEEP + "]" * DEEP

# Each broken conversation of a messages file, its reason and its detail, in file order (after
# one good record on line 1).
_BROKEN_TURNS: list[tuple[Any, str, str | None]] = [
    (turns("user", "q", "assistant", "a", "user", "more?"), "last_turn_not_assistant", "messages[2]"),
    (turns("user", "q", "user", "again", "assistant", "a"), "repeated_role", "messages[1]"),
    (turns("user", "q", "assistant", "a", "assistant", "b"), "repeated_role", "messages[2]"),
    (turns("assistant", "a", "user", "q", "assistant", "b"), "first_turn_not_user", "messages[0]"),
    (turns("system", "s", "assistant", "a"), "first_turn_not_user", "messages[1]"),
    (turns("user", "q", "system", "s", "assistant", "a"), "misplaced_system", "messages[1]"),
    (turns("system", "s"), "last_turn_not_assistant", "messages[0]"),
    (turns("user", " \r\n", "assistant", "a"), "empty_turn", "messages[0]"),
    (turns("user", "q", "assistant", "\t"), "empty_turn", "messages[1]"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", "content": "a"}]},
     "content_not_string", "messages[0]"),
    ({"messages": [{"role": "user", "content": None}]}, "content_not_string", "messages[0]"),
    (turns("user", "q", "tool", "{}", "assistant", "a"), "tool_without_call", "messages[1]"),
    (turns("user", "q", "assistant", "", "tool", "{}", "assistant", "a"), "empty_turn", "messages[1]"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]},
                   {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}]},
     "call_without_result", "messages[2]"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]},
                   {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]},
     "tool_call_invalid", "messages[1]: a call without a function name"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
                   {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]},
     "tool_call_arguments_invalid", "messages[1]: not valid JSON"),
    (turns("user", "q", "bot", "a"), "unknown_role", "messages[1]: role 'bot'"),
    (turns("User", "q", "Assistant", "a"), "unknown_role", "messages[0]: role 'User'"),
    ({"messages": [{"role": None, "content": "q"}]}, "unknown_role", "messages[0]: role None"),
    ({"messages": [{"content": "q"}]}, "missing_role", "messages[0]: no 'role'"),
    ({"messages": [{"role": "user", "text": "q"}]}, "missing_content", "messages[0]: no 'content'"),
    ({"messages": ["user: q"]}, "turn_not_object", "messages[0] is a string"),
    ({"messages": "user: q"}, "messages_not_list", "messages is a string"),
    ({"messages": None}, "messages_not_list", "messages is null"),
    ({"messages": []}, "empty_conversation", None),
    ('{"messages": [{"role": "user", "content": "q\\ud800"}]}', "content_invalid_unicode", "messages[0]"),
    ('{"messages": [{"role": "user", "role": "assistant", "content": "q"}]}', "turn_duplicate_key",
     "messages[0]: 'role' given twice"),
    ('{"messages": [], "messages": []}', "messages_duplicate_key", None),
    ("7", "not_an_object", None),
]


def _pair(*prompt: str, chosen: Any = "Hello!", rejected: Any = "Go away.") -> dict[str, Any]:
    """A ShareGPT preference record: alternating ``role, text`` prompt turns and two answers."""
    answers = {name: {"from": "gpt", "value": value} if isinstance(value, str) else value
               for name, value in (("chosen", chosen), ("rejected", rejected)) if value is not None}
    return turns(*prompt, key="conversations", role="from", content="value") | answers


PAIR = _pair("human", "Hi")

# Each broken ShareGPT preference pair, its reason and its detail, in file order (after one good
# pair at item 0).
_BROKEN_PAIRS: list[tuple[Any, str, str | None]] = [
    (_pair("human", "Hi", chosen={"from": "human", "value": "Hello!"}), "repeated_role", "chosen"),
    (_pair("human", "Hi", "gpt", "Hey"), "repeated_role", "chosen"),
    (_pair("human", "Hi", rejected=None), "missing_rejected", None),
    (_pair("human", "Hi", chosen=["Hello!"]), "chosen_not_object", "chosen is an array"),
    (_pair("human", "Hi", chosen=" "), "empty_chosen", None),
    (_pair("human", "Hi", chosen="Same.", rejected="Same.\r\n"), "chosen_equals_rejected", None),
    (_pair("human", "Hi", "function_call", "{}"), "tool_role", "conversations[1]: from 'function_call'"),
    (_pair(), "empty_prompt", None),
    ("7", "not_an_object", None),
]

CASES: list[Case] = [
    # -- syntax errors: file-level, named with the line ---------------------
    Case(
        "truncated_json_array",
        {"a.json": b'[\n' + dumps(GOOD).encode() + b',\n{"instruction": "x", "outp'},
        error=(":3:", "invalid JSON",),
    ),
    Case(
        "truncated_jsonl_last_line",
        {"a.jsonl": (dumps(GOOD) + '\n{"instruction": "x", "outp').encode()},
        error=(":2:", "invalid JSON",),
    ),
    Case(
        "jsonl_broken_line_in_middle",
        {"a.jsonl": jsonl(GOOD, '{"instruction": "x",, "output": "y"}', GOOD2)},
        error=(":2:21: invalid JSON",),
    ),
    Case(
        "array_trailing_comma",
        {"a.json": array(GOOD, GOOD2)[:-3] + b",\n]\n"},
        error=("invalid JSON",),  # line 3 or 4, depending on the Python version
    ),
    Case(
        "python_repr_single_quotes",
        {"a.jsonl": jsonl(GOOD, "{'instruction': 'a', 'output': 'b'}")},
        error=(":2:2: invalid JSON",),
    ),
    Case(
        "two_concatenated_arrays",
        {"a.json": array(GOOD) + array(GOOD2)},
        error=(":4:", "invalid JSON", "Extra data"),
    ),
    Case(
        "cr_only_line_endings",
        {"a.jsonl": (dumps(GOOD) + "\r" + dumps(GOOD2) + "\r").encode()},
        error=(":1:", "invalid JSON", "Extra data"),
    ),
    Case(
        "raw_escape_char_in_string",
        {"a.jsonl": jsonl(GOOD, '{"instruction": "a\x1b[31m", "output": "o"}')},
        error=(":2:19: invalid JSON", "control character"),
    ),
    Case(
        "raw_tab_in_string",
        {"a.json": array(GOOD, '{"instruction": "a\tb", "output": "o"}')},
        error=(":3:19: invalid JSON", "control character"),
    ),
    Case(
        "raw_nul_byte_in_string",
        {"a.jsonl": jsonl(GOOD, '{"instruction": "a\x00b", "output": "o"}')},
        error=(":2: NUL byte at byte 19",),
    ),
    # -- wrong top-level shape ------------------------------------------------
    Case(
        "top_level_object_in_json_file",
        {"a.json": dumps(GOOD).encode()},
        error=("top-level JSON value is an object", "expected an array of objects"),
    ),
    Case(
        "top_level_pretty_object_in_jsonl_file",
        {"a.jsonl": json.dumps({"data": [GOOD]}, indent=2).encode()},
        error=("top-level JSON value is an object",),
    ),
    Case("top_level_string", {"a.json": b'"hello"'}, error=("is a string",)),
    Case("top_level_number", {"a.json": b"42\n"}, error=("is a number",)),
    Case("top_level_null", {"a.json": b"null"}, error=("is null",)),
    Case("top_level_boolean", {"a.json": b"true"}, error=("is a boolean",)),
    # -- encodings ------------------------------------------------------------
    Case(
        "invalid_utf8_latin1_line",
        {"a.jsonl": jsonl(GOOD) + '{"instruction": "caf\u00e9", "output": "o"}\n'.encode("latin-1")},
        error=(":2: not valid UTF-8 at byte 21", "expected UTF-8"),
    ),
    Case(
        "invalid_utf8_after_bom",
        {"a.json": b"\xef\xbb\xbf[\n" + b'{"instruction": "\xff", "output": "o"}]'},
        error=(":2: not valid UTF-8",),
    ),
    Case(
        "utf16_with_bom",
        {"a.jsonl": jsonl(GOOD).decode().encode("utf-16")},
        error=("UTF-16", "expected UTF-8"),
    ),
    Case(
        "utf16_without_bom",
        {"a.jsonl": jsonl(GOOD).decode().encode("utf-16-le")},
        error=(":1: NUL byte", "UTF-16"),
    ),
    # -- nothing usable -------------------------------------------------------
    Case("empty_file_0_bytes", {"a.jsonl": b""}, error=("no usable records", "no records")),
    Case("whitespace_only_file", {"a.jsonl": b" \n\t\r\n  \n"}, error=("no records",)),
    Case("empty_array", {"a.json": b"[]"}, error=("no records",)),
    Case(
        "every_record_rejected",
        {"a.jsonl": jsonl({"instruction": "", "output": "o"}, "3", "null")},
        error=("no usable records", "3 read, all rejected", "not_an_object 2", 'string "instruction"'),
    ),
    # -- paths ----------------------------------------------------------------
    Case("directory_as_file", {"a.jsonl": Directory()}, error=("is a directory",)),
    Case("file_does_not_exist", {}, sources=("nope.jsonl",), error=("not found",)),
    Case("dangling_symlink", {"a.jsonl": Link("gone.jsonl")}, error=("symbolic link",)),
    Case("symlink_loop", {"a.jsonl": Link("a.jsonl")}, error=("symbolic link",)),
    Case(
        "source_given_twice",
        {"a.jsonl": jsonl(GOOD)},
        sources=("a.jsonl", "a.jsonl"),
        error=("more than once",),
    ),
    Case(
        "source_given_twice_by_other_path",
        {"a.jsonl": jsonl(GOOD), "sub": Directory()},
        sources=("a.jsonl", "sub/../a.jsonl"),
        names="sub/../a.jsonl",
        error=("more than once",),
    ),
    Case(
        "second_source_broken",
        {"a.jsonl": jsonl(GOOD), "b.jsonl": jsonl(GOOD2, "{")},
        names="b.jsonl",
        error=(":2:", "invalid JSON",),
    ),
    # -- beyond what the parser can take --------------------------------------
    Case(
        "deep_nesting_whole_array",
        {"a.json": _DEEP_ARRAY.encode()},
        error=("item 0 (line 1, column 2)", "nested too deeply"),
    ),
    Case(
        "deep_nesting_unterminated",
        {"a.json": ("[" * DEEP).encode()},
        error=("item 0 (line 1", "nested too deeply"),
    ),
    Case(
        "deep_nesting_in_third_array_item",
        {"a.json": array(GOOD, GOOD2, '{"instruction": ' + _DEEP_ARRAY + ', "output": "o"}')},
        error=("item 2 (line 4, column 1)", "nested too deeply"),
    ),
    Case(
        "deep_nesting_in_jsonl_line",
        {"a.jsonl": jsonl(GOOD, '{"instruction": "i", "output": ' + _DEEP_ARRAY + "}")},
        error=(":2: the line is nested too deeply",),
    ),
    Case(
        "huge_integer_in_jsonl_line",
        {"a.jsonl": jsonl(GOOD, '{"instruction": "i", "output": "o", "n": ' + BIG_DIGITS + "}")},
        error=(":2: the line cannot be parsed", "digits"),
    ),
    Case(
        "huge_integer_in_array_item",
        {"a.json": array(GOOD, '{"instruction": ' + BIG_DIGITS + ', "output": "o"}')},
        error=("item 1 (line 3, column 1)", "digits"),
    ),
    # -- record-level rejects: the file is fine, some records are not ---------
    Case(
        "array_items_not_objects",
        {"a.json": array(GOOD, '"text"', 3, 2.5, True, [GOOD2], None)},
        kept=1,
        rejected={"not_an_object": 6},
    ),
    Case(
        "jsonl_lines_not_objects",
        {"a.jsonl": jsonl(GOOD, '"text"', 3, [GOOD2], None, False)},
        kept=1,
        rejected={"not_an_object": 5},
    ),
    Case(
        "array_of_arrays",
        {"a.json": array([GOOD], [GOOD2], GOOD)},
        kept=1,
        rejected={"not_an_object": 2},
    ),
    Case(
        "missing_instruction",
        {"a.jsonl": jsonl(GOOD, {"output": "o"})},
        kept=1,
        rejected={"missing_instruction": 1},
    ),
    Case(
        "missing_output",
        {"a.jsonl": jsonl(GOOD, {"instruction": "i", "input": "x"})},
        kept=1,
        rejected={"missing_output": 1},
    ),
    Case(
        "empty_object",
        {"a.json": array(GOOD, {})},
        kept=1,
        rejected={"missing_instruction": 1},
    ),
    Case(
        "misspelled_field_names",
        {"a.jsonl": jsonl(GOOD, {"Instruction": "i", "output": "o"}, {"instruction": "i", "response": "o"})},
        kept=1,
        rejected={"missing_instruction": 1, "missing_output": 1},
    ),
    Case(
        "extra_fields_ignored",
        {"a.jsonl": jsonl(GOOD, {**GOOD2, "id": 7, "meta": {"tags": [1, None]}, "text": "x"})},
        kept=2,
    ),
    *_non_string_cases(),
    Case(
        "nan_instruction",
        {"a.jsonl": jsonl(GOOD, '{"instruction": NaN, "output": "o"}')},
        kept=1,
        rejected={"instruction_not_string": 1},
    ),
    Case(
        "infinity_output",
        {"a.json": array(GOOD, '{"instruction": "i", "output": Infinity}')},
        kept=1,
        rejected={"output_not_string": 1},
    ),
    Case(
        "negative_infinity_input",
        {"a.jsonl": jsonl(GOOD, '{"instruction": "i", "input": -Infinity, "output": "o"}')},
        kept=1,
        rejected={"input_not_string": 1},
    ),
    Case(
        "float_overflow_1e999_output",
        {"a.jsonl": jsonl(GOOD, '{"instruction": "i", "output": 1e999}')},
        kept=1,
        rejected={"output_not_string": 1},
    ),
    Case(
        "nan_in_extra_field_of_rejected_record",
        {
            "a.jsonl": jsonl(
                GOOD,
                '{"instruction": " ", "output": "o", "score": NaN, "other": [Infinity, -Infinity]}',
            )
        },
        kept=1,
        rejected={"empty_instruction": 1},
        check=check_nan_written_as_string,
    ),
    Case(
        "empty_strings",
        {
            "a.jsonl": jsonl(
                {"instruction": "", "output": "o"},
                {"instruction": "i", "output": ""},
                {"instruction": "i", "input": "", "output": "o"},
            )
        },
        kept=1,
        rejected={"empty_instruction": 1, "empty_output": 1},
    ),
    Case(
        "whitespace_only_strings",
        {
            "a.jsonl": jsonl(
                {"instruction": " \t\r\n\u3000\u00a0", "output": "o"},
                {"instruction": "i", "output": "\r\n \u2003"},
                {"instruction": "i", "input": " \n ", "output": "o"},
            )
        },
        kept=1,
        rejected={"empty_instruction": 1, "empty_output": 1},
    ),
    Case(
        "duplicate_key_instruction",
        {"a.jsonl": jsonl(GOOD, '{"instruction": "a", "instruction": "b", "output": "o"}')},
        kept=1,
        rejected={"instruction_duplicate_key": 1},
    ),
    Case(
        "duplicate_key_input",
        {"a.jsonl": jsonl(GOOD, '{"instruction": "a", "input": "x", "output": "o", "input": "y"}')},
        kept=1,
        rejected={"input_duplicate_key": 1},
    ),
    Case(
        "duplicate_key_output",
        {"a.jsonl": jsonl(GOOD, '{"instruction": "a", "output": "o", "output": "p"}')},
        kept=1,
        rejected={"output_duplicate_key": 1},
        check=check_duplicate_key_reject,
    ),
    Case(
        "duplicate_key_same_value",
        {"a.json": array(GOOD, '{"instruction": "a", "instruction": "a", "output": "o"}')},
        kept=1,
        rejected={"instruction_duplicate_key": 1},
    ),
    Case(
        "duplicate_extra_key_ignored",
        {"a.jsonl": jsonl(GOOD, '{"instruction": "a", "output": "o", "tag": 1, "tag": 2}')},
        kept=2,
    ),
    Case(
        "lone_high_surrogate_instruction",
        {"a.jsonl": jsonl(GOOD, r'{"instruction": "a\ud800", "output": "o"}')},
        kept=1,
        rejected={"instruction_invalid_unicode": 1},
        check=check_surrogate_reject_escaped,
    ),
    Case(
        "lone_low_surrogate_output",
        {"a.json": array(GOOD, r'{"instruction": "i", "output": "\udfff"}')},
        kept=1,
        rejected={"output_invalid_unicode": 1},
    ),
    Case(
        "reversed_surrogate_pair_input",
        {"a.jsonl": jsonl(GOOD, r'{"instruction": "i", "input": "\ude00\ud83d", "output": "o"}')},
        kept=1,
        rejected={"input_invalid_unicode": 1},
    ),
    Case(
        "lone_surrogate_in_extra_key_and_value",
        {"a.jsonl": jsonl(GOOD, r'{"instruction": "i", "output": "o", "x\ud800": "\udfff"}')},
        kept=2,
    ),
    Case(
        "valid_surrogate_pair_escape",
        {"a.jsonl": jsonl(GOOD, r'{"instruction": "smile \ud83d\ude00", "output": "o"}')},
        kept=2,
    ),
    # -- odd but fine ---------------------------------------------------------
    Case("utf8_bom_array", {"a.json": b"\xef\xbb\xbf" + array(GOOD, GOOD2)}, kept=2),
    Case("utf8_bom_jsonl", {"a.jsonl": b"\xef\xbb\xbf" + jsonl(GOOD, GOOD2)}, kept=2),
    Case("crlf_jsonl", {"a.jsonl": jsonl(GOOD, GOOD2).replace(b"\n", b"\r\n")}, kept=2),
    Case("crlf_array", {"a.json": array(GOOD, GOOD2).replace(b"\n", b"\r\n")}, kept=2),
    Case(
        "crlf_inside_strings",
        {
            "a.jsonl": jsonl(
                {"instruction": "line one\nline two", "output": "first"},
                {"instruction": "line one\r\nline two\r\n", "output": "a\rb"},
            )
        },
        kept=1,
        replaced=1,
        check=check_crlf_normalized,
    ),
    Case(
        "escaped_control_chars_kept",
        {
            "a.jsonl": jsonl(
                r'{"instruction": "nul\u0000here", "output": "o"}',
                r'{"instruction": "esc \u001b[31mred", "output": "\u0007bell"}',
            )
        },
        kept=2,
        check=check_control_chars_kept,
    ),
    Case(
        "unicode_line_separator_in_jsonl",
        {"a.jsonl": jsonl(GOOD, {"instruction": "a\u2028b", "output": "c\u2029d"})},
        kept=2,
        check=check_unicode_line_separator_kept,
    ),
    Case(
        "jsonl_blank_and_whitespace_lines",
        {"a.jsonl": b"\n\n" + jsonl(GOOD) + b"   \n\t\n\r\n" + jsonl(GOOD2) + b"\n\n"},
        kept=2,
    ),
    Case(
        "jsonl_without_final_newline",
        {"a.jsonl": jsonl(GOOD, GOOD2).rstrip(b"\n")},
        kept=2,
    ),
    Case("array_in_jsonl_named_file", {"a.jsonl": array(GOOD, GOOD2)}, kept=2),
    Case("jsonl_in_json_named_file", {"a.json": jsonl(GOOD, GOOD2)}, kept=2),
    Case("single_object_jsonl_file", {"a.jsonl": dumps(GOOD).encode()}, kept=1),
    Case(
        "duplicates_later_wins",
        {
            "a.jsonl": jsonl(
                {"instruction": "Q", "output": "first"},
                {"instruction": " Q\r\n", "output": "second"},
                {"instruction": "Q", "input": None, "output": "third"},
            )
        },
        kept=1,
        replaced=2,
        check=check_later_duplicate_wins,
    ),
    Case(
        "nfc_and_nfd_are_one_record",
        {"a.jsonl": jsonl({"instruction": "cafe\u0301", "output": "1"}, {"instruction": "caf\u00e9", "output": "2"})},
        kept=1,
        replaced=1,
    ),
    Case(
        "nested_structure_in_bad_field",
        {"a.jsonl": jsonl(GOOD, {"instruction": "i", "output": [[[[[[["deep"]]]]]]]})},
        kept=1,
        rejected={"output_not_string": 1},
    ),
    Case(
        "ten_mb_instruction",
        {"a.jsonl": jsonl(GOOD, {"instruction": "x" * TEN_MB, "output": "long"})},
        kept=2,
        check=check_ten_mb_kept,
    ),
    Case(
        "undecodable_file_name",
        {"bad\udcff name.jsonl": jsonl(GOOD, "7")},
        kept=1,
        rejected={"not_an_object": 1},
    ),
    # -- shapes: detection per file ------------------------------------------
    Case(
        "mixed_shapes_alpaca_then_messages",
        {"a.jsonl": jsonl(GOOD, GOOD2, CHAT)},
        error=("line 3 has the messages (messages) shape but line 1 has the alpaca (instruction, input, output)",
               "one shape per file", "--format"),
    ),
    Case(
        "mixed_shapes_in_array",
        {"a.json": array(CHAT, SHARE)},
        error=("item 1 has the sharegpt (conversations) shape but item 0 has the messages",),
    ),
    Case(
        "no_known_shape",
        {"a.jsonl": jsonl({"question": "q", "answer": "a"}, {"text": "t"})},
        error=("no record has a known shape (line 1 is an object with fields ['question', 'answer'])",
               ("expected one of: alpaca (instruction, input, output), sharegpt (conversations), messages "
                "(messages), prompt_completion (prompt, completion)")),
    ),
    Case("only_non_objects", {"a.jsonl": jsonl("3", "null")}, error=("no record has a known shape (line 1 is a number)",)),
    Case(
        "first_record_fits_two_shapes",
        {"a.jsonl": jsonl({**GOOD, **CHAT}, GOOD2)},
        error=("line 1 fits several shapes, alpaca (instruction, input, output) and messages (messages)",
               "pass --format"),
    ),
    Case("later_record_fitting_two_shapes_is_read_as_the_first", {"a.jsonl": jsonl(GOOD, {**GOOD2, **CHAT})}, kept=2),
    Case("second_source_mixes_shapes", {"a.jsonl": jsonl(CHAT), "b.json": array(SHARE, GOOD)}, names="b.json",
         error=("item 1 has the alpaca",)),
    Case("same_prompt_in_two_shapes_is_a_duplicate", {"a.jsonl": jsonl(GOOD), "b.jsonl": jsonl(CHAT, CHAT2)}, kept=2,
         replaced=1),
    # -- conversations ---------------------------------------------------------
    Case(
        "messages_every_broken_turn",
        {"a.jsonl": jsonl(CHAT, *(record for record, _, _ in _BROKEN_TURNS))},
        kept=1,
        rejected=dict(Counter(reason for _, reason, _ in _BROKEN_TURNS)),
        check=check_broken_turns,
    ),
    Case(
        "sharegpt_function_call_without_a_name_rejected",
        {"a.json": array(SHARE, turns("human", "q", "function_call", "{}", "observation", "{}", "gpt", "a",
                                      key="conversations", role="from", content="value"))},
        kept=1,
        rejected={"tool_call_invalid": 1},
    ),
    Case(
        "sharegpt_roles_mapped",
        {"a.jsonl": jsonl(SHARE, turns("user", "q", "assistant", "a", key="conversations", role="from", content="value"),
                          turns("system", "s", "human", "q", "gpt", "a", key="conversations", role="from",
                                content="value"))},
        kept=3,
        check=check_roles_mapped,
    ),
    Case(
        "sharegpt_openai_keys_are_missing_fields",
        {"a.jsonl": jsonl(SHARE, turns("user", "q", "assistant", "a", key="conversations"))},
        kept=1,
        rejected={"missing_role": 1},
    ),
    Case(
        "same_prompt_other_answer_is_a_duplicate",
        {"a.jsonl": jsonl(CHAT2, turns("system", "Be brief.", "user", "Name a fruit.", "assistant", "Pear."))},
        kept=1,
        replaced=1,
    ),
    Case(
        "prompt_completion_records",
        {"a.jsonl": jsonl({"prompt": "p", "completion": "c"}, {"prompt": "p2", "completion": " "},
                          {"prompt": ["x"], "completion": "c"}, {"completion": "c"})},
        kept=1,
        rejected={"empty_completion": 1, "prompt_not_string": 1, "missing_prompt": 1},
    ),
    # -- CSV, Parquet and gzip ----------------------------------------------------
    Case(
        "csv_alpaca_quoted_cells",
        {"a.csv": b'instruction,input,output\r\n"Sort a, b and c.","c, a, b",a b c\r\n\r\n'
                  b'"Say ""hi""\non two lines.",,Hi\r\n'},
        kept=2,
        check=check_csv_cells,
    ),
    Case(
        "csv_messages_as_json_cells",
        {"a.csv": csv_bytes(["id", "messages"], ["1", dumps(CHAT["messages"])], ["2", "user: hi"])},
        kept=1,
        rejected={"messages_not_list": 1},
    ),
    Case(
        "csv_row_with_a_value_too_many",
        {"a.csv": b"instruction,output\na,b\nc,d,e\n"},
        error=("line 3 has 3 values but the header (line 1) has 2 columns",),
    ),
    Case(
        "csv_unclosed_quote",
        {"a.csv": b'instruction,output\na,"b\n\n'},
        error=("invalid CSV at line 3 (in the row that starts at line 2)",),
    ),
    Case(
        "csv_duplicate_column",
        {"a.csv": b"instruction,output,output\na,b,c\n"},
        error=("line 1: the header names column 'output' twice",),
    ),
    Case("csv_header_only", {"a.csv": b"instruction,output\n"}, error=("no records",)),
    Case(
        "csv_latin1",
        {"a.csv": "instruction,output\ncaf\u00e9,o\n".encode("latin-1")},
        error=(":2: not valid UTF-8",),
    ),
    Case(
        "parquet_sharegpt",
        {"a.parquet": parquet(SHARE, turns("system", "s", "human", "q", "gpt", "a", key="conversations", role="from",
                                           content="value"))},
        kept=2,
    ),
    Case(
        "parquet_alpaca_nulls_and_bytes",
        {"a.parquet": parquet({"instruction": " ", "output": "o", "blob": b"\xff\x00"},
                              {"instruction": "i", "input": None, "output": None, "blob": None}, GOOD)},
        kept=1,
        rejected={"empty_instruction": 1, "output_not_string": 1},
        check=lambda out_dir: written(out_dir, REJECTS_FILE)[0]["record"]["blob"] == "b'\\xff\\x00'",
    ),
    Case("parquet_not_parquet", {"a.parquet": jsonl(GOOD)}, error=("not a readable Parquet file",)),
    Case("parquet_empty_file", {"a.parquet": b""}, error=("not a readable Parquet file",)),
    Case("gzip_jsonl", {"a.jsonl.gz": gzip.compress(jsonl(GOOD, GOOD2))}, kept=2),
    Case("gzip_csv", {"a.csv.gz": gzip.compress(b"prompt,completion\np,c\n")}, kept=1),
    Case("gzip_truncated", {"a.json.gz": gzip.compress(array(GOOD))[:-10]}, error=("not valid gzip data",)),
    Case("gzip_name_plain_content", {"a.jsonl.gz": jsonl(GOOD)}, error=("not valid gzip data",)),
    # -- preference pairs (DPO) ------------------------------------------------
    Case(
        "dpo_every_broken_pair",
        {"a.json": array(PAIR, *(record for record, _, _ in _BROKEN_PAIRS))},
        kept=1,
        rejected=dict(Counter(reason for _, reason, _ in _BROKEN_PAIRS)),
        check=check_broken_pairs,
        method=DPO,
    ),
    Case(
        "dpo_mixed_shapes",
        {"a.jsonl": jsonl({"prompt": "p", "chosen": "a", "rejected": "b"}, PAIR)},
        error=("line 2 has the sharegpt (conversations, chosen, rejected) shape but line 1 has the standard",),
        method=DPO,
    ),
    Case(
        "dpo_given_an_sft_file",
        {"a.json": array(GOOD, GOOD2)},
        error=("no record has a known shape (item 0 is an object with fields ['instruction', 'output'])",
               "expected one of: standard (prompt, chosen, rejected)"),
        method=DPO,
    ),
    Case(
        "dpo_csv_standard_and_a_later_duplicate",
        {"a.csv": csv_bytes(["prompt", "chosen", "rejected"], ["Hi, you", "Hello, you!", "Go."], ["Hi, you", "Hey!", "No."]),
         "b.parquet": parquet(PAIR, _pair("human", "Hi", "gpt", "Hey", "human", "Bye"))},
        kept=3,
        replaced=1,
        method=DPO,
    ),
    Case(
        "dpo_every_pair_rejected",
        {"a.jsonl": jsonl({"prompt": "p", "chosen": "a", "rejected": "a"}, {"prompt": "p", "chosen": "a"})},
        error=("no usable records", "2 read, all rejected: chosen_equals_rejected 1, missing_rejected 1",
               "standard records need non-empty string \"prompt\", \"chosen\" and \"rejected\""),
        method=DPO,
    ),
    Case(
        "empty_source_next_to_good_one",
        {"a.jsonl": b"", "b.jsonl": jsonl(GOOD)},
        kept=1,
    ),
]


def build(case: Case, root: Path) -> list[str]:
    """Create the case's files under ``root``; return the ``--source`` paths."""
    for name, spec in case.files.items():
        path = root / name
        if isinstance(spec, Directory):
            path.mkdir()
        elif isinstance(spec, Link):
            path.symlink_to(root / spec.target)
        else:
            path.write_bytes(spec)
    return [os.path.join(root, name) for name in case.source_names()]


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)
    assert sum(case.error is not None for case in CASES) >= 20
    assert sum(case.error is None for case in CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_source(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sources = build(case, tmp_path)
    out_dir = tmp_path / "out"
    argv = [arg for source in sources for arg in ("--source", source)]
    code = main([*argv, "--out-dir", str(out_dir), "--val-fraction", "0.5"], case.method)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    if case.error is not None:
        assert_clean_error(case, code, captured.err, tmp_path, out_dir)
    else:
        assert code == 0, captured.err
        assert captured.err == ""
        assert_report_adds_up(case, out_dir)
        if case.check is not None:
            case.check(out_dir)


def assert_clean_error(case: Case, code: int, err: str, root: Path, out_dir: Path) -> None:
    assert code == 2
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err  # one line, no traceback
    named = case.names or case.source_names()[0]
    assert os.path.join(root, named) in err
    for fragment in case.error or ():
        assert fragment in err, (fragment, err)
    assert not out_dir.exists()


def assert_report_adds_up(case: Case, out_dir: Path) -> None:
    report = json.loads((out_dir / REPORT_FILE).read_text(encoding="utf-8"))
    total = report["total"]
    for counts in [*report["sources"], total]:
        rejected = sum(counts["rejected"].values())
        assert counts["read"] == counts["kept"] + rejected + counts["replaced"], counts
    for key in ("read", "kept", "replaced"):
        assert total[key] == sum(s[key] for s in report["sources"])
    assert sum(s["read"] for s in report["sources"]) == total["read"]
    assert (total["kept"], total["rejected"], total["replaced"]) == (
        case.kept,
        case.rejected,
        case.replaced,
    )
    rejects = written(out_dir, REJECTS_FILE)
    assert len(rejects) == sum(total["rejected"].values()) + total["replaced"]
    assert all(isinstance(r["reason"], str) and r["reason"] for r in rejects)
    expected_reasons = Counter(total["rejected"])
    if total["replaced"]:
        expected_reasons["duplicate_replaced"] = total["replaced"]
    assert Counter(r["reason"] for r in rejects) == expected_reasons
    kept = kept_records(out_dir, case.method)
    assert len(kept) == total["kept"] == report["train"] + report["val"]
    layout = ["id", "source", "messages"] if case.method is SFT else ["id", "source", "prompt", "chosen", "rejected"]
    assert all(list(r) == layout for r in kept)


# --- specific behaviours ---------------------------------------------------


def test_duplicate_keys_are_flagged_last_value_kept(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1, "b": 2, "a": 3, "b": 4, "a": 5}\n{"a": 1}\n', encoding="utf-8")
    [(_, first), (_, second)] = list(iter_records(path))
    assert isinstance(first, DuplicateKeysObject)
    assert first == {"a": 5, "b": 4}
    assert first.duplicate_keys == ("a", "b")
    assert type(second) is dict


def test_deep_nesting_is_a_data_error_not_recursion_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[\n" + dumps(GOOD) + ",\n" + _DEEP_ARRAY + "\n]", encoding="utf-8")
    with pytest.raises(DataError) as info:
        list(iter_records(path))
    message = str(info.value)
    assert message.startswith(f"{path}: item 1 (line 3, column 1) is nested too deeply")
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_rejects_line_survives_unwritable_values() -> None:
    deep: Any = "bottom"
    for _ in range(5000):
        deep = [deep]
    line = _json_line({"reason": "x", "record": {"nan": float("nan"), "deep": deep, "s": "\ud800"}})
    parsed = json.loads(line, parse_constant=_no_constants)
    assert parsed["record"]["nan"] == "NaN"
    assert parsed["record"]["s"] == "\ud800"
    depth, value = 0, parsed["record"]["deep"]
    while isinstance(value, list):
        depth, value = depth + 1, value[0]
    assert value == "<nested too deeply to write>" and depth < 200
    line.encode("utf-8")


def test_empty_source_is_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl(GOOD))
    argv = ["--source", str(empty), "--source", str(good), "--out-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"warning: {empty} holds no records" in out


def test_empty_and_rejected_sources_are_each_explained(tmp_path: Path) -> None:
    from sft.data.prepare import prepare

    empty = tmp_path / "empty.json"
    empty.write_bytes(b"[]")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl({"instruction": "i"}, "1"))
    with pytest.raises(DataError) as info:
        prepare([empty, bad], tmp_path / "out")
    message = str(info.value)
    assert f"{empty} (no records" in message
    assert f"{bad} (2 read, all rejected: missing_output 1, not_an_object 1; alpaca records need non-empty" in message


# --- read_conversations on hostile prepared files -------------------------

PREPARED_OK = '{"id": "1", "source": "s", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
OLD_LAYOUT_OK = '{"id": "1", "instruction": "a", "input": "", "output": "b", "source": "s"}'
_USER = '{"role": "user", "content": "q"}'
_ASSISTANT = '{"role": "assistant", "content": "a"}'


@pytest.mark.parametrize(
    ("line", "raw", "fragments"),
    [
        ('["a", "b"]', None, (":2: expected a JSON object, got an array",)),
        ('"text"', None, (":2: expected a JSON object, got a string",)),
        ("null", None, (":2: expected a JSON object, got null",)),
        ('{"instruction": "a", "output": ', None, (":2:32: invalid JSON",)),
        (None, b'{"instruction": "caf\xe9", "output": "b"}\n', (":2: not valid UTF-8", "expected UTF-8")),
        ('{"instruction": "a"}', None, (":2: field 'output' must be a string, but it is missing",)),
        ('{"output": "b"}', None, (":2: field 'instruction' must be a string, but it is missing",)),
        ('{"instruction": 5, "output": "b"}', None, (":2: field 'instruction' must be a string, got a number",)),
        ('{"instruction": "a", "output": NaN}', None, (":2: field 'output' must be a string, got a number",)),
        ('{"instruction": "a", "input": 3, "output": "b"}', None, (":2: field 'input' must be a string",)),
        (r'{"instruction": "a\ud800", "output": "b"}', None, (":2: field 'instruction'", "lone surrogate")),
        ('{"instruction": ' + _DEEP_ARRAY + "}", None, (":2:", "nested too deeply")),
        ('{"instruction": "a", "output": "b", "n": ' + BIG_DIGITS + "}", None, (":2:", "digits")),
        ("{}", None, (":2: field 'messages' must be a list of {\"role\", \"content\"} objects", "but it is missing")),
        ('{"messages": "q"}', None, (":2: field 'messages' must be a list", "got a string")),
        ('{"messages": []}', None, (":2: field 'messages' must be a list", "but it is empty")),
        ('{"messages": ["q"]}', None, (":2: field 'messages'[0] must be an object with 'role' and 'content', got a string",)),
        ('{"messages": [{"role": "tool", "content": "q"}]}', None,
         (":2: field 'messages' has a first turn (after an optional system turn) that is not the user's",)),
        ('{"messages": [{"content": "q"}]}', None, (":2: field 'messages'[0].role must be one of", "got null")),
        ('{"messages": [{"role": "user", "content": 3}]}', None,
         (":2: field 'messages'[0].content must be a string, got a number",)),
        ('{"messages": [{"role": "user"}]}', None, (":2: field 'messages'[0].content must be a string, but it is missing",)),
        (r'{"messages": [{"role": "user", "content": "\udfff"}]}', None, (":2: field 'messages'[0].content", "lone surrogate")),
        (f'{{"messages": [{_USER}]}}', None,
         (":2: field 'messages' has a last turn that is not the assistant's (at [0])", "ending with a assistant turn")),
        (f'{{"messages": [{_USER}, {_USER}, {_ASSISTANT}]}}', None, (":2: field 'messages' has two turns of one role in a row (at [1])",)),
        (f'{{"messages": [{_ASSISTANT}]}}', None, (":2: field 'messages' has a first turn", "(at [0])")),
        (f'{{"messages": [{_USER}, {{"role": "system", "content": "s"}}, {_ASSISTANT}]}}', None, ("a system turn that is not the first turn (at [1])",)),
        (f'{{"id": 5, "messages": [{_USER}, {_ASSISTANT}]}}', None, (":2: field 'id' must be a string, got a number",)),
        (f'{{"source": ["s"], "messages": [{_USER}, {_ASSISTANT}]}}', None, (":2: field 'source' must be a string, got an array",)),
    ],
    ids=[
        "array_line",
        "string_line",
        "null_line",
        "broken_line",
        "invalid_utf8",
        "missing_output",
        "missing_instruction",
        "number_instruction",
        "nan_output",
        "number_input",
        "lone_surrogate",
        "deep_nesting",
        "huge_integer",
        "empty_object",
        "messages_string",
        "messages_empty",
        "turn_string",
        "tool_role",
        "missing_role",
        "number_content",
        "missing_content",
        "lone_surrogate_content",
        "trailing_user_turn",
        "repeated_role",
        "assistant_first",
        "system_in_the_middle",
        "number_id",
        "list_source",
    ],
)
def test_read_conversations_hostile_prepared_file(
    tmp_path: Path, line: str | None, raw: bytes | None, fragments: tuple[str, ...]
) -> None:
    path = tmp_path / "sft_train.jsonl"
    path.write_bytes((PREPARED_OK + "\n").encode() + (raw if raw is not None else (line + "\n").encode()))
    with pytest.raises(DataError) as info:
        read_conversations(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_read_conversations_accepts_bom_crlf_null_input_and_line_separators(tmp_path: Path) -> None:
    path = tmp_path / "sft_val.jsonl"
    second = '{"instruction": "a\u2028b", "input": null, "output": "c"}'
    third = '{"messages": [{"role": "user", "content": "d\u2029e"}, {"role": "assistant", "content": "f"}]}'
    path.write_bytes(b"\xef\xbb\xbf" + f"{OLD_LAYOUT_OK}\r\n\r\n{second}\r\n{PREPARED_OK}\r\n{third}\r\n".encode())
    records = read_conversations(path)
    assert [r["messages"][0]["content"] for r in records] == ["a", "a\u2028b", "a", "d\u2029e"]


def test_read_conversations_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a directory"):
        read_conversations(tmp_path)
