"""Tool definitions, tool calls and tool results in Ollama templates, for the chat formats whose
official templates have them: Qwen2.5/Qwen3 (tools in the system turn, calls in ``<tool_call>``
tags, results in ``<tool_response>`` tags of a user turn) and Llama 3.1/3.2 (tools in the first
user turn, one JSON object per call, results in ``ipython`` turns).

Each format is written twice, as the layouts in ``sft.export.ollama`` are: in Python, to be
recognized by rendering probe conversations with tools as the model's Jinja template renders
them, and as Go template text over Ollama's values: ``$.Tools`` (each printed as Ollama's compact
JSON), each message's ``.ToolCalls`` (``.Function.Name``, ``.Function.Arguments`` printed as
compact JSON) and ``tool`` messages. The Jinja templates write JSON with spaces after ``,`` and
``:`` (Llama indents tool definitions by four); Go's template functions can only write it
compactly, as Ollama's own templates do.

Ollama finds where a tool call starts in the model's output from the template itself (its
``tools.parseTag``): the first text inside the first ``{{ if .ToolCalls }}`` block, up to its
first ``{``. So each format tests ``.ToolCalls`` through ``{{ if .ToolCalls }}`` exactly once,
with the call's own text first inside it, and reads it as ``$m.ToolCalls`` everywhere else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]


def _dumps(value: Any, indent: int | None = None) -> str:
    """JSON as transformers' ``tojson`` filter writes it."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _calls(message: Message) -> list[dict[str, Any]]:
    return [call.get("function", call) for call in message.get("tool_calls") or []]


@dataclass(frozen=True)
class QwenTools:
    """Qwen2.5's and Qwen3's tool format (Hermes style), in their ChatML turns."""

    name: str = "qwen"
    opens_system_turn: bool = True
    """With tools, a system turn is written even where the template writes none without (Qwen3)."""
    has_tools_turn: bool = False

    HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
    TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
            "\"arguments\": <args-json-object>}\n</tool_call>")

    def system_text(self, text: str, tools: list[dict[str, Any]]) -> str:
        block = self.HEAD + "".join("\n" + _dumps(tool) for tool in tools) + self.TAIL
        return "\n\n".join(part for part in (text, block) if part)

    def go_system_text(self, text: str, has_text: bool) -> str:
        return (text + "{{ if $.Tools }}" + ("\n\n" if has_text else "") + self.HEAD
                + "{{ range $.Tools }}\n{{ . }}{{ end }}" + self.TAIL + "{{ end }}")

    def tools_turn(self, content: str, tools: list[dict[str, Any]]) -> str | None:
        return None

    def go_tools_turn(self) -> str:
        return ""

    def assistant_turn(self, message: Message) -> str:
        content = message["content"]
        calls = "".join(f'\n<tool_call>\n{{"name": "{call["name"]}", "arguments": {_dumps(call["arguments"])}}}'
                        f'\n</tool_call>' for call in _calls(message))
        return "<|im_start|>assistant" + (f"\n{content}" if content else "") + calls + "<|im_end|>\n"

    def go_assistant_turn(self) -> str:
        return ("<|im_start|>assistant{{ if $m.Content }}\n{{ $m.Content }}{{ else if not $m.ToolCalls }}\n{{ end }}"
                '{{ if .ToolCalls }}{{ range .ToolCalls }}\n<tool_call>\n{"name": "{{ .Function.Name }}", '
                '"arguments": {{ .Function.Arguments }}}\n</tool_call>{{ end }}{{ end }}<|im_end|>\n')

    def tool_turn(self, messages: list[Message], index: int) -> str:
        """Consecutive tool results share one user turn."""
        opens = index == 0 or messages[index - 1]["role"] != "tool"
        closes = index == len(messages) - 1 or messages[index + 1]["role"] != "tool"
        return (("<|im_start|>user" if opens else "") + f"\n<tool_response>\n{messages[index]['content']}\n"
                "</tool_response>" + ("<|im_end|>\n" if closes else ""))

    def go_tool_turn(self) -> str:
        return ('{{ if ne $prev "tool" }}<|im_start|>user{{ end }}\n<tool_response>\n{{ $m.Content }}\n'
                "</tool_response>{{ $rest := slice $.Messages $i }}"
                '{{ if or (eq (len $rest) 1) (ne (index $rest 1).Role "tool") }}<|im_end|>\n{{ end }}')


@dataclass(frozen=True)
class Llama3Tools:
    """Llama 3.1's and 3.2's JSON tool format: "Environment: ipython" in the system turn, the tool
    definitions in the first user turn, a call as ``{"name", "parameters"}``, a result as a JSON
    string in an ``ipython`` turn."""

    name: str = "llama3"
    opens_system_turn: bool = False
    has_tools_turn: bool = True

    ENVIRONMENT = "Environment: ipython\n"
    INSTRUCTIONS = ("Given the following functions, please respond with a JSON for a function call with its proper "
                    "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
                    "\"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n")
    USER = "<|start_header_id|>user<|end_header_id|>\n\n"
    ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    TOOL = "<|start_header_id|>ipython<|end_header_id|>\n\n"
    END = "<|eot_id|>"

    def system_text(self, text: str, tools: list[dict[str, Any]]) -> str:
        return self.ENVIRONMENT + text

    def go_system_text(self, text: str, has_text: bool) -> str:
        return "{{ if $.Tools }}" + self.ENVIRONMENT + "{{ end }}" + text

    def tools_turn(self, content: str, tools: list[dict[str, Any]]) -> str:
        return (self.USER + self.INSTRUCTIONS + "".join(_dumps(tool, indent=4) + "\n\n" for tool in tools)
                + content + self.END)

    def go_tools_turn(self) -> str:
        return self.USER + self.INSTRUCTIONS + "{{ range $.Tools }}{{ . }}\n\n{{ end }}{{ $m.Content }}" + self.END

    def assistant_turn(self, message: Message) -> str:
        """The calls only (the template drops an answer's text beside them); it accepts one call a
        turn, and several are written one after another."""
        calls = "".join(f'{{"name": "{call["name"]}", "parameters": {_dumps(call["arguments"])}}}'
                        for call in _calls(message))
        return self.ASSISTANT + calls + self.END

    def go_assistant_turn(self) -> str:
        return (self.ASSISTANT + '{{ if .ToolCalls }}{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", '
                '"parameters": {{ .Function.Arguments }}}{{ end }}{{ else }}{{ $m.Content }}{{ end }}' + self.END)

    def tool_turn(self, messages: list[Message], index: int) -> str:
        return self.TOOL + _dumps(messages[index]["content"]) + self.END

    def go_tool_turn(self) -> str:
        return self.TOOL + "{{ json $m.Content }}" + self.END


ToolFormat = QwenTools | Llama3Tools

TOOL_FORMATS: dict[str, tuple[ToolFormat, ...]] = {"chatml": (QwenTools(),), "llama3": (Llama3Tools(),)}
"""The tool formats tried for each turn layout."""

PROBE_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "description": "The city's name."}}}}}]


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Weather in Paris?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", city="Paris")]},
     {"role": "tool", "content": "22 C"}],
    [{"role": "user", "content": "Paris, then Rome?"},
     {"role": "assistant", "content": "Checking.", "tool_calls": [_call("get_weather", city="Paris")]},
     {"role": "tool", "content": "22 C"}, {"role": "tool", "content": "sunny"},
     {"role": "assistant", "content": "22 C and sunny."}, {"role": "user", "content": "Rome?"}],
]
"""Conversations with tools every supported template renders (Llama's takes one call a turn)."""
