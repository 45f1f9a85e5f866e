"""The one reader of prepared files: conversations for SFT, preference pairs for DPO.

Prepared files are what ``prepare_sft_data.py`` and ``prepare_dpo_data.py`` write, one JSON object
a line; training and evaluation read them only through here, so a broken file is stopped with
one message naming the file, the line and the field, before a model is loaded.

A conversation line is ``{"id", "source", "messages": [{"role", "content"}, ...]}``, with
``"tools": [{"type": "function", "function": {"name", ...}}, ...]`` where the conversation uses
tools; its assistant turns may carry ``"reasoning"`` (text) and ``"tool_calls": [{"type":
"function", "function": {"name", "arguments": {...}}}, ...]`` (their text may then be empty), and
``tool`` turns hold a tool's result, after an assistant turn with tool calls. A line of the
older Alpaca layout, ``{"id", "instruction", "input", "output", "source"}``, still reads, as the
conversation of one user turn (the instruction, then the input after a blank line when there is
one) and one assistant turn. A preference line is ``{"id", "source", "prompt": [messages ending
with a user turn], "chosen": "text", "rejected": "text"}``, without tools; an unpaired (KTO) line
is ``{"id", "source", "prompt": [...], "completion": "text", "label": true or false}``. Roles are
system, user and assistant (and tool): an optional system turn first, then user and assistant
turns alternating.

Text is returned as written: prepare has normalized it already, and a reader that changed text
would make training differ from the file a person inspects. An ``id`` that is absent is the one
prepare would have given the record; a ``source`` that is absent is None.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sft.data.formats import (
    ROLES,
    TOOL_ROLE,
    TURN_ORDER_PROBLEMS,
    alpaca_user_text,
    conversation_id,
    conversation_key,
    record_id,
    turn_order_problem,
)
from sft.data.sources import describe_json_type, read_jsonl
from sft.errors import DataError

_ALPACA_FIELDS = ("instruction", "input", "output")


def read_conversations(path: str | Path) -> list[dict[str, Any]]:
    """The conversations of a prepared SFT file, as ``{"id", "source", "messages"}`` dicts.

    Anything unusable raises DataError naming the file, the line and, for a bad field, the field
    and what was expected: a missing file, invalid UTF-8, a line that is not JSON (or nests too
    deeply to parse), a line that is not an object, a ``messages`` list whose turns are not
    ``{"role", "content"}`` objects of a known role and string content or break the turn order
    (ending with an assistant turn), an older-layout ``instruction`` or ``output`` that is not a
    string or an ``input`` that is neither a string nor null, text holding a lone surrogate, or an
    ``id`` or ``source`` that is not a string.
    """
    return [_conversation(where, record) for where, record in _lines(Path(path), "python scripts/prepare_sft_data.py")]


def read_preferences(path: str | Path) -> list[dict[str, Any]]:
    """The pairs of a prepared DPO file, as ``{"id", "source", "prompt", "chosen", "rejected"}`` dicts.

    ``prompt`` is a list of messages ending with a user turn; ``chosen`` and ``rejected`` are the
    two answers' texts. Problems raise DataError as :func:`read_conversations` does.
    """
    return [_preference(where, record) for where, record in _lines(Path(path), "python scripts/prepare_dpo_data.py")]


def read_prompts(path: str | Path, producer: str) -> list[tuple[str, dict[str, Any]]]:
    """``("<path>:<line>", record)`` for every line of a file of prompts to answer (``producer`` names
    the command that writes them): ``messages`` checked as a preference prompt is, ending with a
    user turn (a final assistant turn, a reference answer, is left out: the model writes its own),
    with the ``id`` and ``source`` of :func:`read_conversations`; the other fields are the caller's."""
    prompts = []
    for where, record in _lines(Path(path), producer):
        turns = record.get("messages")
        if isinstance(turns, list) and len(turns) > 1 and isinstance(turns[-1], dict) \
                and turns[-1].get("role") == "assistant":
            record = record | {"messages": turns[:-1]}
        messages = _messages(where, record, "messages", last="user")
        key = tuple((m["role"], m["content"]) for m in messages)
        prompts.append((where, record | _header(where, record, lambda key=key: conversation_id(key))
                        | {"messages": messages}))
    return prompts


