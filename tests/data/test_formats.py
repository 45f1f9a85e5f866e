"""The shapes of raw conversation records: each in every file type, detection, and a real demo set."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sft.data.formats import CONVERSATION, RecordRejected, choose_shape, conversation_id, record_id, shapes
from sft.data.prepare import REJECTS_FILE, TRAIN_FILE, VAL_FILE, main, prepare
from sft.data.prepared import read_conversations
from sft.data.sources import Source, read_source
from sft.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def chat(*pairs: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in zip(pairs[::2], pairs[1::2])]


def sharegpt(*pairs: str) -> dict[str, Any]:
    return {"conversations": [{"from": role, "value": text} for role, text in zip(pairs[::2], pairs[1::2])]}


# Per shape: raw records (two good ones, a later copy of the first prompt with another answer,
# two broken ones), the conversations kept, and the reasons of the rejects, in file order.
CASES: dict[str, tuple[list[dict[str, Any]], list[list[dict[str, str]]], list[str]]] = {
    "alpaca": (
        [{"instruction": "Add 2 and 2.", "input": "", "output": "5"},
         {"instruction": "Sort these.", "input": "b, a", "output": "a, b"},
         {"instruction": " Add 2 and 2.\r\n", "input": "", "output": "4"},
         {"instruction": " ", "input": "", "output": "x"},
         {"instruction": "Say hi.", "input": "", "output": "\t"}],
        [chat("user", "Add 2 and 2.", "assistant", "4"), chat("user", "Sort these.\n\nb, a", "assistant", "a, b")],
        ["duplicate_replaced", "empty_instruction", "empty_output"],
    ),
    "sharegpt": (
        [sharegpt("system", "Be brief.", "human", "Hi", "gpt", "Hello", "human", "Bye", "gpt", "Bye"),
         sharegpt("user", "Add 2 and 2.", "assistant", "4"),
         sharegpt("system", "Be brief.", "human", "Hi", "gpt", "Hey", "human", "Bye", "gpt", "See you"),
         sharegpt("human", "Hi", "gpt", "Hello", "human", "And?"),
         sharegpt("human", "Weather?", "function_call", "{}", "observation", "{}", "gpt", "Sunny")],
        [chat("system", "Be brief.", "user", "Hi", "assistant", "Hey", "user", "Bye", "assistant", "See you"),
         chat("user", "Add 2 and 2.", "assistant", "4")],
        ["duplicate_replaced", "last_turn_not_assistant", "tool_call_invalid"],
    ),
    "messages": (
        [{"messages": chat("user", "Hi", "assistant", "Hello")},
         {"messages": chat("system", "Be brief.", "user", "Add 2 and 2.", "assistant", "4")},
         {"messages": chat("user", "Hi\r\n", "assistant", "Hey")},
         {"messages": chat("user", "Hi", "user", "Hello?", "assistant", "Yes")},
         {"messages": chat("user", "Hi", "assistant", " ")}],
        [chat("user", "Hi", "assistant", "Hey"), chat("system", "Be brief.", "user", "Add 2 and 2.", "assistant", "4")],
        ["duplicate_replaced", "repeated_role", "empty_turn"],
    ),
    "prompt_completion": (
        [{"prompt": "Add 2 and 2.", "completion": "5"},
         {"prompt": "Name a colour.", "completion": "Blue."},
         {"prompt": "Add 2 and 2.", "completion": "4"},
         {"prompt": "\n", "completion": "x"},
         {"prompt": "Say hi.", "completion": ""}],
        [chat("user", "Add 2 and 2.", "assistant", "4"), chat("user", "Name a colour.", "assistant", "Blue.")],
        ["duplicate_replaced", "empty_prompt", "empty_completion"],
    ),
}


def as_json(records: list[dict[str, Any]]) -> bytes:
    return json.dumps(records, indent=1).encode()


def as_jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def columns(records: list[dict[str, Any]]) -> list[str]:
    """Every field of any record, in order of first appearance: a table needs them all."""
    return list(dict.fromkeys(key for record in records for key in record))


def as_csv(records: list[dict[str, Any]]) -> bytes:
    """CSV with a header; lists and objects go into their cells as JSON text, absent fields stay empty."""
    text = io.StringIO()
    writer = csv.DictWriter(text, columns(records))
    writer.writeheader()
    writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in records)
    return text.getvalue().encode()


def as_parquet(records: list[dict[str, Any]]) -> bytes:
    """A Parquet table; absent fields are nulls."""
    buffer = io.BytesIO()
    names = columns(records)
    pq.write_table(pa.Table.from_pylist([{name: r.get(name) for name in names} for r in records]), buffer)
    return buffer.getvalue()


WRITERS: dict[str, Callable[[list[dict[str, Any]]], bytes]] = {
    "json": as_json, "jsonl": as_jsonl, "csv": as_csv, "parquet": as_parquet}


def kept_messages(out_dir: Path) -> list[list[dict[str, str]]]:
    rows = [json.loads(line) for name in (TRAIN_FILE, VAL_FILE)
            for line in (out_dir / name).read_text(encoding="utf-8").splitlines()]
    return sorted((row["messages"] for row in rows), key=json.dumps)


@pytest.mark.parametrize("suffix", list(WRITERS))
@pytest.mark.parametrize("shape", list(CASES))
def test_every_shape_in_every_file_type(tmp_path: Path, shape: str, suffix: str) -> None:
    records, kept, reasons = CASES[shape]
    src = tmp_path / f"raw.{suffix}"
    src.write_bytes(WRITERS[suffix](records))
    report = prepare([src], tmp_path / "out")
    rejected = {reason: 1 for reason in reasons if reason != "duplicate_replaced"}
    assert report["sources"] == [{"path": str(src), "format": shape, "read": 5, "kept": 2,
                                  "rejected": dict(sorted(rejected.items())), "replaced": 1}]
    assert kept_messages(tmp_path / "out") == sorted(kept, key=json.dumps)
    rejects = [json.loads(line) for line in (tmp_path / "out" / REJECTS_FILE).read_text().splitlines()]
    positions = [position for position, _ in read_source(src).items]  # lines, items or rows
    assert [(r["position"], r["reason"]) for r in rejects] == [
        (positions[0], reasons[0]), (positions[3], reasons[1]), (positions[4], reasons[2])]
    assert rejects[0]["replaced_by"] == {"source": str(src), "position": positions[2]}


@pytest.mark.parametrize("shape", list(CASES))
def test_format_flag_reads_a_shape_without_detection(tmp_path: Path, shape: str) -> None:
    src = tmp_path / "raw.jsonl.gz"
    src.write_bytes(gzip.compress(as_jsonl(CASES[shape][0])))
    out_dir = tmp_path / "out"
    assert main(["--source", str(src), "--out-dir", str(out_dir), "--format", shape]) == 0
    assert json.loads((out_dir / "prepare_report.json").read_text())["total"]["kept"] == 2


def test_format_flag_rejects_records_of_another_shape(tmp_path: Path) -> None:
    src = tmp_path / "raw.jsonl"
    src.write_bytes(as_jsonl(CASES["alpaca"][0][:2] + CASES["messages"][0][:1]))
    report = prepare([src], tmp_path / "out", format_name="alpaca")
    assert report["total"] == {"read": 3, "kept": 2, "rejected": {"missing_instruction": 1}, "replaced": 0}


def test_unknown_format_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--format", "oasst"])
    assert "invalid choice: 'oasst'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="format must be one of auto, alpaca, sharegpt, messages, prompt_completion"):
        prepare([], tmp_path, format_name="oasst")


# --- detection -----------------------------------------------------------------------------------


def detect(items: list[Any], unit: str = "line") -> str | None:
    shape = choose_shape(Source("f.jsonl", list(enumerate(items, start=1)), unit), CONVERSATION)
    return None if shape is None else shape.name


@pytest.mark.parametrize(
    ("items", "name"),
    [
        ([{"instruction": "i", "output": "o"}], "alpaca"),
        ([{"output": "o"}], "alpaca"),
        (["junk", {}, {"conversations": []}], "sharegpt"),
        ([{"messages": "not even a list"}, {"instruction": "i", "messages": []}], "messages"),
        ([{"prompt": "p", "completion": "c", "meta": {"instruction": 1}}], "prompt_completion"),
        ([{"prompt": "p", "chosen": "c", "rejected": "r"}], "prompt_completion"),
        ([], None),
    ],
)
def test_detection_by_the_first_record_of_a_known_shape(items: list[Any], name: str | None) -> None:
    assert detect(items) == name


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([{"instruction": "i", "output": "o"}, {"prompt": "p", "completion": "c"}],
         ("f.jsonl: line 2 has the prompt_completion (prompt, completion) shape but line 1 has the alpaca "
         "(instruction, input, output) shape; expected one shape per file (split the file, or pass --format to "
         "read every record as one shape)")),
        ([{"messages": [], "conversations": []}],
         ("f.jsonl: line 1 fits several shapes, sharegpt (conversations) and messages (messages); "
         "pass --format to say which")),
        ([{}, None], ("f.jsonl: no record has a known shape (line 1 is an object); expected one of: alpaca "
                     "(instruction, input, output), sharegpt (conversations), messages (messages), "
                     "prompt_completion (prompt, completion)")),
        (["x" * 1000], "f.jsonl: no record has a known shape (line 1 is a string)"),
    ],
)
def test_detection_errors_name_the_file_the_record_and_what_was_expected(items: list[Any], message: str) -> None:
    with pytest.raises(DataError) as info:
        detect(items)
    assert str(info.value).startswith(message)


def test_detection_names_records_by_their_unit() -> None:
    with pytest.raises(DataError, match="row 2 has the messages .* but row 1 has the alpaca"):
        detect([{"output": "o"}, {"messages": []}], unit="row")


def test_reasons_carry_the_turn_they_are_about() -> None:
    convert = shapes(CONVERSATION)["sharegpt"].convert
    with pytest.raises(RecordRejected) as info:
        convert(sharegpt("human", "q", "gpt", "a", "human", "q2", "observation", "{}"))
    assert (info.value.reason, info.value.detail) == ("tool_without_call", "conversations[3]")


# --- a real multi-turn ShareGPT set -----------------------------------------------------------------


def test_glaive_toolcall_demo_prepares_with_exact_counts(tmp_path: Path) -> None:
    src = SHARED_DATA / "llamafactory" / "glaive_toolcall_en_demo.json.gz"
    if not src.is_file():
        pytest.skip(f"{src} is not on this machine")
    report = prepare([src], tmp_path / "out")
    # Every record is kept, its function_call turns as assistant tool calls and its observations as
    # tool turns, with its tool list; 36 repeat the user turns, tool results and tools of a later one.
    assert report["sources"] == [{"path": str(src), "format": "sharegpt", "read": 300, "kept": 264,
                                  "rejected": {}, "replaced": 36}]
    source = read_source(src)
    assert sum(any(t["from"] in ("function_call", "observation") for t in item["conversations"])
               for _, item in source.items) == 153
    rows = [row for name in (TRAIN_FILE, VAL_FILE) for row in read_conversations(tmp_path / "out" / name)]
    assert len(rows) == report["train"] + report["val"] == 264
    calls = [m for row in rows for m in row["messages"] if m.get("tool_calls")]
    results = [m for row in rows for m in row["messages"] if m["role"] == "tool"]
    assert len(calls) == len(results) > 150
    assert all(m["content"] == "" and len(m["tool_calls"]) == 1 for m in calls)
    first = next(row for row in rows if row["messages"][1].get("tool_calls"))
    assert {tool["function"]["name"] for tool in first["tools"]} >= {first["messages"][1]["tool_calls"][0]["function"]["name"]}
    assert sum("tools" in row for row in rows) == 171  # distinct keys among the 191 records with a tool list


# --- LLaMA-Factory's system and history, tools, reasoning ----------------------------------------


def convert(shape: str, item: dict[str, Any]):
    return shapes(CONVERSATION)[shape].convert(item)


def test_alpaca_system_and_history_become_turns() -> None:
    """Issue 23 item 14: the record prepared to one turn without context before."""
    item = {"instruction": "And the third?", "output": "Yellow.", "system": "You are a color bot.",
            "history": [["Name a primary color.", "Red."], ["Another one?", "Blue."]]}
    prepared = convert("alpaca", item)
    assert prepared.fields == {"messages": chat("system", "You are a color bot.", "user", "Name a primary color.",
                                                "assistant", "Red.", "user", "Another one?", "assistant", "Blue.",
                                                "user", "And the third?", "assistant", "Yellow.")}
    assert prepared.id == conversation_id(prepared.key) != record_id("And the third?", "")
    plain = convert("alpaca", {"instruction": "And the third?", "output": "Yellow.", "system": "", "history": []})
    assert plain.fields == {"messages": chat("user", "And the third?", "assistant", "Yellow.")}
    assert plain.id == record_id("And the third?", "")  # records without them keep their ids


@pytest.mark.parametrize(("history", "reason", "detail"), [
    ("Red.", "history_invalid", "history is a string"),
    ([["Name one."]], "history_invalid", "history[0] is not a [user, assistant] pair"),
    ([["Name one.", " "]], "empty_turn", "history[0][1]"),
    ([["Name one.", 3]], "content_not_string", "history[0][1]"),
])
def test_a_broken_alpaca_history_is_a_reject(history: Any, reason: str, detail: str) -> None:
    with pytest.raises(RecordRejected) as info:
        convert("alpaca", {"instruction": "q", "output": "a", "history": history})
    assert (info.value.reason, info.value.detail) == (reason, detail)


def test_sharegpt_top_level_system_becomes_the_system_turn(tmp_path: Path) -> None:
    item = sharegpt("human", "Hi", "gpt", "Hello") | {"system": "Be brief."}
    assert convert("sharegpt", item).fields == {"messages": chat("system", "Be brief.", "user", "Hi", "assistant", "Hello")}
    with pytest.raises(RecordRejected) as info:
        convert("sharegpt", sharegpt("system", "Be long.", "human", "Hi", "gpt", "Hello") | {"system": "Be brief."})
    assert (info.value.reason, info.value.detail) == ("system_given_twice", "system and conversations[0]")
    src = tmp_path / "raw.jsonl"
    src.write_text(json.dumps(item) + "\n" + json.dumps(sharegpt("human", "Hi", "gpt", "Hello")) + "\n", encoding="utf-8")
    report = prepare([src], tmp_path / "out")
    assert report["sources"][0] | {"path": None} == {"path": None, "format": "sharegpt", "read": 2, "kept": 2,
                                                      "rejected": {}, "replaced": 0}


WEATHER = {"name": "get_weather", "description": "The weather now.", "parameters": {"type": "object"}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def test_llamafactory_function_call_and_observation_turns() -> None:
    item = sharegpt("human", "Weather?", "function_call", '{"name": "get_weather", "arguments": {"city": "Paris"}}',
                    "observation", '{"temperature": 21}', "gpt", "21 degrees.") | {"tools": json.dumps([WEATHER])}
    prepared = convert("sharegpt", item)
    assert prepared.fields == {
        "messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                     {"role": "tool", "content": '{"temperature": 21}'}, {"role": "assistant", "content": "21 degrees."}],
        "tools": [{"type": "function", "function": WEATHER}]}
    other_tools = convert("sharegpt", item | {"tools": "[]"})
    assert "tools" not in other_tools.fields and other_tools.key != prepared.key


def test_openai_tool_calls_with_arguments_as_json_text() -> None:
    item = {"messages": [{"role": "user", "content": "Weather?"},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "c1", "type": "function",
                              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "21"},
                         {"role": "assistant", "content": "21 degrees."}],
            "tools": [{"type": "function", "function": WEATHER}]}
    messages = convert("messages", item).fields["messages"]
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [CALL | {"id": "c1"}]}
    assert messages[2] == {"role": "tool", "content": "21"}


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content", "thinking", "think"])
def test_an_assistants_reasoning_is_kept_under_any_of_its_names(field: str) -> None:
    item = {"messages": [{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4", field: " Two and two make four.\r\n"}]}
    assert convert("messages", item).fields["messages"][1] == {"role": "assistant", "content": "4",
                                                               "reasoning": "Two and two make four."}
    item["messages"][1]["reasoning_content" if field != "reasoning_content" else "reasoning"] = "Other."
    with pytest.raises(RecordRejected, match="reasoning_given_twice"):
        convert("messages", item)


def test_preference_pairs_still_refuse_tool_turns() -> None:
    with pytest.raises(RecordRejected, match="tool_role"):
        shapes("preference")["sharegpt"].convert(
            sharegpt("human", "q", "function_call", "{}") | {"chosen": {"from": "gpt", "value": "a"},
                                                           "rejected": {"from": "gpt", "value": "b"}})
