"""The shapes raw records come in, and how each becomes a conversation or a preference pair.

A *shape* is one layout of a raw record (Alpaca's ``instruction``/``input``/``output``, ShareGPT's
``conversations``, ...). The registry :data:`SHAPES` maps each to a test that recognises it and a
converter that turns one raw record into a :class:`Prepared` record, or raises
:class:`RecordRejected` with a short reason code (and, for a turn, a ``detail`` naming it, such as
``conversations[3]``). Two kinds of record are prepared from the same registry:

* ``conversation`` (SFT): an optional system turn, then user and assistant turns alternating,
  ending with an assistant turn. Written as ``messages``.
* ``preference`` (DPO): a prompt (the same rules, ending with a user turn) and two answers,
  ``chosen`` and ``rejected``, that differ; or, for KTO, an unpaired example: a prompt, one
  ``completion`` and its ``label`` (true: desirable, false: undesirable).

Text is normalized by :func:`normalize_text` (NFC, ``\\n`` line endings, outer whitespace trimmed)
so that copies differing only in encoding de-duplicate. Roles are matched exactly.

Conversations may use tools, in OpenAI's layout (a top-level ``tools`` list, assistant turns
with ``tool_calls``, ``tool`` turns with the results) or LLaMA-Factory's ShareGPT one (``tools``
as a JSON string, a ``function_call`` turn holding the call as JSON, an ``observation`` turn with
the result). Both are prepared as OpenAI's: ``tools`` is a list of ``{"type": "function",
"function": {"name", ...}}``, a call is ``{"type": "function", "function": {"name", "arguments":
{...}}}`` (arguments given as a JSON string are parsed), and a call's turn may have empty text.
Whether a model can be trained on them depends on its chat template, which prepare does not know:
tokenization rejects the record where the template does not render them. Preference pairs have
no tools (reason ``tool_role``). An assistant's reasoning, given as ``reasoning``,
``reasoning_content``, ``thinking`` or ``think``, is kept as ``reasoning``.

LLaMA-Factory's Alpaca ``system`` and ``history`` (``[[user, assistant], ...]``, the turns before
the instruction) and ShareGPT's top-level ``system`` become the system turn and the earlier turns.

A record's de-duplication key is its non-assistant turns and its tool list (for a preference pair,
its whole prompt; for an unpaired example, its prompt and completion), and its id a hash of its
prompt, so that the train/validation split of a record depends on its prompt alone. Alpaca records without system or history keep the id rule they
always had, :func:`record_id` of the normalized ``(instruction, input)``, so that prepared Alpaca
splits stay as they were.
"""

from __future__ import annotations

import hashlib
import json
import reprlib
import unicodedata
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sft.data.sources import CsvRecord, Source, describe_json_type
from sft.errors import DataError

CONVERSATION = "conversation"
PREFERENCE = "preference"
AUTO = "auto"

ROLES = ("system", "user", "assistant")
TOOL_ROLE = "tool"
REASONING_FIELDS = ("reasoning", "reasoning_content", "thinking", "think")
"""The names an assistant turn's reasoning comes under, prepared as ``reasoning``."""

Message = dict[str, Any]
Key = tuple[tuple[str, str], ...]

# Separates instruction from input in the Alpaca id hash; it cannot be confused with ordinary
# text, so ("ab", "c") and ("a", "bc") get different ids.
_KEY_SEPARATOR = "\x1f"


class RecordRejected(Exception):
    """A record cannot be used; ``reason`` is the short code that is counted and reported.

    ``detail`` says where in the record the problem is (``"conversations[3]: from 'bot'"``) when
    the reason alone would leave the reader searching a long conversation.
    """

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(reason if detail is None else f"{reason} ({detail})")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Prepared:
    """One usable record: the fields written after its id and source, its key and its id."""

    fields: dict[str, Any]
    key: Key
    id: str


