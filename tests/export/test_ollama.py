"""`sft export --ollama`: the Modelfile's Go template, rendered by Go's own text/template over
messages (and tools) as Ollama passes them, gives the token ids training gives the same
conversation."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sft.config import ConfigError
from sft.data.templates import encode_prompt, render_prompt
from sft.export.ollama import PROBE_CONVERSATIONS, describe, modelfile, recognize_layout
from tests.tiny import build_chat_tokenizer, build_tokenizer, trl_chat_template

GO_RENDERER = Path(__file__).with_name("render_go_template.go")

OFFICIAL = {
    "phi3": (["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], {"eos": "<|endoftext|>"}),
    "gemma": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<pad>"],
              {"eos": "<eos>", "bos": "<bos>", "pad": "<pad>", "adds_bos": True}),
    "gemma3": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<pad>"],
               {"eos": "<eos>", "bos": "<bos>", "pad": "<pad>", "adds_bos": True}),
    "qwen2_5": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], {"eos": "<|im_end|>", "pad": "<|endoftext|>"}),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], {"eos": "<|im_end|>", "pad": "<|endoftext|>"}),
    "llama3_1": (["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
                 {"eos": "<|eot_id|>", "bos": "<|begin_of_text|>", "adds_bos": True}),
    "llama3_2": (["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
                 {"eos": "<|eot_id|>", "bos": "<|begin_of_text|>", "adds_bos": True}),
}
"""Official chat templates shipped with trl, each with its family's special tokens."""


def tokenizer_for(name: str):
    if name in OFFICIAL:
        template = trl_chat_template(name)
        if template is None:
            pytest.skip("trl (a dev dependency) is not installed: no official templates")
        specials, options = OFFICIAL[name]
        return build_chat_tokenizer(template, specials, name=name, **options)
    return build_tokenizer(name)


CONVERSATIONS = [*PROBE_CONVERSATIONS,
                 [{"role": "system", "content": "Answer in French.\nKeep it short."},
                  {"role": "user", "content": "What is {{ this }}?  Two spaces; emoji 🙂"},
                  {"role": "assistant", "content": "C'est {{ ceci }}."},
                  {"role": "user", "content": "Merci!"},
                  {"role": "assistant", "content": "De rien."},
                  {"role": "user", "content": "Encore une fois"}]]


