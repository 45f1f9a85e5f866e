"""`sft export --ollama`: a Modelfile beside the GGUF file, so that `ollama create` serves the
model with the prompt format it was trained on.

Ollama renders prompts with Go's text/template, not Jinja. The model's Jinja chat template is
recognized as one of the turn layouts below by rendering both on probe conversations (through
sft's own prompt code, as training renders them), and the matching layout is written as a Go
template over Ollama's ``.Messages`` (``.Role``, ``.Content``). Layouts: ChatML (SmolLM2, Qwen;
a default system turn where the template inserts one), Llama 3 (3.1/3.2's knowledge-cutoff and
date lines at the head of the system turn, as the template rendered them at export), Zephyr
(TinyLlama), Phi-3, Gemma (system folded into the first user turn) and sft's fallback Alpaca
layout. Where the template also writes tools, tool calls and tool results in Qwen's or Llama
3.1's format (``sft.export.ollama_tools``), so does the Go template, over Ollama's ``.Tools`` and
``.ToolCalls``. A template that matches no layout is a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from sft.data.templates import FALLBACK_CHAT_TEMPLATE, adds_bos, end_of_turn_ids, render_prompt
from sft.errors import ConfigError, TemplateError
from sft.export.ollama_tools import PROBE_TOOLS, TOOL_FORMATS, TOOL_PROBE_CONVERSATIONS, ToolFormat

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TurnLayout:
    """A chat format: each turn is header + content + footer; the prompt ends with ``generation``."""

    name: str
    headers: dict[str, str]
    footers: dict[str, str]
    generation: str
    separator: str = ""
    """Text between two turns (Alpaca's blank line)."""
    fold_system: bool = False
    """No system role: the system text goes before the first user turn's, a blank line between."""
    default_system: str | None = None
    """The system turn's content the template inserts when the conversation has none."""
    system_prefix: str = ""
    """Text the template writes before the first system turn's content (Llama 3.1/3.2's knowledge
    cutoff and today's date)."""
    prefix: str = ""
    """Text before the first turn that the tokenizer does not add itself (rare: BOS is added by
    llama.cpp where the tokenizer adds it)."""
    tools: ToolFormat | None = None
    """How tool definitions, calls and results are written; None: the template writes none."""

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The prompt as the Go template renders it (the same logic, in Python)."""
        tools = tools if self.tools is not None else None
        messages = list(messages)
        if self.fold_system and len(messages) > 1 and messages[0]["role"] == "system":
            system, first, *rest = messages
            messages = [first | {"content": f"{system['content']}\n\n{first['content']}"}, *rest]
        first = 1 if messages and messages[0]["role"] == "system" else 0
        text = self.prefix
        for index, message in enumerate(messages):
            role = message["role"]
            if index:
                text += self.separator
            if index == 0 and role != "system" and self._inserts_system(bool(tools)):
                text += self._system_turn(self.default_system or "", tools) + self.separator
            if tools and index == first and self.tools.has_tools_turn:
                text += self.tools.tools_turn(message["content"], tools)
            elif role == "system":
                text += self._system_turn(message["content"], tools) if index == 0 else self._turn(role, message["content"])
            elif self.tools is not None and role == "assistant" and message.get("tool_calls"):
                text += self.tools.assistant_turn(message)
            elif self.tools is not None and role == "tool":
                text += self.tools.tool_turn(messages, index)
            elif role in ROLES:
                text += self._turn(role, message["content"])
        return text + self.generation

    def _inserts_system(self, with_tools: bool) -> bool:
        return self.default_system is not None or (with_tools and self.tools.opens_system_turn)

    def _turn(self, role: str, content: str) -> str:
        return self.headers[role] + content + self.footers[role]

    def _system_turn(self, content: str, tools: list[dict] | None) -> str:
        text = self.system_prefix + content
        return self._turn("system", self.tools.system_text(text, tools) if tools else text)

    def go_template(self) -> str:
        """The Go text/template Ollama renders this layout with."""
        body = []
        if self.fold_system:
            body.append('{{ $system := "" }}')
        if self.tools is not None:
            body.append('{{ $prev := "" }}{{ $first := 0 }}'
                        '{{ with .Messages }}{{ if eq (index . 0).Role "system" }}{{ $first = 1 }}{{ end }}{{ end }}')
        body.append("{{ range $i, $m := .Messages }}")
        if self.separator:
            body.append("{{ if ne $i 0 }}" + _go_literal(self.separator) + "{{ end }}")
        if self.default_system is not None or self.tools is not None:
            body.append(self._go_inserted_system())
        body.append(self._go_turns())
        if self.tools is not None:
            body.append("{{ $prev = $m.Role }}")
        body.append("{{ end }}")
        return _go_literal(self.prefix) + "".join(body) + _go_literal(self.generation)

    def _go_system_turn(self, content: str, has_content: bool) -> str:
        """A system turn around ``content`` (Go text), with the prefix and, where given, the tools."""
        text = _go_literal(self.system_prefix) + content
        if self.tools is not None:
            text = self.tools.go_system_text(text, has_content or bool(self.system_prefix))
        return _go_literal(self.headers["system"]) + text + _go_literal(self.footers["system"])

    def _go_inserted_system(self) -> str:
        condition = 'and (eq $i 0) (ne $m.Role "system")'
        if self.default_system is None:
            if not self.tools.opens_system_turn:
                return ""
            condition += " $.Tools"
        default = self.default_system or ""
        return ("{{ if " + condition + " }}" + self._go_system_turn(_go_literal(default), bool(default))
                + _go_literal(self.separator) + "{{ end }}")

    def _go_turn(self, role: str, content: str = "{{ $m.Content }}") -> str:
        return _go_literal(self.headers[role]) + content + _go_literal(self.footers[role])

    def _go_turns(self) -> str:
        """One message's turn, by role."""
        if self.fold_system:
            return ('{{ if eq $m.Role "system" }}{{ $system = $m.Content }}'
                    '{{ else if eq $m.Role "user" }}' + _go_literal(self.headers["user"])
                    + '{{ if $system }}{{ $system }}' + _go_literal("\n\n") + '{{ $system = "" }}{{ end }}'
                    + "{{ $m.Content }}" + _go_literal(self.footers["user"])
                    + '{{ else if eq $m.Role "assistant" }}' + self._go_turn("assistant") + "{{ end }}")
        system = self._go_turn("system")
        if self.system_prefix or self.tools is not None:
            system = ("{{ if eq $i 0 }}" + self._go_system_turn("{{ $m.Content }}", True) + "{{ else }}" + system
                      + "{{ end }}")
        assistant, tool, opening = self._go_turn("assistant"), "", "{{ if "
        if self.tools is not None:
            assistant, tool = self.tools.go_assistant_turn(), '{{ else if eq $m.Role "tool" }}' + self.tools.go_tool_turn()
            if self.tools.has_tools_turn:
                opening = "{{ if and $.Tools (eq $i $first) }}" + self.tools.go_tools_turn() + "{{ else if "
        return (opening + 'eq $m.Role "system" }}' + system + '{{ else if eq $m.Role "user" }}' + self._go_turn("user")
                + '{{ else if eq $m.Role "assistant" }}' + assistant + tool + "{{ end }}")


def _go_literal(text: str) -> str:
    """``text`` as literal template text; a '{{' in it is written as a string action."""
    return text.replace("{{", '{{ "{{" }}')


def _same_marker_layout(name: str, header: str, footer: str, generation_role: str = "assistant",
                        role_names: dict[str, str] | None = None, **options) -> TurnLayout:
    names = {role: role for role in ROLES} | (role_names or {})
    return TurnLayout(name, {role: header.format(role=names[role]) for role in ROLES},
                      dict.fromkeys(ROLES, footer), header.format(role=names[generation_role]), **options)


def candidate_layouts(tokenizer) -> list[TurnLayout]:
    """The layouts sft writes as Go templates, spelled with ``tokenizer``'s own BOS/EOS, each with
    the system text the template writes of its own."""
    eos, bos = tokenizer.eos_token or "", tokenizer.bos_token or ""
    bos_text = "" if adds_bos(tokenizer) else bos  # llama.cpp adds it where the tokenizer does
    layouts = [
        _same_marker_layout("chatml", "<|im_start|>{role}\n", "<|im_end|>\n"),
        _same_marker_layout("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>",
                            prefix=bos_text),
        _same_marker_layout("zephyr", "<|{role}|>\n", eos + "\n"),
        _same_marker_layout("phi3", "<|{role}|>\n", "<|end|>\n"),
        _same_marker_layout("gemma", "<start_of_turn>{role}\n", "<end_of_turn>\n", generation_role="assistant",
                            role_names={"assistant": "model"}, fold_system=True, prefix=bos_text),
        TurnLayout("alpaca", {"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"},
                   {"system": "", "user": "", "assistant": eos}, "\n\n### Response:\n", separator="\n\n"),
    ]
    return [_with_template_system_text(tokenizer, layout) for layout in layouts]


PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
]

