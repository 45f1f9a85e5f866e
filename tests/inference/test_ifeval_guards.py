"""`sft ifeval` on odd inputs: one error line naming the file and line, never a traceback, and
--limit choosing among a full responses file's answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.inference.ifeval.command import main
from tests.inference.test_ifeval_command import PROMPTS
from tests.reliability.helpers import assert_user_error
from tests.tiny import write_jsonl


@pytest.fixture()
def input_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "input_data.jsonl", PROMPTS)


def full_responses(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "full.jsonl", [{"prompt": p["prompt"], "response": "hi there"} for p in PROMPTS])


def score(responses: Path, input_data: Path, out: Path, *extra: str) -> int:
    return main(["--responses", str(responses), "--input-data", str(input_data), "--out", str(out), *extra])


def test_limit_scores_the_first_prompts_of_a_full_responses_file(input_data: Path, tmp_path: Path) -> None:
    assert score(full_responses(tmp_path), input_data, tmp_path / "out", "--limit", "2") == 0
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["prompts"] == 2


@pytest.mark.parametrize("text, fragments", [
    pytest.param("", ["empty.jsonl", "none of the 3 prompts has a response"], id="empty"),
    pytest.param('{"prompt": "Give a title.", "response": "a", "response": "b"}\n',
                 ["empty.jsonl: line 1", "'response' is given twice"], id="duplicate key"),
])
def test_unusable_responses_files_are_one_error_line(input_data: Path, tmp_path: Path, text: str,
                                                     fragments: list[str], capsys: pytest.CaptureFixture) -> None:
    responses = tmp_path / "empty.jsonl"
    responses.write_text(text)
    assert_user_error(score(responses, input_data, tmp_path / "out"), capsys.readouterr().err, *fragments)


def test_a_prompt_without_instructions_is_refused_naming_its_line(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    input_data = write_jsonl(tmp_path / "input_data.jsonl",
                             [*PROMPTS, {"key": 9, "prompt": "Anything.", "instruction_id_list": [], "kwargs": []}])
    status = score(full_responses(tmp_path), input_data, tmp_path / "out")
    assert_user_error(status, capsys.readouterr().err, "input_data.jsonl: line 4",
                      "field 'instruction_id_list' must be a non-empty list of IFEval instruction ids")


@pytest.mark.parametrize("name, content, fragment", [
    pytest.param("responses.jsonl", b'[1, 2]\n', "line 1 is not an answer record", id="answers: not an object"),
    pytest.param("responses.jsonl", b'{"prompt": "x\xff"}\n', ":1: not valid UTF-8", id="answers: not UTF-8"),
    pytest.param("generation.json", b'{"settings": ', "not JSON", id="state: not JSON"),
    pytest.param("generation.json", b'[]', "not an object", id="state: not an object"),
])
def test_damaged_resume_state_is_one_error_line(tiny_model_dir: Path, input_data: Path, tmp_path: Path, name: str,
                                                content: bytes, fragment: str,
                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    (out / "base").mkdir(parents=True)
    (out / "base" / name).write_bytes(content)
    status = main(["--model", str(tiny_model_dir), "--out", str(out), "--input-data", str(input_data),
                   "--max-new-tokens", "2"])
    assert_user_error(status, capsys.readouterr().err, str(out / "base" / name), fragment, "delete")