def read_unpaired(path: str | Path) -> list[dict[str, Any]]:
    """The examples of a prepared KTO file, as ``{"id", "source", "prompt", "completion", "label"}``
    dicts, ``label`` True for a desirable completion.

    A file of preference pairs reads as unpaired examples too, as TRL's ``unpair_preference_dataset``
    splits them: each pair's chosen answer a desirable example and its rejected answer an
    undesirable one, the desirable ones first, each in file order. A file mixing both layouts, and
    any line :func:`read_preferences` would refuse, raise DataError naming the file and the line."""
    lines = list(_lines(Path(path), "python scripts/prepare_dpo_data.py"))
    unpaired = [where for where, record in lines if _is_unpaired(record)]
    if not unpaired:
        pairs = [_preference(where, record) for where, record in lines]
        return [_example(pair, side) for side in ("chosen", "rejected") for pair in pairs]
    if len(unpaired) < len(lines):
        paired = next(where for where, record in lines if not _is_unpaired(record))
        raise DataError(f"{paired}: a preference pair, but {unpaired[0]} is an unpaired example (prompt, completion, "
                        f"label); a prepared file holds one or the other")
    return [_unpaired(where, record) for where, record in lines]


def _lines(path: Path, producer: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("<path>:<line>", object)`` for every non-blank line of a prepared JSONL file; ``producer`` is
    the command that writes such files, named when the file is missing."""
    missing = f"{path} not found: run `{producer}` first (or set train_file / val_file)"
    for line_number, record in read_jsonl(path, "a prepared JSONL file", missing):
        where = f"{path}:{line_number}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {describe_json_type(record)}")
        yield where, record


def _conversation(where: str, record: dict[str, Any]) -> dict[str, Any]:
    """One line of a prepared SFT file as a conversation, whichever layout it has."""
    if "messages" not in record and any(name in record for name in _ALPACA_FIELDS):
        return _alpaca_conversation(where, record)
    messages = _messages(where, record, "messages", last="assistant", tools=True)
    tools = _tools(where, record)
    key = conversation_key(messages, tools)
    return _header(where, record, lambda: conversation_id(key)) | {"messages": messages} | (
        {"tools": tools} if tools else {})


def _alpaca_conversation(where: str, record: dict[str, Any]) -> dict[str, Any]:
    """A line of the older Alpaca layout as the conversation it always stood for."""
    for name in ("instruction", "output", "input"):
        if name != "input" or record.get(name) is not None:
            _text(where, record, name)
    instruction, output = record["instruction"], record["output"]
    input_text = record.get("input") or ""
    messages = [{"role": "user", "content": alpaca_user_text(instruction, input_text)},
                {"role": "assistant", "content": output}]
    return _header(where, record, lambda: record_id(instruction, input_text)) | {"messages": messages}


def _is_unpaired(record: dict[str, Any]) -> bool:
    return "label" in record and "chosen" not in record


def _preference(where: str, record: dict[str, Any]) -> dict[str, Any]:
    """One line of a prepared DPO file."""
    if _is_unpaired(record):
        raise DataError(f"{where}: an unpaired example (prompt, completion, label), not a preference pair (prompt, "
                        f"chosen, rejected); only KTO (--loss-type kto) trains on unpaired examples")
    prompt = _messages(where, record, "prompt", last="user")
    answers = {side: _text(where, record, side) for side in ("chosen", "rejected")}
    key = tuple((m["role"], m["content"]) for m in prompt)
    return _header(where, record, lambda: conversation_id(key)) | {"prompt": prompt} | answers


def _unpaired(where: str, record: dict[str, Any]) -> dict[str, Any]:
    """One line of a prepared KTO file."""
    prompt = _messages(where, record, "prompt", last="user")
    completion = _text(where, record, "completion")
    if not isinstance(record["label"], bool):
        raise DataError(f"{where}: field 'label' must be true or false, got {describe_json_type(record['label'])}")
    key = tuple((m["role"], m["content"]) for m in prompt)
    return _header(where, record, lambda: conversation_id(key)) | {"prompt": prompt, "completion": completion,
                                                                   "label": record["label"]}


def _example(pair: dict[str, Any], side: str) -> dict[str, Any]:
    """One answer of a pair as an unpaired example: the chosen one desirable, the rejected one not."""
    return {"id": pair["id"], "source": pair["source"], "prompt": pair["prompt"], "completion": pair[side],
            "label": side == "chosen"}


def _header(where: str, record: dict[str, Any], default_id: Callable[[], str]) -> dict[str, Any]:
    """The ``id`` (computed as prepare would where absent) and ``source`` (None where absent)."""
    record_id_ = _text(where, record, "id") if "id" in record else default_id()
    source = None if record.get("source") is None else _text(where, record, "source")
    return {"id": record_id_, "source": source}


def _text(where: str, record: dict[str, Any], key: str, field: str | None = None) -> str:
    """``record[key]`` if it is usable text, else DataError naming ``field`` (default: the key)."""
    name = field or repr(key)
    value = record.get(key)
    if key not in record:
        raise DataError(f"{where}: field {name} must be a string, but it is missing")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name} must be a string, got {describe_json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: field {name} must be valid Unicode text, but holds a lone surrogate "
                        f"(an unpaired \\ud800-\\udfff escape)") from None
    return value


def _messages(where: str, record: dict[str, Any], key: str, last: str, tools: bool = False) -> list[dict[str, Any]]:
    """``record[key]`` as a list of messages in conversation order, ending with a ``last`` turn
    (with ``tools``, tool turns and an assistant's tool calls and reasoning are read too)."""
    value = record.get(key)
    roles = (*ROLES, TOOL_ROLE) if tools else ROLES
    expected = f'a list of {{"role", "content"}} objects with role {", ".join(roles)}'
    if not isinstance(value, list):
        found = "it is missing" if key not in record else f"got {describe_json_type(value)}"
        raise DataError(f"{where}: field {key!r} must be {expected}, but {found}")
    if not value:
        raise DataError(f"{where}: field {key!r} must be {expected}, but it is empty")
    messages = []
    for index, turn in enumerate(value):
        field = f"{key!r}[{index}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field {field} must be an object with 'role' and 'content', "
                            f"got {describe_json_type(turn)}")
        role = turn.get("role")
        if role not in roles:
            raise DataError(f"{where}: field {field}.role must be one of {', '.join(roles)}, got "
                            f"{json.dumps(role) if isinstance(role, str) else describe_json_type(role)}")
        message = {"role": role, "content": _text(where, turn, "content", f"{field}.content")}
        if tools and role == "assistant":
            if turn.get("reasoning") is not None:
                message["reasoning"] = _text(where, turn, "reasoning", f"{field}.reasoning")
            if turn.get("tool_calls") is not None:
                message["tool_calls"] = _functions(where, turn["tool_calls"], f"{field}.tool_calls", calls=True)
        messages.append(message)
    calls = {index for index, message in enumerate(messages) if message.get("tool_calls")}
    problem = turn_order_problem([m["role"] for m in messages], last, calls)
    if problem is not None:
        reason, index = problem
        raise DataError(f"{where}: field {key!r} has {TURN_ORDER_PROBLEMS[reason]} (at [{index}]); expected "
                        f"an optional system turn, then user and assistant turns alternating, ending with "
                        f"a {last} turn")
    return messages


def _tools(where: str, record: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The conversation's tool list, or None where it has none."""
    if record.get("tools") is None:
        return None
    return _functions(where, record["tools"], "'tools'", calls=False) or None


def _functions(where: str, value: Any, field: str, calls: bool) -> list[dict[str, Any]]:
    """``value`` if it is a list of ``{"type": "function", "function": {"name", ...}}`` objects, each
    function's name a string (and, for ``calls``, its ``arguments`` an object)."""
    shape = ('{"type": "function", "function": {"name", "arguments": {...}}}' if calls
             else '{"type": "function", "function": {"name", ...}}')
    if not isinstance(value, list):
        raise DataError(f"{where}: field {field} must be a list of {shape} objects, got {describe_json_type(value)}")
    for index, item in enumerate(value):
        function = item.get("function") if isinstance(item, dict) and item.get("type") == "function" else None
        if (not isinstance(function, dict) or not isinstance(function.get("name"), str)
                or (calls and not isinstance(function.get("arguments"), dict))):
            raise DataError(f"{where}: field {field}[{index}] must be {shape}")
        try:
            json.dumps(item, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where}: field {field}[{index}] holds a lone surrogate") from None
    if calls and not value:
        raise DataError(f"{where}: field {field} must hold at least one call")
    return value