# --- text ------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Return ``text`` in NFC with ``\\n`` line endings and no outer whitespace.

    NFC makes visually identical strings compare equal, so duplicates that
    differ only in how an accent was encoded are caught; line endings are
    unified so Windows-edited records dedupe against the rest. Inner
    whitespace is kept because it can be meaningful (code, poems, lists).
    The function is idempotent.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text).strip()


def _normalized_string(value: Any, name: str, detail: str | None = None) -> str:
    """Normalize ``value`` if it is a string that can be encoded as UTF-8."""
    if not isinstance(value, str):
        raise RecordRejected(f"{name}_not_string", detail)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RecordRejected(f"{name}_invalid_unicode", detail) from None
    return normalize_text(value)


def _check_unique(item: Mapping[str, Any], name: str) -> None:
    """Reject an object that gives field ``name`` more than once (see sources.DuplicateKeysObject)."""
    if name in getattr(item, "duplicate_keys", ()):
        raise RecordRejected(f"{name}_duplicate_key")


def _required_text(item: Mapping[str, Any], name: str) -> str:
    """Return the normalized, non-empty string field ``name``."""
    _check_unique(item, name)
    if name not in item:
        raise RecordRejected(f"missing_{name}")
    text = _normalized_string(item[name], name)
    if not text:
        raise RecordRejected(f"empty_{name}")
    return text


def _optional_text(item: Mapping[str, Any], name: str) -> str:
    """Return the normalized string field ``name``, or "" if absent or null."""
    _check_unique(item, name)
    value = item.get(name)
    return "" if value is None else _normalized_string(value, name)


def _structured(item: Mapping[str, Any], name: str) -> Any:
    """The field ``name`` of a record, a CSV cell's JSON read as the list or object it holds."""
    return item.structured(name) if isinstance(item, CsvRecord) else item.get(name)


# --- ids and keys ----------------------------------------------------------------------------


def record_id(instruction: str, input_text: str) -> str:
    """Return the 16-hex-char id of a normalized Alpaca ``(instruction, input)`` pair."""
    key = f"{instruction}{_KEY_SEPARATOR}{input_text}".encode()
    return hashlib.sha256(key).hexdigest()[:16]


