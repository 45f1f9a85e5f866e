"""Chat input that is not UTF-8 (bytes from a terminal in another encoding, which Python hands
over as lone surrogates): one error line for --prompt, and an interactive session that says so
and goes on."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from sft.inference.chat import main as chat_main
from tests.reliability.helpers import assert_user_error

NOT_UTF8 = b"\xed\xa0\x80"  # an encoded surrogate: no UTF-8 decoder accepts it


def chat_flags(model: Path) -> list[str]:
    return ["--model", str(model), "--device", "cpu", "--max-new-tokens", "2", "--temperature", "0"]


def test_a_prompt_that_is_not_utf8_is_one_error_line(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    status = chat_main([*chat_flags(tiny_model_dir), "--prompt", os.fsdecode(NOT_UTF8 + b" hi")])  # as argv is read
    assert_user_error(status, capsys.readouterr().err, "--prompt is not valid UTF-8 text (byte 0xed")


def test_interactive_input_that_is_not_utf8_is_refused_and_the_chat_goes_on(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(NOT_UTF8 + b"\nhello\n/exit\n"), encoding="utf-8"))
    assert chat_main(chat_flags(tiny_model_dir)) == 0
    captured = capsys.readouterr()
    assert "the message is not valid UTF-8 text" in captured.out and captured.out.count("assistant>") == 2
    assert "Traceback" not in captured.err
