"""The answers log: a line cut by a kill is dropped (even inside a character), damage is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.errors import DataError
from sft.inference.answer_log import read_saved_answers


def test_a_line_cut_inside_a_character_is_dropped_and_the_file_repaired(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    whole = json.dumps({"response": "café", "finished": True}, ensure_ascii=False) + "\n"
    cut = json.dumps({"response": "naïve"}, ensure_ascii=False).encode()
    path.write_bytes(whole.encode() + cut[:cut.index("ï".encode()) + 1])  # half of the two bytes of ï
    assert read_saved_answers(path) == [(f"{path}:1", {"response": "café", "finished": True})]
    assert path.read_bytes() == whole.encode()


@pytest.mark.parametrize("content, fragment", [
    (b'{"response": "a"}\n{"response": \n', ":2:14: invalid JSON"),
    (b'{"response": "\xff"}\n', ":1: not valid UTF-8"),
    (b'{"response": 3}\n', "line 1 is not an answer record"),
])
def test_a_damaged_answers_file_is_named_with_what_to_do(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "out" / "samples.jsonl"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        read_saved_answers(path)
    assert str(error.value).startswith(str(path)) and fragment in str(error.value)
    assert str(error.value).endswith(f"generate it again (delete {path.parent} to start over)")