def conversation_id(key: Key) -> str:
    """Return the 16-hex-char id of a de-duplication key (a list of ``(role, content)`` turns).

    The key is hashed as compact JSON, which escapes the separator of :func:`record_id`, so a
    conversation's id never equals an Alpaca record's id unless their keys are one.
    """
    text = json.dumps([list(turn) for turn in key], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def alpaca_user_text(instruction: str, input_text: str) -> str:
    """The user turn of an Alpaca record: the instruction, then its input after a blank line."""
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def conversation_key(messages: list[Message], tools: list[dict[str, Any]] | None = None) -> Key:
    """The de-duplication key of a conversation: its non-assistant turns, then its tool list."""
    key = tuple((m["role"], m["content"]) for m in messages if m["role"] != "assistant")
    return key + ((("tools", json.dumps(tools, ensure_ascii=False, sort_keys=True)),) if tools else ())


def _conversation(messages: list[Message], record_id_: str | None = None,
                  tools: list[dict[str, Any]] | None = None) -> Prepared:
    """A validated conversation as a prepared record, keyed on its non-assistant turns and tools."""
    key = conversation_key(messages, tools)
    fields = {"messages": messages} | ({"tools": tools} if tools else {})
    return Prepared(fields, key, record_id_ or conversation_id(key))


# --- turn order ------------------------------------------------------------------------------

TURN_ORDER_PROBLEMS = {
    "misplaced_system": "a system turn that is not the first turn",
    "first_turn_not_user": "a first turn (after an optional system turn) that is not the user's",
    "repeated_role": "two turns of one role in a row",
    "last_turn_not_assistant": "a last turn that is not the assistant's",
    "last_turn_not_user": "a last turn that is not the user's",
    "tool_without_call": "a tool turn that follows no assistant turn with tool calls",
    "call_without_result": "an assistant turn with tool calls not followed by a tool turn",
    "user_after_tool": "a user turn right after a tool turn (the assistant answers the result first)",
}
"""Each way a sequence of roles can break the conversation rules, and how to say it."""


def turn_order_problem(roles: Sequence[str], last: str = "assistant",
                       calls: Collection[int] = ()) -> tuple[str, int] | None:
    """The first break of the turn order in ``roles``, as ``(reason, index)``, or None.

    The order is an optional system turn, then user and assistant turns alternating from a user
    turn, ending with a ``last`` turn. An assistant turn whose index is in ``calls`` (it calls
    tools) is followed by one or more tool turns, and those by an assistant turn. Roles are
    assumed to be among :data:`ROLES` and ``tool``.
    """
    previous = None
    for index, role in enumerate(roles):
        if role == "system":
            if index:
                return "misplaced_system", index
            continue
        called = previous == "assistant" and index - 1 in calls
        if previous is None and role != "user":
            return "first_turn_not_user", index
        if role == TOOL_ROLE:
            if not called and previous != TOOL_ROLE:
                return "tool_without_call", index
        elif called:
            return "call_without_result", index
        elif previous == TOOL_ROLE and role == "user":
            return "user_after_tool", index
        elif role == previous:
            return "repeated_role", index
        previous = role
    if previous != last:
        return f"last_turn_not_{last}", len(roles) - 1
    return None


# --- turns -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnLayout:
    """How one family of shapes spells a turn: the key of its role and text, its role names, and
    the names of its tool roles: ``tool`` for a tool's result, ``call`` for an assistant turn
    whose text is its tool call as JSON (LLaMA-Factory's ``function_call``)."""

    role_field: str
    content_field: str
    roles: Mapping[str, str]
    tool_roles: Mapping[str, str]


SHAREGPT_TURNS = TurnLayout(
    "from", "value",
    {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"},
    {"function_call": "call", "observation": TOOL_ROLE, "tool": TOOL_ROLE, "function": TOOL_ROLE},
)
OPENAI_TURNS = TurnLayout(
    "role", "content", {role: role for role in ROLES}, dict.fromkeys(("tool", "function", "ipython"), TOOL_ROLE))

Labeled = tuple[str, Message]
"""A turn and where it came from in the raw record (``"conversations[2]"``), for messages."""


def _turn(value: Any, layout: TurnLayout, where: str, tools: bool = False) -> Labeled:
    """Read one raw turn; its text is normalized but may be empty (checked with the order).

    With ``tools`` (conversations, not preference pairs), tool turns, an assistant's tool calls
    and its reasoning are read too; without, a tool role is rejected (``tool_role``)."""
    if not isinstance(value, dict):
        raise RecordRejected("turn_not_object", f"{where} is {describe_json_type(value)}")
    for name in (layout.role_field, layout.content_field):
        if name in getattr(value, "duplicate_keys", ()):
            raise RecordRejected("turn_duplicate_key", f"{where}: {name!r} given twice")
    if layout.role_field not in value:
        raise RecordRejected("missing_role", f"{where}: no {layout.role_field!r}")
    role = value[layout.role_field]
    shown = f"{where}: {layout.role_field} {reprlib.repr(role)}"
    if isinstance(role, str) and role in layout.tool_roles:
        if not tools:
            raise RecordRejected("tool_role", shown)
        kind = layout.tool_roles[role]
    elif not isinstance(role, str) or role not in layout.roles:
        raise RecordRejected("unknown_role", shown)
    else:
        kind = layout.roles[role]
    calls = value.get("tool_calls") if tools and kind == "assistant" else None
    if layout.content_field not in value and not calls:
        raise RecordRejected("missing_content", f"{where}: no {layout.content_field!r}")
    content = value.get(layout.content_field)
    content = "" if content is None and calls else _normalized_string(content, "content", where)
    if kind == "call":
        return where, {"role": "assistant", "content": "", "tool_calls": _tool_calls(_parsed_json(
            content, "tool_call_invalid", where), where)}
    message: Message = {"role": kind, "content": content}
    if tools and kind == "assistant":
        if calls:
            message["tool_calls"] = _tool_calls(calls, where)
        reasoning = _reasoning(value, where)
        if reasoning:
            message["reasoning"] = reasoning
    return where, message


def _parsed_json(value: Any, reason: str, where: str) -> Any:
    """``value``, read as JSON where it is a string (LLaMA-Factory writes tools and calls so)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        raise RecordRejected(reason, f"{where}: not valid JSON") from None


def _writable(value: Any, reason: str, where: str) -> Any:
    """``value`` if it can be written as UTF-8 JSON (no lone surrogate from a ``\\ud800`` escape)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError, RecursionError):
        raise RecordRejected(reason, f"{where}: not writable as UTF-8 JSON") from None
    return value


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """Tool calls as ``{"type": "function", "function": {"name", "arguments": {...}}}`` (plus an
    ``id`` where given), from OpenAI's layout or a bare ``{"name", "arguments"}``, one or a list."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RecordRejected("tool_call_invalid", f"{where}: no call")
    calls = []
    for item in items:
        function = item.get("function") if isinstance(item, dict) and isinstance(item.get("function"), dict) else item
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
            raise RecordRejected("tool_call_invalid", f"{where}: a call without a function name")
        arguments = _parsed_json(function.get("arguments", function.get("parameters", {})),
                                 "tool_call_arguments_invalid", where)
        if not isinstance(arguments, dict):
            raise RecordRejected("tool_call_arguments_invalid", f"{where}: arguments are not a JSON object")
        call = {"type": "function", "function": {"name": function["name"].strip(), "arguments": arguments}}
        if isinstance(item.get("id"), str):
            call["id"] = item["id"]
        calls.append(_writable(call, "tool_call_invalid", where))
    return calls


def _reasoning(value: Mapping[str, Any], where: str) -> str:
    """The reasoning of an assistant turn, under whichever of REASONING_FIELDS it comes ("" if none)."""
    given = {_normalized_string(value[name], "reasoning", where) for name in REASONING_FIELDS
             if value.get(name) is not None}
    given.discard("")
    if len(given) > 1:
        raise RecordRejected("reasoning_given_twice", f"{where}: two different reasoning fields")
    return given.pop() if given else ""


def _tools(item: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """A record's tool list as ``[{"type": "function", "function": {"name", ...}}]`` (None if none):
    OpenAI's list, or a JSON string of bare function schemas as LLaMA-Factory writes it."""
    _check_unique(item, "tools")
    value = _parsed_json(_structured(item, "tools"), "tools_invalid", "tools")
    if value is None or value == "":
        return None
    if not isinstance(value, list):
        raise RecordRejected("tools_invalid", f"tools is {describe_json_type(value)}")
    tools = []
    for index, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
            raise RecordRejected("tools_invalid", f"tools[{index}]: not a function with a name")
        tools.append(_writable({"type": "function", "function": function}, "tools_invalid", f"tools[{index}]"))
    return tools or None


def _turn_list(item: Mapping[str, Any], name: str, layout: TurnLayout, *, optional: bool = False,
               tools: bool = False) -> list[Labeled]:
    """Read the list of turns in field ``name`` (absent or null is no turns where ``optional``)."""
    _check_unique(item, name)
    value = _structured(item, name)
    if value is None and optional:
        return []
    if name not in item:
        raise RecordRejected(f"missing_{name}")
    if not isinstance(value, list):
        raise RecordRejected(f"{name}_not_list", f"{name} is {describe_json_type(value)}")
    return [_turn(turn, layout, f"{name}[{index}]", tools) for index, turn in enumerate(value)]


def _single_turn(item: Mapping[str, Any], name: str, layout: TurnLayout) -> Labeled:
    """Read the one turn held in field ``name`` as an object (``{"from": "gpt", "value": ...}``)."""
    _check_unique(item, name)
    if name not in item:
        raise RecordRejected(f"missing_{name}")
    value = _structured(item, name)
    if not isinstance(value, dict):
        raise RecordRejected(f"{name}_not_object", f"{name} is {describe_json_type(value)}")
    return _turn(value, layout, name)


def _checked(turns: list[Labeled], last: str = "assistant") -> list[Message]:
    """The messages of ``turns`` if none is empty (but a tool call's) and their order is a conversation's."""
    for where, message in turns:
        if not message["content"] and not message.get("tool_calls"):
            raise RecordRejected("empty_turn", where)
    calls = {index for index, (_, message) in enumerate(turns) if message.get("tool_calls")}
    problem = turn_order_problem([message["role"] for _, message in turns], last, calls)
    if problem is not None:
        reason, index = problem
        raise RecordRejected(reason, turns[index][0] if turns else None)
    return [message for _, message in turns]


def _with_system(item: Mapping[str, Any], turns: list[Labeled]) -> list[Labeled]:
    """``turns`` after the record's top-level ``system`` (LLaMA-Factory's), where it has one."""
    system = _optional_text(item, "system")
    if not system:
        return turns
    if turns and turns[0][1]["role"] == "system":
        raise RecordRejected("system_given_twice", f"system and {turns[0][0]}")
    return [("system", {"role": "system", "content": system}), *turns]


def _history(item: Mapping[str, Any]) -> list[Labeled]:
    """LLaMA-Factory's Alpaca ``history``: ``[[user, assistant], ...]``, the turns before the instruction."""
    _check_unique(item, "history")
    value = _structured(item, "history")
    if value is None:
        return []
    if not isinstance(value, list):
        raise RecordRejected("history_invalid", f"history is {describe_json_type(value)}")
    turns = []
    for index, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            raise RecordRejected("history_invalid", f"history[{index}] is not a [user, assistant] pair")
        for role, text, at in (("user", pair[0], 0), ("assistant", pair[1], 1)):
            where = f"history[{index}][{at}]"
            turns.append((where, {"role": role, "content": _normalized_string(text, "content", where)}))
    return turns


# --- conversation shapes ---------------------------------------------------------------------


def alpaca_fields(item: Any) -> tuple[str, str, str]:
    """Validate and normalize one Alpaca record into ``(instruction, input, output)``.

    Fields are checked in the order instruction, input, output, and the first
    problem found is the reason given. Extra fields are ignored. Raises
    :class:`RecordRejected` with one of: ``not_an_object``,
    ``<field>_duplicate_key`` (the object repeats the field's key, see
    :class:`sft.data.sources.DuplicateKeysObject`), ``missing_<field>``,
    ``<field>_not_string`` (also for a number, boolean, array, object, null,
    NaN or Infinity), ``<field>_invalid_unicode`` (a lone surrogate such as
    ``"\\ud800"``, which cannot be written as UTF-8) or ``empty_instruction``
    / ``empty_output`` (empty or whitespace only). A missing or null
    ``input`` means no input; a null instruction or output is
    ``<field>_not_string``. Control characters other than ``\\r`` are kept
    as they are, and there is no length limit: a 10 MB instruction is kept
    (training truncates, or drops a record left with no answer tokens).
    """
    if not isinstance(item, dict):
        raise RecordRejected("not_an_object")
    instruction = _required_text(item, "instruction")
    input_text = _optional_text(item, "input")
    output = _required_text(item, "output")
    return instruction, input_text, output


def _from_alpaca(item: dict[str, Any]) -> Prepared:
    instruction, input_text, output = alpaca_fields(item)
    earlier = _with_system(item, _history(item))
    messages = _checked([*earlier, ("instruction", {"role": "user", "content": alpaca_user_text(instruction, input_text)}),
                         ("output", {"role": "assistant", "content": output})])
    return _conversation(messages, None if earlier else record_id(instruction, input_text))


def _from_turn_list(name: str, layout: TurnLayout) -> Callable[[dict[str, Any]], Prepared]:
    """The converter of a shape that holds the whole conversation as a list of turns in ``name``
    (with the record's top-level ``system`` and ``tools``, where it has them)."""

    def convert(item: dict[str, Any]) -> Prepared:
        turns = _turn_list(item, name, layout, tools=True)
        if not turns:
            raise RecordRejected("empty_conversation")
        return _conversation(_checked(_with_system(item, turns)), tools=_tools(item))

    return convert


def _from_prompt_completion(item: dict[str, Any]) -> Prepared:
    prompt = _required_text(item, "prompt")
    completion = _required_text(item, "completion")
    return _conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])


