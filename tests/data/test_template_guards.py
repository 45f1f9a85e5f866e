"""Chat templates are someone else's program: rendered as transformers renders them, but stopped
within a time and size limit, and their failures are one error line in every command."""

from __future__ import annotations

import re
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest

import sft.data.template_render
from sft.data.inspect import main as inspect_main
from sft.data.templates import render_conversation, render_prompt
from sft.errors import TemplateError
from sft.inference.chat import main as chat_main
from sft.inference.evaluate import main as eval_main
from sft.recipes.sft import main as train_main
from tests.recipes.test_dpo_recipe import sft_run  # noqa: F401 - fixture
from tests.reliability.helpers import assert_user_error
from tests.tiny import as_flags, build_tokenizer, tiny_run_overrides

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}],
]

RICH_TEMPLATE = (
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content | tojson }}{% endgeneration %}"
    "{% else %}{{ '<' ~ m['role'] ~ '>' + m.content.strip() | replace('x', 'y') }}{% endif %}\n"
    "{% endfor %}{{ ns.n }}{{ dict(a=1) | tojson }}{% if add_generation_prompt %}{{ bos_token }}>{% endif %}"
)


@pytest.mark.parametrize("kind", ["chatml", "zephyr", "plain", "rich"])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_rendering_is_transformers_rendering(kind: str, messages: list[dict[str, str]]) -> None:
    tokenizer = build_tokenizer("chatml" if kind == "rich" else kind)
    if kind == "rich":
        tokenizer.chat_template = RICH_TEMPLATE
    elif kind == "plain":
        from sft.data.templates import ensure_chat_template
        ensure_chat_template(tokenizer)
    assert render_prompt(tokenizer, messages) == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert render_conversation(tokenizer, messages) == tokenizer.apply_chat_template(messages, tokenize=False)


HOSTILE = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",
    "huge repeat": "{{ 'a' * 1000000000 }}",
    "doubling": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                "{% endfor %}{{ ns.s | length }}",
    "doubling with +": "{% set ns = namespace(s=['a']) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                       "{% endfor %}{{ ns.s | length }}",
    "padding": "{{ 'a'.center(1000000000) }}",
    "padding filter": "{{ 'a' | center(1000000000) }}",
    "format width": "{{ '%1000000000d' % 1 }}",
    "replace": "{{ ('a' * 100000).replace('a', 'b' * 100000) }}",
    "power": "{{ 10 ** 100000000 }}",
    "endless output": "{% for i in range(100000) %}{{ 'x' * 99999 }}{% endfor %}",
    "deep recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "macro buffer": "{% set big = 'x' * 500000 %}{% macro m() %}{% for i in range(100000) %}{{ big }}{% endfor %}"
                    "{% endmacro %}{{ m() | length }}",
    "replace filter": "{{ ('a' * 100000) | replace('a', 'b' * 100000) }}",
    "format filter": "{{ '%1000000000d' | format(1) }}",
    "exponential macros": "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                          "{{ f(60) }}",
}


@pytest.mark.parametrize("template", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_template_is_stopped_quickly_in_little_memory(template: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sft.data.template_render, "MAX_RENDER_SECONDS", 2.0)
    tokenizer = build_tokenizer("chatml")
    tokenizer.chat_template = template
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(TemplateError, match="chat template"):
            render_prompt(tokenizer, CONVERSATIONS[0])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 15
    assert peak < 200 << 20


@pytest.mark.parametrize("template, fragment", [
    ("{% if messages | length > 1 %}{{ raise_exception('Only one turn is supported') }}{% endif %}x",
     "refused the conversation: Only one turn is supported"),
    ("{% for m in messages %}{{ m.content }", "not a valid Jinja template (line 1"),
    ("{% set x = [] %}{{ x.append(1) }}", "broke the sandbox's rules"),
    ("{{ messages[0].content + 1 }}", "failed while rendering: TypeError"),
])
def test_a_template_that_raises_is_a_template_error(template: str, fragment: str) -> None:
    tokenizer = build_tokenizer("chatml")
    tokenizer.chat_template = template
    with pytest.raises(TemplateError, match=re.escape(fragment)):
        render_prompt(tokenizer, CONVERSATIONS[1])


REFUSING = ("{% for m in messages %}{% if 'Be brief' in m.content %}{{ raise_exception('Brevity not supported') }}"
            "{% endif %}<{{ m.role }}>{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
"""A template that raises on what a system prompt says (wherever the system turn ends up: a
template without a system role gets it folded into the first user turn)."""


@pytest.fixture()
def refusing_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model with a template that raises on the system prompt "Be brief."."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "refusing")
    (model / "chat_template.jinja").write_text(REFUSING)
    return model


def test_train_and_inspect_with_a_template_that_raises(
        refusing_model: Path, data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    overrides = tiny_run_overrides(refusing_model, *data, tmp_path / "run", max_steps=1, system_prompt="Be brief.")
    assert_user_error(train_main(as_flags(overrides)), capsys.readouterr().err, "Brevity not supported")
    status = inspect_main(["--model", str(refusing_model), "--train-file", str(data[0]),
                           "--system-prompt", "Be brief."])
    assert_user_error(status, capsys.readouterr().err, "Brevity not supported")


def test_chat_with_a_run_whose_template_never_ends(tiny_model_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    model = shutil.copytree(tiny_model_dir, tmp_path / "endless")
    (model / "chat_template.jinja").write_text(HOSTILE["nested loops"])
    started = time.monotonic()
    status = chat_main(["--model", str(model), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2"])
    assert_user_error(status, capsys.readouterr().err, "was stopped")
    assert time.monotonic() - started < 60


def test_eval_and_chat_of_a_run_whose_template_raises(
        sft_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    run = shutil.copytree(sft_run, tmp_path / "run")
    (run / "chat_template.jinja").write_text(REFUSING)
    status = eval_main(["--adapter", str(run), "--output-dir", str(run), "--system-prompt", "Be brief.",
                        "--max-new-tokens", "2"])
    assert_user_error(status, capsys.readouterr().err, "Brevity not supported")
    status = chat_main(["--adapter", str(run), "--prompt", "hi", "--system-prompt", "Be brief.", "--device", "cpu",
                        "--max-new-tokens", "2"])
    assert_user_error(status, capsys.readouterr().err, "Brevity not supported")
