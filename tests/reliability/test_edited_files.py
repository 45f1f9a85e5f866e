"""Edited or foreign run files and out-of-range settings are one error line naming the file or
field, never a traceback: adapter configs, a tokenizer that asks for its own code, an epoch count
whose step count is not a number, a LoRA scale whose gradients overflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.inference.chat import main as chat_main
from sft.recipes.sft import main as train_main
from tests.reliability.conftest import copy_run
from tests.reliability.helpers import assert_user_error
from tests.reliability.test_errors import no_model_loads, train_flags  # noqa: F401 - fixture


@pytest.mark.parametrize("edit, fragments", [
    pytest.param({"peft_type": "FOO"}, ["peft_type is 'FOO'"], id="peft_type FOO"),
    pytest.param({"peft_type": None}, ["no peft_type"], id="no peft_type"),
    pytest.param({"r": "sixteen"}, ["r must be a positive integer, got 'sixteen'"], id="r not an int"),
    pytest.param({"lora_alpha": 1e30}, ["lora_alpha must be a number"], id="huge lora_alpha"),
    pytest.param({"target_modules": 7}, ["target_modules must be a list"], id="target_modules not names"),
])
def test_an_edited_adapter_config_is_one_error_line(reference_run: Path, tmp_path: Path, edit: dict,
                                                    fragments: list[str], capsys: pytest.CaptureFixture) -> None:
    run = copy_run(reference_run, tmp_path / "run")
    config_file = run / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(edit)
    config_file.write_text(json.dumps({key: value for key, value in config.items() if value is not None}))
    status = chat_main(["--adapter", str(run), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2"])
    assert_user_error(status, capsys.readouterr().err, str(config_file), *fragments)


def test_a_tokenizer_that_asks_for_its_own_code_is_refused_in_one_line(reference_run: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    run = copy_run(reference_run, tmp_path / "run")
    config_file = run / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(tokenizer_class="MyTokenizer", auto_map={"AutoTokenizer": ["tok.MyTokenizer", None]})
    config_file.write_text(json.dumps(config))
    status = chat_main(["--adapter", str(run), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2"])
    assert_user_error(status, capsys.readouterr().err, str(run), "auto_map", "--trust-remote-code")


@pytest.mark.parametrize("changes, fragments", [
    pytest.param({"num_train_epochs": "1e308", "max_steps": -1}, ["num_train_epochs: must be at most"], id="1e308"),
    pytest.param({"lora_alpha": 10**29}, ["lora.alpha", "never train"], id="alpha 1e29"),
])
def test_settings_whose_numbers_overflow_are_refused_before_the_model_loads(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
        no_model_loads: None, changes: dict, fragments: list[str]) -> None:  # noqa: F811
    status = train_main(train_flags(tiny_model_dir, data, tmp_path / "out", **changes))
    assert_user_error(status, capsys.readouterr().err, *fragments)