# --- preference shapes -----------------------------------------------------------------------


def _answered(prompt: list[Labeled], turns: list[Labeled], side: str) -> list[Message]:
    """``prompt`` (given separately, possibly empty) then one answer's turns, as a whole
    conversation ending with that answer: ``empty_<side>`` where it has none."""
    if not turns or (turns[-1][1]["role"] == "assistant" and not turns[-1][1]["content"]):
        raise RecordRejected(f"empty_{side}")
    whole = prompt + turns
    if len(whole) == 1 and whole[0][1]["role"] == "assistant":
        raise RecordRejected("empty_prompt")
    return _checked(whole)


def _pair(prompt: list[Labeled], chosen: list[Labeled], rejected: list[Labeled]) -> Prepared:
    """A preference record: ``prompt`` (given separately, possibly empty) then each side's turns.

    Each side may repeat the prompt (TRL's implicit-prompt layout gives two whole conversations),
    so the sides are checked as whole conversations that must differ only in the last turn.
    """
    conversations = {side: _answered(prompt, turns, side)
                     for side, turns in (("chosen", chosen), ("rejected", rejected))}
    shared = conversations["chosen"][:-1]
    if conversations["rejected"][:-1] != shared:
        raise RecordRejected("prompts_differ")
    answers = {side: messages[-1]["content"] for side, messages in conversations.items()}
    if answers["chosen"] == answers["rejected"]:
        raise RecordRejected("chosen_equals_rejected")
    key = tuple((m["role"], m["content"]) for m in shared)
    return Prepared({"prompt": shared, **answers}, key, conversation_id(key))