SYSTEM_PROBE = "sft-ollama-system-probe"


def _template_text(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The training prompt of ``messages`` as text after the BOS the tokenizer adds itself."""
    text = render_prompt(tokenizer, messages, tools)
    if adds_bos(tokenizer) and tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]
    return text


def _with_template_system_text(tokenizer, layout: TurnLayout) -> TurnLayout:
    """``layout`` with the text the template writes into the system turn of its own: before the
    conversation's system text (Llama 3.1/3.2's knowledge cutoff and date: ``system_prefix``) and
    in place of it where the conversation has none (SmolLM2's, Qwen2.5's: ``default_system``)."""
    header, footer = layout.headers["system"], layout.footers["system"]
    if layout.fold_system or not header:
        return layout
    user_turn = PROBE_CONVERSATIONS[0][0]
    given = _template_text(tokenizer, [{"role": "system", "content": SYSTEM_PROBE}, user_turn])
    alone = _template_text(tokenizer, [user_turn])
    given, alone = given.removeprefix(layout.prefix), alone.removeprefix(layout.prefix)
    prefix = given[len(header):given.index(SYSTEM_PROBE)] if given.startswith(header) and SYSTEM_PROBE in given else ""
    default = None
    if alone.startswith(header + prefix) and footer in alone[len(header):]:
        default = alone[len(header) + len(prefix):alone.index(footer, len(header))]
    return replace(layout, default_system=default, system_prefix=prefix)


def _with_tools(tokenizer, layout: TurnLayout) -> TurnLayout:
    """``layout`` with the tool format whose rendering equals the template's on conversations with
    tools; unchanged where none does (the template writes no tools, or in another form)."""
    formats = TOOL_FORMATS.get(layout.name, ())
    try:
        expected = [_template_text(tokenizer, messages, PROBE_TOOLS) for messages in TOOL_PROBE_CONVERSATIONS]
    except TemplateError:  # it refuses tools, or tool turns
        return layout
    for tool_format in formats:
        candidate = replace(layout, tools=tool_format)
        if [candidate.render(messages, PROBE_TOOLS) for messages in TOOL_PROBE_CONVERSATIONS] == expected:
            return candidate
    return layout


def recognize_layout(tokenizer) -> TurnLayout:
    """The layout whose rendering equals the chat template's on every probe conversation, with
    its tool format where the template's tool turns are one sft writes."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE  # what training used for a model without one
    expected = [_template_text(tokenizer, messages) for messages in PROBE_CONVERSATIONS]
    for layout in candidate_layouts(tokenizer):
        if [layout.render(messages) for messages in PROBE_CONVERSATIONS] == expected:
            return _with_tools(tokenizer, layout)
    raise ConfigError("--ollama: the model's chat template is none of the layouts sft writes as Ollama templates "
                      "(chatml, llama3, zephyr, phi3, gemma, alpaca); write the Modelfile's TEMPLATE by hand "
                      "(https://github.com/ollama/ollama/blob/main/docs/template.md) or export without --ollama")


