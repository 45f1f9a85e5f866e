"""`sft export --ollama`: a Modelfile beside the GGUF file, so that `ollama create` serves the
model with the prompt format it was trained on.

Ollama renders prompts with Go's text/template, not Jinja. The model's Jinja chat template is
recognized as one of the turn layouts below by rendering both on probe conversations (through
sft's own prompt code, as training renders them), and the matching layout is written as a Go
template over Ollama's ``.Messages`` (``.Role``, ``.Content``). Layouts: ChatML (SmolLM2, Qwen;
a default system turn where the template inserts one), Llama 3, Zephyr (TinyLlama), Phi-3,
Gemma (system folded into the first user turn) and sft's fallback Alpaca layout. A template
that matches none is a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sft.data.templates import FALLBACK_CHAT_TEMPLATE, adds_bos, end_of_turn_ids, render_prompt
from sft.errors import ConfigError

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
    prefix: str = ""
    """Text before the first turn that the tokenizer does not add itself (rare: BOS is added by
    llama.cpp where the tokenizer adds it)."""
    stops: tuple[str, ...] = field(default=())

    def render(self, messages: list[dict]) -> str:
        """The prompt as the Go template renders it (the same logic, in Python)."""
        messages = list(messages)
        if self.fold_system and len(messages) > 1 and messages[0]["role"] == "system":
            system, first, *rest = messages
            messages = [first | {"content": f"{system['content']}\n\n{first['content']}"}, *rest]
        if self.default_system is not None and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        turns = [self.headers[m["role"]] + m["content"] + self.footers[m["role"]] for m in messages]
        return self.prefix + self.separator.join(turns) + self.generation

    def go_template(self) -> str:
        """The Go text/template Ollama renders this layout with."""
        def turn(role: str, content: str) -> str:
            return _go_literal(self.headers[role]) + content + _go_literal(self.footers[role])

        body = []
        if self.fold_system:
            body.append('{{ $system := "" }}')
        body.append("{{ range $i, $m := .Messages }}")
        if self.default_system is not None:
            body.append('{{ if and (eq $i 0) (ne $m.Role "system") }}'
                        + turn("system", _go_literal(self.default_system)) + _go_literal(self.separator) + "{{ end }}")
        if self.separator:
            body.append("{{ if ne $i 0 }}" + _go_literal(self.separator) + "{{ end }}")
        if self.fold_system:
            body.append('{{ if eq $m.Role "system" }}{{ $system = $m.Content }}'
                        '{{ else if eq $m.Role "user" }}' + _go_literal(self.headers["user"])
                        + '{{ if $system }}{{ $system }}' + _go_literal("\n\n") + '{{ $system = "" }}{{ end }}'
                        + "{{ $m.Content }}" + _go_literal(self.footers["user"])
                        + '{{ else if eq $m.Role "assistant" }}' + turn("assistant", "{{ $m.Content }}") + "{{ end }}")
        else:
            body.append('{{ if eq $m.Role "system" }}' + turn("system", "{{ $m.Content }}")
                        + '{{ else if eq $m.Role "user" }}' + turn("user", "{{ $m.Content }}")
                        + '{{ else if eq $m.Role "assistant" }}' + turn("assistant", "{{ $m.Content }}") + "{{ end }}")
        body.append("{{ end }}")
        return _go_literal(self.prefix) + "".join(body) + _go_literal(self.generation)


def _go_literal(text: str) -> str:
    """``text`` as literal template text; a '{{' in it is written as a string action."""
    return text.replace("{{", '{{ "{{" }}')


def _same_marker_layout(name: str, header: str, footer: str, generation_role: str = "assistant",
                        role_names: dict[str, str] | None = None, **options) -> TurnLayout:
    names = {role: role for role in ROLES} | (role_names or {})
    return TurnLayout(name, {role: header.format(role=names[role]) for role in ROLES},
                      dict.fromkeys(ROLES, footer), header.format(role=names[generation_role]), **options)


def candidate_layouts(tokenizer, default_system: str | None) -> list[TurnLayout]:
    """The layouts sft writes as Go templates, spelled with ``tokenizer``'s own BOS/EOS."""
    eos, bos = tokenizer.eos_token or "", tokenizer.bos_token or ""
    bos_text = "" if adds_bos(tokenizer) else bos  # llama.cpp adds it where the tokenizer does
    return [
        _same_marker_layout("chatml", "<|im_start|>{role}\n", "<|im_end|>\n", default_system=default_system),
        _same_marker_layout("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>",
                            prefix=bos_text),
        _same_marker_layout("zephyr", "<|{role}|>\n", eos + "\n"),
        _same_marker_layout("phi3", "<|{role}|>\n", "<|end|>\n"),
        _same_marker_layout("gemma", "<start_of_turn>{role}\n", "<end_of_turn>\n", generation_role="assistant",
                            role_names={"assistant": "model"}, fold_system=True, prefix=bos_text),
        TurnLayout("alpaca", {"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"},
                   {"system": "", "user": "", "assistant": eos}, "\n\n### Response:\n", separator="\n\n"),
    ]


PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
]


def _template_text(tokenizer, messages: list[dict]) -> str:
    """The training prompt of ``messages`` as text after the BOS the tokenizer adds itself."""
    text = render_prompt(tokenizer, messages)
    if adds_bos(tokenizer) and tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]
    return text


def _default_system(tokenizer) -> str | None:
    """The system text a ChatML template inserts into a conversation without one (SmolLM2's)."""
    text = _template_text(tokenizer, PROBE_CONVERSATIONS[0])
    start = "<|im_start|>system\n"
    if text.startswith(start) and "<|im_end|>" in text:
        return text[len(start):text.index("<|im_end|>")]
    return None


def recognize_layout(tokenizer) -> TurnLayout:
    """The layout whose rendering equals the chat template's on every probe conversation."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE  # what training used for a model without one
    expected = [_template_text(tokenizer, messages) for messages in PROBE_CONVERSATIONS]
    for layout in candidate_layouts(tokenizer, _default_system(tokenizer)):
        if [layout.render(messages) for messages in PROBE_CONVERSATIONS] == expected:
            return layout
    raise ConfigError("--ollama: the model's chat template is none of the layouts sft writes as Ollama templates "
                      "(chatml, llama3, zephyr, phi3, gemma, alpaca); write the Modelfile's TEMPLATE by hand "
                      "(https://github.com/ollama/ollama/blob/main/docs/template.md) or export without --ollama")


def modelfile(gguf_file: Path, tokenizer, generation_config=None, system_prompt: str | None = None) -> str:
    """The Modelfile text for ``gguf_file`` (named relative to the Modelfile beside it)."""
    layout = recognize_layout(tokenizer)
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