def _from_standard_pair(item: dict[str, Any]) -> Prepared:
    prompt = _required_text(item, "prompt")
    chosen, rejected = (_required_text(item, side) for side in ("chosen", "rejected"))
    return _pair([("prompt", {"role": "user", "content": prompt})],
                 [("chosen", {"role": "assistant", "content": chosen})],
                 [("rejected", {"role": "assistant", "content": rejected})])


def _from_conversational_pair(item: dict[str, Any]) -> Prepared:
    prompt = _turn_list(item, "prompt", OPENAI_TURNS, optional=True)
    chosen, rejected = (_turn_list(item, side, OPENAI_TURNS) for side in ("chosen", "rejected"))
    return _pair(prompt, chosen, rejected)


def _from_sharegpt_pair(item: dict[str, Any]) -> Prepared:
    prompt = _turn_list(item, "conversations", SHAREGPT_TURNS)
    chosen, rejected = (_single_turn(item, side, SHAREGPT_TURNS) for side in ("chosen", "rejected"))
    return _pair(prompt, [chosen], [rejected])


def _label(item: Mapping[str, Any]) -> bool:
    """An unpaired example's ``label``: a JSON boolean (in a CSV cell, the text true or false)."""
    _check_unique(item, "label")
    if "label" not in item:
        raise RecordRejected("missing_label")
    value = item["label"]
    if isinstance(item, CsvRecord) and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise RecordRejected("label_not_bool", f"label is {describe_json_type(value)}, expected true or false")
    return value