def describe(layout: TurnLayout) -> str:
    """One line on what the Modelfile's template writes beyond the turns."""
    parts = [f"{layout.name} turns"]
    if layout.system_prefix:
        parts.append(f"the system turn opens with the template's {layout.system_prefix!r} as rendered at export")
    parts.append(f"tool calls in {layout.tools.name}'s format" if layout.tools is not None
                 else "no tool calls (the chat template writes none in a format sft translates)")
    return ", ".join(parts)


def modelfile(gguf_file: Path, tokenizer, generation_config=None, system_prompt: str | None = None,
              layout: TurnLayout | None = None) -> str:
    """The Modelfile text for ``gguf_file`` (named relative to the Modelfile beside it), its
    template ``layout`` (by default the one recognized in ``tokenizer``'s chat template)."""
    layout = layout or recognize_layout(tokenizer)
    stops = list(dict.fromkeys(tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer))))
    if '"""' in layout.go_template():
        raise ConfigError('--ollama: the chat template contains """, which a Modelfile cannot quote')
    lines = [f"FROM ./{gguf_file.name}", f'TEMPLATE """{layout.go_template()}"""']
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    sampling = {"temperature": 0.7, "top_p": 0.9}  # sft chat's defaults, unless the model brings its own
    if generation_config is not None and getattr(generation_config, "do_sample", False):
        for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
            if getattr(generation_config, key, None) is not None:
                sampling[key] = getattr(generation_config, key)
    names = {"repetition_penalty": "repeat_penalty"}
    lines += [f"PARAMETER {names.get(key, key)} {value}" for key, value in sampling.items()]
    return "\n".join(lines) + "\n"
