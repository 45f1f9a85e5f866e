"""`sft export --ollama`: the Modelfile's Go template, rendered by Go's own text/template over
messages as Ollama passes them, gives the token ids training gives the same conversation."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from sft.config import ConfigError
from sft.data.templates import encode_prompt, render_prompt
from sft.export.ollama import PROBE_CONVERSATIONS, modelfile, recognize_layout
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


def render_with_go(template: str, conversations: list[list[dict]], tmp_path: Path) -> list[str]:
    (tmp_path / "template").write_text(template, encoding="utf-8")
    (tmp_path / "values.json").write_text(json.dumps([{"messages": messages} for messages in conversations]),
                                          encoding="utf-8")
    done = subprocess.run(["go", "run", str(GO_RENDERER), str(tmp_path / "template"), str(tmp_path / "values.json")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("name, layout", [
    ("chatml", "chatml"), ("zephyr", "zephyr"), ("llama3", "llama3"), ("llama-spm", "zephyr"), ("plain", "alpaca"),
    ("phi3", "phi3"), ("gemma", "gemma"), ("gemma3", "gemma"), ("qwen2_5", "chatml"), ("qwen3", "chatml"),
])
def test_go_template_gives_the_token_ids_of_the_jinja_template(name: str, layout: str, tmp_path: Path) -> None:
    """Go's text/template renders the Modelfile's TEMPLATE over the conversations; the ids are
    those of training's prompt (render_prompt + encode_prompt: BOS added once, where the tokenizer
    adds it, as llama.cpp does from the file's add_bos_token)."""
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (apt-get install golang-go): the Ollama template parity is not checked")
    tokenizer = tokenizer_for(name)
    recognized = recognize_layout(tokenizer)
    assert recognized.name == layout
    for messages, rendered in zip(CONVERSATIONS, render_with_go(recognized.go_template(), CONVERSATIONS, tmp_path)):
        expected = encode_prompt(tokenizer, render_prompt(tokenizer, messages))
        assert encode_prompt(tokenizer, rendered) == expected, (messages, rendered)


def test_an_unrecognized_template_is_one_line_saying_what_to_do() -> None:
    """Llama 3.2's official template writes today's date into the system turn: no fixed layout."""
    with pytest.raises(ConfigError) as caught:
        recognize_layout(tokenizer_for("llama3_2"))
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
    assert f"ollama create tiny-qwen -f {out / 'Modelfile'}\n  ollama run tiny-qwen" in printed
    text = (out / "Modelfile").read_text(encoding="utf-8")
    assert text.startswith("FROM ./tiny.gguf\nTEMPLATE \"\"\"{{ range $i, $m := .Messages }}")
    assert 'PARAMETER stop "<|im_end|>"' in text