def _unpaired(prompt: list[Labeled], completion: list[Labeled], label: bool) -> Prepared:
    """An unpaired example (KTO): ``prompt`` then the completion's turns, labeled desirable or not.

    Its key is its prompt and completion (one prompt often has several labeled completions), its
    id its prompt's, as a pair's: every example of a prompt lands in the same split."""
    messages = _answered(prompt, completion, "completion")
    shared, answer = messages[:-1], messages[-1]["content"]
    key = tuple((m["role"], m["content"]) for m in shared)
    return Prepared({"prompt": shared, "completion": answer, "label": label}, (*key, ("completion", answer)),
                    conversation_id(key))


def _from_standard_unpaired(item: dict[str, Any]) -> Prepared:
    prompt, completion = (_required_text(item, name) for name in ("prompt", "completion"))
    return _unpaired([("prompt", {"role": "user", "content": prompt})],
                     [("completion", {"role": "assistant", "content": completion})], _label(item))


def _from_conversational_unpaired(item: dict[str, Any]) -> Prepared:
    prompt = _turn_list(item, "prompt", OPENAI_TURNS, optional=True)
    completion = _turn_list(item, "completion", OPENAI_TURNS)
    return _unpaired(prompt, completion, _label(item))


# --- the registry ----------------------------------------------------------------------------