def render_with_go(template: str, conversations: list[list[dict]], tmp_path: Path,
                   tools: list[dict] | None = None) -> tuple[list[str], str]:
    """The renderings of ``conversations`` by Go, and the tag Ollama reads as a tool call's start."""
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (apt-get install golang-go): the Ollama template parity is not checked")
    (tmp_path / "template").write_text(template, encoding="utf-8")
    (tmp_path / "values.json").write_text(json.dumps([{"messages": messages, "tools": tools}
                                                      for messages in conversations]), encoding="utf-8")
    done = subprocess.run(["go", "run", str(GO_RENDERER), str(tmp_path / "template"), str(tmp_path / "values.json")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    return result["outputs"], result["tool_tag"]


@pytest.mark.parametrize("name, layout", [
    ("chatml", "chatml"), ("zephyr", "zephyr"), ("llama3", "llama3"), ("llama-spm", "zephyr"), ("plain", "alpaca"),
    ("phi3", "phi3"), ("gemma", "gemma"), ("gemma3", "gemma"), ("qwen2_5", "chatml"), ("qwen3", "chatml"),
    ("llama3_1", "llama3"), ("llama3_2", "llama3"),
])
def test_go_template_gives_the_token_ids_of_the_jinja_template(name: str, layout: str, tmp_path: Path) -> None:
    """Go's text/template renders the Modelfile's TEMPLATE over the conversations; the ids are
    those of training's prompt (render_prompt + encode_prompt: BOS added once, where the tokenizer
    adds it, as llama.cpp does from the file's add_bos_token)."""
    tokenizer = tokenizer_for(name)
    recognized = recognize_layout(tokenizer)
    assert recognized.name == layout
    for messages, rendered in zip(CONVERSATIONS, render_with_go(recognized.go_template(), CONVERSATIONS, tmp_path)[0]):
        expected = encode_prompt(tokenizer, render_prompt(tokenizer, messages))
        assert encode_prompt(tokenizer, rendered) == expected, (messages, rendered)


def _call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


TOOLS = [{"type": "function", "function": {
             "name": "get_weather", "description": "The weather now & <later>.",
             "parameters": {"type": "object", "required": ["city"], "properties": {
                 "city": {"type": "string", "description": "The city."},
                 "unit": {"type": "string", "description": "c or f", "enum": ["c", "f"]}}}}},
         {"type": "function", "function": {
             "name": "add", "description": "Adds two integers.",
             "parameters": {"type": "object", "required": ["a", "b"],
                            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
"""Keys in the order Ollama's template types write them (properties sorted), so that only the
JSON's spacing differs from the Jinja's."""

TOOL_CONVERSATIONS = [
    [{"role": "user", "content": "What's the weather in Paris?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris, in c?"},
     {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", city="Paris", unit="c")]},
     {"role": "tool", "content": '22 C, "sunny" & <dry>'}],
    [{"role": "user", "content": "What is 2 + 3?"},
     {"role": "assistant", "content": "Let me add.", "tool_calls": [_call("add", a=2, b=3)]},
     {"role": "tool", "content": "5"}, {"role": "assistant", "content": "2 + 3 = 5."},
     {"role": "user", "content": "And the weather in Rome?"},
     {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", city="Rome")]},
     {"role": "tool", "content": "18 C"}, {"role": "tool", "content": "windy"}],
]
PARALLEL_CALLS = [{"role": "user", "content": "Weather in Paris and Rome?"},
                  {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", city="Paris"),
                                                                      _call("get_weather", city="Rome")]},
                  {"role": "tool", "content": "22 C"}, {"role": "tool", "content": "18 C"}]
"""Two calls in one turn: Qwen's templates take them; Llama 3.1/3.2's raise."""


def go_json(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    """JSON as Go's json.Marshal writes Ollama's template values: no spaces, no indent, HTML
    characters escaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


@contextlib.contextmanager
def jinja_json_as_go_writes_it() -> Iterator[None]:
    """The chat templates' ``tojson`` writing JSON as Ollama's Go values print it (the one
    difference a Go template cannot undo: Python's separators have spaces, Llama indents tools)."""
    from sft.data import template_render

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(template_render, "_tojson", go_json)
        template_render._compile.cache_clear()
        try:
            yield
        finally:
            template_render._compile.cache_clear()


@pytest.mark.parametrize("name, tool_format, tag", [("qwen2_5", "qwen", "<tool_call>"), ("qwen3", "qwen", "<tool_call>"),
                                                    ("llama3_1", "llama3", "{"), ("llama3_2", "llama3", "{")])
def test_go_template_writes_tools_calls_and_results_as_the_jinja_template(
        name: str, tool_format: str, tag: str, tmp_path: Path) -> None:
    """Ollama's .Tools, each message's .ToolCalls and tool turns give training's token ids once
    JSON is spaced alike; Ollama finds a call's start where the model writes it."""
    tokenizer = tokenizer_for(name)
    recognized = recognize_layout(tokenizer)
    assert recognized.tools is not None and recognized.tools.name == tool_format
    conversations = [*TOOL_CONVERSATIONS, *([PARALLEL_CALLS] if tool_format == "qwen" else [])]
    rendered, found_tag = render_with_go(recognized.go_template(), conversations, tmp_path, tools=TOOLS)
    assert found_tag == tag
    for messages, text in zip(conversations, rendered):
        with jinja_json_as_go_writes_it():
            expected = render_prompt(tokenizer, messages, TOOLS)
        assert text == expected.removeprefix(tokenizer.bos_token if tool_format == "llama3" else ""), messages
        assert encode_prompt(tokenizer, text) == encode_prompt(tokenizer, expected)
    without_tools = render_with_go(recognized.go_template(), CONVERSATIONS, tmp_path)[0]
    assert without_tools == [recognized.render(messages) for messages in CONVERSATIONS]


def test_llama_3_2_template_is_written_with_the_date_it_renders_at_export() -> None:
    """Llama 3.2's template writes today's date into every system turn (3.1's a fixed one): the Go
    template carries the text the Jinja template renders at export, date included."""
    import datetime

    layout = recognize_layout(tokenizer_for("llama3_2"))
    today = datetime.date.today().strftime("%d %b %Y")
    assert layout.system_prefix == f"Cutting Knowledge Date: December 2023\nToday Date: {today}\n\n"
    assert layout.default_system == ""
    assert f"Today Date: {today}" in layout.go_template()
    assert recognize_layout(tokenizer_for("llama3_1")).system_prefix.endswith("Today Date: 26 Jul 2024\n\n")


def test_templates_without_a_tool_format_get_no_tools() -> None:
    """SmolLM2's ChatML template writes tool turns as plain turns and no tool list: no .Tools."""
    layout = recognize_layout(tokenizer_for("chatml"))
    assert layout.name == "chatml" and layout.tools is None
    assert "Tools" not in layout.go_template() and "ToolCalls" not in layout.go_template()
    assert "no tool calls" in describe(layout)


def test_an_unrecognized_template_is_one_line_saying_what_to_do() -> None:
    tokenizer = build_tokenizer("chatml")
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ConfigError) as caught:
        recognize_layout(tokenizer)
    message = str(caught.value)
    assert "\n" not in message and "write the Modelfile's TEMPLATE by hand" in message and "without --ollama" in message


def test_modelfile_names_the_file_stops_at_every_end_of_turn_and_carries_the_system_prompt() -> None:
    text = modelfile(Path("/out/model-q8_0.gguf"), tokenizer_for("phi3"), system_prompt="Be brief.")
    lines = text.splitlines()
    assert lines[0] == "FROM ./model-q8_0.gguf"
    assert 'SYSTEM """Be brief."""' in lines
    assert {line for line in lines if line.startswith("PARAMETER stop")} == {'PARAMETER stop "<|endoftext|>"',
                                                                            'PARAMETER stop "<|end|>"'}
    assert "PARAMETER temperature 0.7" in lines and "PARAMETER top_p 0.9" in lines


def test_export_ollama_writes_the_modelfile_and_prints_the_next_commands(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    from sft.export.gguf import main as export_main
    from tests.families import build_family_model_dir

    model_dir = build_family_model_dir(tmp_path / "model", "qwen3", build_tokenizer("chatml"), use_sliding_window=False)
    out = tmp_path / "out"
    out.mkdir()
    assert export_main(["--model", str(model_dir), "--gguf", str(out / "tiny.gguf"), "--precision", "q8_0",
                        "--verify", "--ollama", "tiny-qwen", "--system-prompt", "Be brief."]) == 0
    printed = capsys.readouterr().out
    assert "verify: passed" in printed
    assert f"wrote {out / 'Modelfile'} (chatml turns, no tool calls" in printed
    assert f"ollama create tiny-qwen -f {out / 'Modelfile'}\n  ollama run tiny-qwen" in printed
    text = (out / "Modelfile").read_text(encoding="utf-8")
    assert text.startswith("FROM ./tiny.gguf\nTEMPLATE \"\"\"{{ range $i, $m := .Messages }}")
    assert 'PARAMETER stop "<|im_end|>"' in text
