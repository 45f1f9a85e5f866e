"""sft inspect: one example as the model sees it, as text with marks or colour, and as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.cli import main as sft_main
from sft.config import build_config
from sft.data.inspect import TRAINED_COLOUR, inspect_example, main
from sft.data.tokenize import encode_conversation
from tests.tiny import build_tiny_model_dir, build_tokenizer, write_jsonl

SMOLLM_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                 "Hugging Face<|im_end|>\n")
THREE_TURNS = [
    {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Red, of course."},
    {"role": "user", "content": "And a third one, please."}, {"role": "assistant", "content": "Green is fine."},
]


@pytest.fixture()
def prepared(tmp_path: Path) -> Path:
    """A prepared file: a 3-turn conversation, then a record of the older Alpaca layout."""
    return write_jsonl(tmp_path / "train.jsonl", [
        {"id": "three", "source": "test", "messages": THREE_TURNS},
        {"id": "alpaca", "instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "source": "test"},
    ])


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_json_shows_exactly_the_assistant_turns_trained(tiny_model_dir, prepared, capsys) -> None:
    status, out, _ = run(capsys, "--model", str(tiny_model_dir), "--file", str(prepared), "--json")
    assert status == 0
    shown = json.loads(out)
    assert set(shown) == {"input_ids", "labels", "segments"}
    assert shown["segments"] == [
        {"text": SMOLLM_SYSTEM + "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n",
         "trained": False},
        {"text": "Blue.<|im_end|>\n", "trained": True},
        {"text": "<|im_start|>user\nAnother one?<|im_end|>\n<|im_start|>assistant\n", "trained": False},
        {"text": "Red, of course.<|im_end|>\n", "trained": True},
        {"text": "<|im_start|>user\nAnd a third one, please.<|im_end|>\n<|im_start|>assistant\n", "trained": False},
        {"text": "Green is fine.<|im_end|>\n", "trained": True},
    ]
    example, _ = encode_conversation(build_tokenizer("chatml"), THREE_TURNS, 512)
    assert {"input_ids": shown["input_ids"], "labels": shown["labels"]} == example


def test_piped_text_marks_the_trained_tokens_and_counts_them(tiny_model_dir, prepared, capsys) -> None:
    status, out, _ = run(capsys, "--model", str(tiny_model_dir), "--file", str(prepared))
    assert status == 0
    assert ("<|im_start|>assistant\n[[Blue.<|im_end|>\n]]<|im_start|>user\nAnother one?<|im_end|>\n"
            "<|im_start|>assistant\n[[Red, of course.<|im_end|>\n]]") in out
    assert out.count("[[") == 4  # the three answers and the legend
    assert "conversation 0 (id three), 6 messages" in out
    assert "114 tokens: 27 trained (between [[ and ]]), 87 masked; max_seq_length 512." in out
    assert "\x1b[" not in out


def test_a_terminal_gets_colour_instead_of_marks(tiny_model_dir, prepared) -> None:
    config = build_config(None, {"model": str(tiny_model_dir)})
    shown = inspect_example(config, str(prepared), 0, as_json=False, colour=True)
    assert f"{TRAINED_COLOUR}Blue.<|im_end|>\n\x1b[0m" in shown
    assert "[[" not in shown and "27 trained (in colour)" in shown


def test_config_flags_apply_as_in_training(tiny_model_dir, prepared, capsys) -> None:
    status, out, _ = run(capsys, "--model", str(tiny_model_dir), "--train-file", str(prepared), "--json",
                         "--train-on", "last_assistant_turn", "--system-prompt", "Be brief.")
    assert status == 0
    segments = json.loads(out)["segments"]
    assert [segment["text"] for segment in segments if segment["trained"]] == ["Green is fine.<|im_end|>\n"]
    assert segments[0]["text"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_an_older_layout_record_reads_as_one_exchange(tiny_model_dir, prepared, capsys) -> None:
    status, out, _ = run(capsys, "--model", str(tiny_model_dir), "--file", str(prepared), "--index", "1", "--json")
    assert status == 0
    segments = json.loads(out)["segments"]
    assert segments[0]["text"].endswith("<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n"
                                        "<|im_start|>assistant\n")
    assert segments[1:] == [{"text": "5<|im_end|>\n", "trained": True}]


def test_truncation_is_shown_and_ends_on_an_answer(tiny_model_dir, prepared, capsys) -> None:
    status, out, _ = run(capsys, "--model", str(tiny_model_dir), "--file", str(prepared), "--max-seq-length", "70")
    assert status == 0
    assert out.splitlines()[-1] == "55 tokens: 6 trained (between [[ and ]]), 49 masked; max_seq_length 70, truncated."
    assert "Another one?" not in out


def test_an_example_with_no_trained_token_says_it_is_dropped(tiny_model_dir, prepared, capsys) -> None:
    status, out, _ = run(capsys, "--model", str(tiny_model_dir), "--file", str(prepared), "--max-seq-length", "16")
    assert status == 0
    assert "0 trained" in out and "training drops this example" in out


def test_a_base_tokenizer_is_shown_with_the_fallback_template(tmp_path: Path, prepared, capsys) -> None:
    model_dir = build_tiny_model_dir(tmp_path / "base", build_tokenizer("plain"))
    status, out, _ = run(capsys, "--model", str(model_dir), "--file", str(prepared), "--index", "1")
    assert status == 0
    assert "(no chat template: the fallback one)" in out
    assert "### Instruction:\nAdd the numbers.\n\n2 and 3\n\n### Response:\n[[5</s>]]" in out


@pytest.mark.parametrize("index", ["2", "-1"])
def test_an_index_outside_the_file_is_one_error_line(tiny_model_dir, prepared, capsys, index: str) -> None:
    status, out, err = run(capsys, "--model", str(tiny_model_dir), "--file", str(prepared), "--index", index)
    assert status == 2 and out == ""
    assert err == f"error: {prepared}: no conversation {index}; the file holds 2 (--index 0 to 1)\n"


def test_a_missing_file_is_one_error_line(tiny_model_dir, tmp_path: Path, capsys) -> None:
    status, _, err = run(capsys, "--model", str(tiny_model_dir), "--file", str(tmp_path / "nope.jsonl"))
    assert status == 2 and err.startswith("error: ") and "nope.jsonl not found" in err and err.count("\n") == 1


def test_a_bad_train_on_is_a_config_error(tiny_model_dir, prepared, capsys) -> None:
    status, _, err = run(capsys, "--model", str(tiny_model_dir), "--file", str(prepared), "--train-on", "every")
    assert status == 2
    assert "train_on: expected all_assistant_turns or last_assistant_turn, got 'every'" in err


def test_the_sft_command_runs_it(tiny_model_dir, prepared, capsys) -> None:
    assert sft_main(["inspect", "--model", str(tiny_model_dir), "--file", str(prepared), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["segments"]) == 6


# --- tools and reasoning ----------------------------------------------------------------------------

TOOL_RECORD = {
    "id": "weather", "source": "test",
    "messages": [{"role": "user", "content": "Weather in Paris?"},
                 {"role": "assistant", "content": "", "tool_calls": [
                     {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                 {"role": "tool", "content": "21 degrees"},
                 {"role": "assistant", "content": "It is 21 degrees.", "reasoning": "Read the result."}],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "The weather now."}}],
}


def test_a_tool_conversation_shows_the_tool_list_calls_and_results(tmp_path: Path, capsys) -> None:
    from tests.data.test_chat_templates import tokenizer_of

    model_dir = build_tiny_model_dir(tmp_path / "qwen", tokenizer_of("qwen2_5"))
    path = write_jsonl(tmp_path / "tools.jsonl", [TOOL_RECORD])
    status, out, _ = run(capsys, "--model", str(model_dir), "--file", str(path))
    assert status == 0
    assert "a tool list of 1 in the prompt" in out.splitlines()[0]
    assert ('<tools>\n{"type": "function", "function": {"name": "get_weather", "description": "The weather now."}}\n'
            '</tools>') in out  # masked: outside the marks
    assert ('<|im_start|>assistant\n[[<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call><|im_end|>\n]]<|im_start|>user\n<tool_response>\n21 degrees\n</tool_response><|im_end|>\n'
            '<|im_start|>assistant\n[[It is 21 degrees.<|im_end|>\n]]') in out
    assert "The template does not render the reasoning of 1 answer(s): they are trained without it." in out


def test_a_tool_conversation_the_template_cannot_render_is_the_reason_training_drops_it(
        tiny_model_dir, tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "tools.jsonl", [TOOL_RECORD])
    status, out, err = run(capsys, "--model", str(tiny_model_dir), "--file", str(path))
    assert status == 2 and out == ""
    assert err.startswith(f"error: {path}: conversation 0 (id weather): training drops it (template_drops_tools): ")
    assert err.count("\n") == 1