def _has_any(*names: str) -> Callable[[Mapping[str, Any]], bool]:
    """Whether a record has any of the fields ``names``, whatever their values."""
    return lambda record: any(name in record for name in names)


def _holds(test: Callable[[Any], bool], *names: str) -> Callable[[Mapping[str, Any]], bool]:
    """Whether a record without ``conversations`` has a field among ``names`` passing ``test``."""
    return lambda record: "conversations" not in record and any(test(_structured(record, n)) for n in names)


_UNPAIRED_FIELDS = ("completion", "label")


def _unpaired_fits(conversational: bool) -> Callable[[Mapping[str, Any]], bool]:
    """Whether a record is an unpaired example (a ``completion`` or ``label``), its completion a
    list of turns or not."""
    return lambda record: (_has_any(*_UNPAIRED_FIELDS)(record) and "conversations" not in record
                           and isinstance(_structured(record, "completion"), list) == conversational)


@dataclass(frozen=True)
class Shape:
    """One layout of raw records: how to recognise it and how to convert a record of it.

    ``fits`` looks at field names (and, where two shapes share names, at the type of a value)
    only; the converter does all validation, so a record of the shape that is broken is still
    recognised and gets a precise reason.
    """

    name: str
    kind: str
    fields: tuple[str, ...]
    expects: str
    fits: Callable[[Mapping[str, Any]], bool]
    converter: Callable[[dict[str, Any]], Prepared]
    unpaired: bool = False
    """A preference shape of unpaired examples (KTO's), not of pairs."""

    def convert(self, item: Any) -> Prepared:
        """The prepared record of one raw item, or :class:`RecordRejected` saying why not."""
        if not isinstance(item, dict):
            raise RecordRejected("not_an_object")
        return self.converter(item)

    def label(self) -> str:
        """The name and identifying fields, for messages: ``"alpaca (instruction, input, output)"``."""
        return f"{self.name} ({', '.join(self.fields)})"


_TURN_RULES = "an optional system turn, then user and assistant turns alternating"

