"""Strict vs loose judgments, the reference's result files and exact scores on a hand-made set."""

from __future__ import annotations

import hashlib
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sft.errors import DataError
from sft.inference.ifeval.command import main
from sft.inference.ifeval.data import SOURCE_SHA256, fetch_prompts, read_prompts
from sft.inference.ifeval.data import main as fetch_main
from sft.inference.ifeval.scoring import judge
from sft.verifiers.instructions import loose_variants
from tests.tiny import write_jsonl

PROMPTS = [
    {"key": 1, "prompt": "Count to four without commas.",
     "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
     "kwargs": [{}, {"num_words": 3, "relation": "at least"}]},
    {"key": 2, "prompt": "Answer in quotes.", "instruction_id_list": ["startend:quotation"], "kwargs": [{}]},
    {"key": 3, "prompt": "Give a title, no commas.", "instruction_id_list": ["detectable_format:title",
                                                                             "punctuation:no_comma"],
     "kwargs": [{}, {}]},
]
RESPONSES = {
    # Strict: the preamble's comma breaks no_comma. Loose: without the first line it holds.
    "Count to four without commas.": "**Sure**, here it is:\nOne two three four",
    "Answer in quotes.": "\"Quoted answer.\"",
    # Loose: without the last line the comma is gone, and the title is still there.
    "Give a title, no commas.": "Title first\n<<My Title>>, with a comma",
}


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    prompts = write_jsonl(tmp_path / "input_data.jsonl", PROMPTS)
    responses = write_jsonl(tmp_path / "responses.jsonl",
                            [{"prompt": p, "response": r} for p, r in RESPONSES.items()])
    return prompts, responses


def test_loose_variants_are_the_references_eight() -> None:
    assert loose_variants("*a*\nb\n*c*") == ["*a*\nb\n*c*", "a\nb\nc", "b\n*c*", "*a*\nb", "b", "b\nc", "a\nb", "b"]


def test_strict_and_loose_judgments(files: tuple[Path, Path]) -> None:
    prompts = read_prompts(files[0])
    judged = [(judge(p, RESPONSES[p.prompt], loose=False), judge(p, RESPONSES[p.prompt], loose=True))
              for p in prompts]
    assert judged == [([False, True], [True, True]), ([True], [True]), ([True, False], [True, True])]
    assert judge(prompts[0], "  \n ", loose=True) == [False, False]  # an empty answer follows nothing


def test_scores_and_result_files(files: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["--responses", str(files[1]), "--out", str(out), "--input-data", str(files[0])]) == 0

    scores = json.loads((out / "scores.json").read_text())
    assert scores == {
        "prompts": 3, "instructions": 5,
        "prompt_level_strict_acc": 1 / 3, "inst_level_strict_acc": 3 / 5,
        "prompt_level_loose_acc": 1.0, "inst_level_loose_acc": 1.0,
        "mean_strict_acc": (1 / 3 + 3 / 5) / 2, "mean_loose_acc": 1.0,
        "by_instruction": {
            "detectable_format:title": {"instructions": 1, "strict_acc": 1.0, "loose_acc": 1.0},
            "length_constraints:number_words": {"instructions": 1, "strict_acc": 1.0, "loose_acc": 1.0},
            "punctuation:no_comma": {"instructions": 2, "strict_acc": 0.0, "loose_acc": 1.0},
            "startend:quotation": {"instructions": 1, "strict_acc": 1.0, "loose_acc": 1.0},
        },
    }
    strict = [json.loads(line) for line in (out / "eval_results_strict.jsonl").read_text().splitlines()]
    assert list(strict[0]) == ["instruction_id_list", "prompt", "response", "follow_all_instructions",
                               "follow_instruction_list"]
    assert strict[0] == {"instruction_id_list": PROMPTS[0]["instruction_id_list"], "prompt": PROMPTS[0]["prompt"],
                         "response": RESPONSES[PROMPTS[0]["prompt"]], "follow_all_instructions": False,
                         "follow_instruction_list": [False, True]}
    loose = [json.loads(line) for line in (out / "eval_results_loose.jsonl").read_text().splitlines()]
    assert [r["follow_instruction_list"] for r in loose] == [[True, True], [True], [True, True]]


def test_prompts_without_a_response_are_not_scored(files: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    partial = write_jsonl(tmp_path / "partial.jsonl", [{"prompt": "Answer in quotes.", "response": "\"Yes.\""}])
    assert main(["--responses", str(partial), "--out", str(tmp_path / "out"), "--input-data", str(files[0])]) == 0
    assert "2 of 3 prompts have no response" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["prompts"] == 1


@pytest.mark.parametrize(("prompts_line", "responses_line", "message"), [
    ("{\"key\": 1, \"prompt\": \"x\"", None, "input_data.jsonl:2:"),
    ({"key": 1, "prompt": "x", "instruction_id_list": ["keywords:typo"], "kwargs": [{}]}, None,
     "input_data.jsonl: line 2: field 'instruction_id_list'[0]: unknown instruction id 'keywords:typo'"),
    ({"key": 1, "prompt": "x", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []}, None,
     "input_data.jsonl: line 2: field 'kwargs' must hold one object per instruction id (1 ids)"),
    ({"key": 1, "prompt": "x", "instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": 3}]}, None,
     "input_data.jsonl: line 2: field 'kwargs'[0]: startend:end_checker: end_phrase must be a non-empty string"),
    (None, {"prompt": "not asked", "response": "hi"}, "responses.jsonl: line 2: the prompt is not in the prompts file"),
    (None, {"prompt": "Answer in quotes."}, "responses.jsonl: line 2: missing field 'response'"),
])
def test_user_errors_name_the_file_and_line(files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                            prompts_line: object, responses_line: object, message: str) -> None:
    prompts, responses = files
    for path, line in ((prompts, prompts_line), (responses, responses_line)):
        if line is not None:
            first = path.read_text().splitlines()[0]
            path.write_text(first + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
    assert main(["--responses", str(responses), "--out", str(tmp_path / "out"), "--input-data", str(prompts)]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_missing_prompts_file_says_how_to_get_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--responses", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "out"),
                 "--input-data", str(tmp_path / "none.jsonl")]) == 2
    assert "sft fetch-eval-data" in capsys.readouterr().err


def test_the_shared_prompts_file_binds(shared_input_data: Path) -> None:
    prompts = read_prompts(shared_input_data)
    assert len(prompts) == 541
    assert sum(len(p.checks) for p in prompts) == 834


def test_the_pinned_sha256_is_the_shared_files(shared_input_data: Path) -> None:
    assert hashlib.sha256(shared_input_data.read_bytes()).hexdigest() == SOURCE_SHA256


def test_fetch_checks_the_sha256_before_saving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = json.dumps(PROMPTS[0]).encode() + b"\n"
    out = tmp_path / "data" / "input_data.jsonl"
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"tampered" + good))
    with pytest.raises(DataError, match="is not the expected"):
        fetch_prompts(out, sha256=hashlib.sha256(good).hexdigest())
    assert not out.exists()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(good))
    fetch_prompts(out, sha256=hashlib.sha256(good).hexdigest())
    assert out.read_bytes() == good


def test_fetch_without_network_says_to_pass_a_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    def offline(url: str, timeout: float) -> None:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert fetch_main(["--out", str(tmp_path / "input_data.jsonl")]) == 2
    assert "--input-data" in capsys.readouterr().err
