"""sft.data.prepared: the reader of prepared files, on what prepare writes and on broken files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sft.data.formats import conversation_id, record_id
from sft.data.prepare import TRAIN_FILE, VAL_FILE, prepare
from sft.data.prepared import read_conversations, read_preferences, read_prompts
from sft.errors import DataError


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def chat(*pairs: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in zip(pairs[::2], pairs[1::2])]


def old_layout(i: int) -> dict[str, str]:
    """A record of the older prepared Alpaca layout; every other one has an input."""
    return {"id": f"rec-{i}", "instruction": f"Do {i}.", "input": f"with {i}" if i % 2 else "",
            "output": f"Done {i}.", "source": "alpaca"}


# --- what prepare writes reads back -----------------------------------------------------------


def test_prepare_output_reads_back_as_written(tmp_path: Path) -> None:
    raw = [{"messages": chat("system", "Be brief.", "user", f"Q{i}", "assistant", f"A{i}", "user", "Why?",
                             "assistant", "Because.")} for i in range(20)]
    src = write_jsonl(tmp_path / "raw.jsonl", raw)
    prepare([src], tmp_path / "out", val_fraction=0.3)
    for name in (TRAIN_FILE, VAL_FILE):
        lines = [json.loads(line) for line in (tmp_path / "out" / name).read_text(encoding="utf-8").splitlines()]
        assert read_conversations(tmp_path / "out" / name) == lines
        assert all(r["id"] == conversation_id(tuple((m["role"], m["content"]) for m in r["messages"]
                                                     if m["role"] != "assistant")) for r in lines)


# --- the older Alpaca layout ------------------------------------------------------------------


def test_old_layout_reads_as_one_user_and_one_assistant_turn(tmp_path: Path) -> None:
    records = [old_layout(i) for i in range(4)] + [{"instruction": "Übersetze 日本語 🙂", "output": "ok"}]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    path.write_text(path.read_text(encoding="utf-8") + "\n   \n", encoding="utf-8")
    assert read_conversations(path) == [
        {"id": "rec-0", "source": "alpaca", "messages": chat("user", "Do 0.", "assistant", "Done 0.")},
        {"id": "rec-1", "source": "alpaca", "messages": chat("user", "Do 1.\n\nwith 1", "assistant", "Done 1.")},
        {"id": "rec-2", "source": "alpaca", "messages": chat("user", "Do 2.", "assistant", "Done 2.")},
        {"id": "rec-3", "source": "alpaca", "messages": chat("user", "Do 3.\n\nwith 3", "assistant", "Done 3.")},
        {"id": record_id("Übersetze 日本語 🙂", ""), "source": None,
         "messages": chat("user", "Übersetze 日本語 🙂", "assistant", "ok")},
    ]


def test_absent_ids_are_the_ones_prepare_gives(tmp_path: Path) -> None:
    messages = chat("user", "q", "assistant", "a")
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "i", "input": "x", "output": "o"},
                                                  {"messages": messages}])
    first, second = read_conversations(path)
    assert first["id"] == record_id("i", "x")
    assert second == {"id": conversation_id((("user", "q"),)), "source": None, "messages": messages}


def test_extra_fields_are_dropped_and_text_is_not_changed(tmp_path: Path) -> None:
    messages = chat("user", "  spaced \r\n", "assistant", "cafe\u0301")
    path = write_jsonl(tmp_path / "train.jsonl", [{"id": "x", "source": "s", "messages": messages, "score": 3}])
    assert read_conversations(path) == [{"id": "x", "source": "s", "messages": messages}]


# --- broken files: file, line and field named -------------------------------------------------


def test_names_file_and_line_of_broken_json(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_conversations(path)
    assert str(info.value).startswith(f"{path}:3:")
    assert "invalid JSON" in str(info.value)


@pytest.mark.parametrize("field, bad", [("instruction", 5), ("output", None), ("output", ["a"])])
def test_names_file_line_and_field_of_a_non_string(tmp_path: Path, field: str, bad: Any) -> None:
    record = {"instruction": "a", "output": "b"} | {field: bad}
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "x", "output": "y"}, record])
    with pytest.raises(DataError, match=f"field '{field}' must be a string") as info:
        read_conversations(path)
    assert str(info.value).startswith(f"{path}:2:")


def test_missing_output_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "x"}])
    with pytest.raises(DataError, match="field 'output' must be a string") as info:
        read_conversations(path)
    assert str(info.value).startswith(f"{path}:1:")


@pytest.mark.parametrize("line", ['["instruction", "output"]', "null"])
def test_a_line_that_is_not_an_object(tmp_path: Path, line: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_conversations(path)
    assert str(info.value).startswith(f"{path}:2:")


def test_missing_file_says_how_to_make_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="not found") as info:
        read_conversations(path)
    assert str(path) in str(info.value) and "prepare_sft_data.py" in str(info.value)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (chat("user", "q", "assistant", "a", "user", "more?"),
         "field 'messages' has a last turn that is not the assistant's (at [2])"),
        (chat("user", "q", "user", "q2", "assistant", "a"), "field 'messages' has two turns of one role in a row (at [1])"),
        (chat("user", "q", "function_call", "{}", "assistant", "a"),
         "field 'messages'[1].role must be one of system, user, assistant, tool, got \"function_call\""),
        (chat("user", "q", "tool", "{}", "assistant", "a"),
         "field 'messages' has a tool turn that follows no assistant turn with tool calls (at [1])"),
    ],
)
def test_conversation_rules_are_checked(tmp_path: Path, messages: list[dict[str, str]], message: str) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"id": "1", "messages": messages}])
    with pytest.raises(DataError) as info:
        read_conversations(path)
    assert str(info.value).startswith(f"{path}:1: {message}")


CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def tool_messages() -> list[dict]:
    return [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL], "reasoning": "Call the tool."},
            {"role": "tool", "content": "21 degrees"},
            {"role": "assistant", "content": "It is 21 degrees.", "reasoning": "Read the result."}]


def test_tools_tool_calls_and_reasoning_are_carried(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"id": "t", "messages": tool_messages(), "tools": [TOOL]},
                                                  {"id": "p", "messages": chat("user", "q", "assistant", "a")}])
    with_tools, plain = read_conversations(path)
    assert with_tools == {"id": "t", "source": None, "messages": tool_messages(), "tools": [TOOL]}
    assert "tools" not in plain


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(tools={"name": "x"}), "field 'tools' must be a list of {\"type\": \"function\""),
        (lambda r: r.update(tools=[{"name": "x"}]), "field 'tools'[0] must be {\"type\": \"function\""),
        (lambda r: r["messages"][1].update(tool_calls=[{"type": "function", "function": {"name": "f", "arguments": "{}"}}]),
         "field 'messages'[1].tool_calls[0] must be {\"type\": \"function\", \"function\": {\"name\", \"arguments\": {...}}}"),
        (lambda r: r["messages"][1].update(tool_calls=[]), "field 'messages'[1].tool_calls must hold at least one call"),
        (lambda r: r["messages"][3].update(reasoning=5), "field 'messages'[3].reasoning must be a string, got a number"),
        (lambda r: r["messages"][1].pop("tool_calls"),
         "field 'messages' has a tool turn that follows no assistant turn with tool calls (at [2])"),
        (lambda r: r["messages"].__delitem__(2),
         "field 'messages' has an assistant turn with tool calls not followed by a tool turn (at [2])"),
    ],
)
def test_broken_tool_fields_are_refused_naming_the_field(tmp_path: Path, change, message: str) -> None:
    record = {"id": "t", "messages": tool_messages(), "tools": [TOOL]}
    change(record)
    path = write_jsonl(tmp_path / "train.jsonl", [record])
    with pytest.raises(DataError) as info:
        read_conversations(path)
    assert str(info.value).startswith(f"{path}:1: {message}")


def test_preference_prompts_have_no_tool_turns(tmp_path: Path) -> None:
    record = {"prompt": tool_messages()[:3] + [{"role": "user", "content": "And?"}], "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [record])
    with pytest.raises(DataError, match="field 'prompt'\\[2\\].role must be one of system, user, assistant, got"):
        read_preferences(path)


def test_prompts_leave_out_a_final_answer_and_get_the_id_prepare_gives(tmp_path: Path) -> None:
    user = {"role": "user", "content": "Say hi."}
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "messages": [user, {"role": "assistant", "content": "Hi"}], "extra": 1},
        {"messages": [user], "source": "s"}]) + "\n", encoding="utf-8")
    (first, a), (second, b) = read_prompts(path, "make prompts")
    assert (first, second) == (f"{path}:1", f"{path}:2")
    assert a == {"id": "a", "source": None, "messages": [user], "extra": 1}
    assert b == {"id": conversation_id((("user", "Say hi."),)), "source": "s", "messages": [user]}
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "Hi"}]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"^{path}:1: field 'messages' has a first turn"):
        read_prompts(path, "make prompts")
    with pytest.raises(DataError, match="run `make prompts` first"):
        read_prompts(tmp_path / "missing.jsonl", "make prompts")