SHAPES: tuple[Shape, ...] = (
    Shape("alpaca", CONVERSATION, ("instruction", "input", "output"),
          'non-empty string "instruction" and "output" fields (and an optional string "input", and LLaMA-Factory\'s '
          '"system" and "history": [[user, assistant], ...])',
          _has_any("instruction", "output"), _from_alpaca),
    Shape("sharegpt", CONVERSATION, ("conversations",),
          f'"conversations": a list of {{"from", "value"}} turns with from system/human/gpt (or user/assistant): '
          f"{_TURN_RULES}, ending with an assistant turn (function_call and observation turns with a \"tools\" "
          f'list for tool use, and an optional top-level "system")',
          _has_any("conversations"), _from_turn_list("conversations", SHAREGPT_TURNS)),
    Shape("messages", CONVERSATION, ("messages",),
          f'"messages": a list of {{"role", "content"}} turns with role system/user/assistant: {_TURN_RULES}, '
          'ending with an assistant turn (assistant "tool_calls" and "tool" turns with a "tools" list for tool use)',
          _has_any("messages"), _from_turn_list("messages", OPENAI_TURNS)),
    Shape("prompt_completion", CONVERSATION, ("prompt", "completion"),
          'non-empty string "prompt" and "completion" fields',
          _has_any("prompt", "completion"), _from_prompt_completion),
    Shape("standard", PREFERENCE, ("prompt", "chosen", "rejected"),
          'non-empty string "prompt", "chosen" and "rejected" fields, chosen differing from rejected',
          _holds(lambda value: isinstance(value, str), "chosen", "rejected"), _from_standard_pair),
    Shape("conversational", PREFERENCE, ("prompt", "chosen", "rejected"),
          '"chosen" and "rejected": lists of {"role", "content"} turns that share every turn but the last, an '
          f'assistant turn (an optional "prompt" list goes in front of both): {_TURN_RULES}',
          lambda record: (_holds(lambda value: isinstance(value, list), "chosen", "rejected", "prompt")(record)
                          and not _has_any(*_UNPAIRED_FIELDS)(record)), _from_conversational_pair),
    Shape("sharegpt", PREFERENCE, ("conversations", "chosen", "rejected"),
          '"conversations": the prompt as {"from", "value"} turns ending with a human turn, and "chosen" and '
          '"rejected": one {"from": "gpt", "value"} turn each, differing',
          _has_any("conversations"), _from_sharegpt_pair),
    Shape("unpaired", PREFERENCE, ("prompt", "completion", "label"),
          'non-empty string "prompt" and "completion" fields and a "label", true (a desirable completion) or false '
          "(an undesirable one): KTO's unpaired examples",
          _unpaired_fits(conversational=False), _from_standard_unpaired, unpaired=True),
    Shape("unpaired_conversational", PREFERENCE, ("prompt", "completion", "label"),
          '"completion": a list of {"role", "content"} turns ending with an assistant turn (an optional "prompt" '
          f'list goes in front of it): {_TURN_RULES}; and a "label", true or false: KTO\'s unpaired examples',
          _unpaired_fits(conversational=True), _from_conversational_unpaired, unpaired=True),
)
"""Every shape, in the order listed in help and messages."""


def shapes(kind: str) -> dict[str, Shape]:
    """The shapes of one kind of record, by name."""
    return {shape.name: shape for shape in SHAPES if shape.kind == kind}


def format_choices(kind: str) -> list[str]:
    """The values ``--format`` takes for ``kind``: ``auto`` and every shape's name."""
    return [AUTO, *shapes(kind)]


def choose_shape(source: Source, kind: str, format_name: str = AUTO) -> Shape | None:
    """The shape every record of ``source`` is converted as (None for a source with no records).

    With ``format_name`` given, that shape: a record that does not fit is rejected by its
    converter. With ``auto``, the shape of the first record that fits one; a later record that
    fits only other shapes makes the file mixed, which is an error naming both records, as is a
    first record that fits several shapes, or a file where no record fits any.
    """
    candidates = shapes(kind)
    if format_name != AUTO:
        return candidates[format_name]
    chosen: tuple[int, Shape] | None = None
    for position, item in source.items:
        fitting = [shape for shape in candidates.values() if isinstance(item, dict) and shape.fits(item)]
        if not fitting:
            continue
        if chosen is None:
            if len(fitting) > 1:
                names = " and ".join(shape.label() for shape in fitting)
                raise DataError(f"{source.path}: {source.where(position)} fits several shapes, {names}; "
                                "pass --format to say which")
            chosen = (position, fitting[0])
        elif chosen[1] not in fitting:
            first, shape = chosen
            raise DataError(
                f"{source.path}: {source.where(position)} has the {fitting[0].label()} shape but "
                f"{source.where(first)} has the {shape.label()} shape; expected one shape per file "
                "(split the file, or pass --format to read every record as one shape)")
    if chosen is None and source.items:
        position, item = source.items[0]
        found = describe_json_type(item)
        if isinstance(item, dict) and item:
            found += f" with fields {reprlib.repr(list(item))}"
        expected = ", ".join(shape.label() for shape in candidates.values())
        raise DataError(f"{source.path}: no record has a known shape ({source.where(position)} is {found}); "
                        f"expected one of: {expected}")
    return None if chosen is None else chosen[1]
