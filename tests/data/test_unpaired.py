"""Unpaired preference examples for KTO: each shape in every file type, the reasons, the reader
(unpaired files, and pair files split into both labels), and their token ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sft.cli import main as sft_main
from sft.data.formats import PREFERENCE, RecordRejected, conversation_id, shapes
from sft.data.pairs import encode_pair, encode_unpaired
from sft.data.prepare import DPO, REJECTS_FILE, prepare
from sft.data.prepared import read_preferences, read_unpaired
from sft.data.sources import read_source
from sft.errors import DataError
from tests.data.test_formats import WRITERS, chat


def example(prompt: list[dict[str, str]], completion: str, label: bool) -> dict[str, Any]:
    """A prepared unpaired line's content."""
    return {"prompt": prompt, "completion": completion, "label": label}


# Per shape: raw records (two good examples of one prompt, a later copy of the first with its label
# flipped, two broken ones), the examples kept, and the reasons of the rejects, in file order.
CASES: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]] = {
    "unpaired": (
        [{"prompt": "Add 2 and 2.", "completion": "4", "label": True},
         {"prompt": "Add 2 and 2.", "completion": "5", "label": False},
         {"prompt": "Add 2 and 2.\r\n", "completion": "4 ", "label": False},
         {"prompt": "Say hi.", "completion": " ", "label": True},
         {"prompt": " ", "completion": "Hi", "label": True}],
        [example(chat("user", "Add 2 and 2."), "4", False), example(chat("user", "Add 2 and 2."), "5", False)],
        ["duplicate_replaced", "empty_completion", "empty_prompt"],
    ),
    "unpaired_conversational": (
        [{"prompt": chat("user", "Hi"), "completion": chat("assistant", "Hello!"), "label": True},
         {"completion": chat("system", "Be brief.", "user", "Name a colour.", "assistant", "Blue."), "label": True},
         {"prompt": chat("user", "Hi"), "completion": chat("assistant", "Hello!"), "label": False},
         {"prompt": chat("user", "Hi"), "completion": [], "label": True},
         {"prompt": chat("user", "q", "user", "q2"), "completion": chat("assistant", "a"), "label": True}],
        [example(chat("user", "Hi"), "Hello!", False),
         example(chat("system", "Be brief.", "user", "Name a colour."), "Blue.", True)],
        ["duplicate_replaced", "empty_completion", "repeated_role"],
    ),
}


def kept_examples(out_dir: Path) -> list[dict[str, Any]]:
    rows = read_unpaired(out_dir / DPO.train_file) + read_unpaired(out_dir / DPO.val_file)
    return sorted(({k: row[k] for k in ("prompt", "completion", "label")} for row in rows), key=json.dumps)


@pytest.mark.parametrize("suffix", list(WRITERS))
@pytest.mark.parametrize("shape", list(CASES))
def test_every_unpaired_shape_in_every_file_type(tmp_path: Path, shape: str, suffix: str) -> None:
    records, kept, reasons = CASES[shape]
    src = tmp_path / f"raw.{suffix}"
    src.write_bytes(WRITERS[suffix](records))
    report = prepare([src], tmp_path / "out", method=DPO)
    assert report["sources"] == [{"path": str(src), "format": shape, "read": 5, "kept": 2,
                                  "rejected": {reason: 1 for reason in sorted(reasons[1:])}, "replaced": 1}]
    assert kept_examples(tmp_path / "out") == sorted(kept, key=json.dumps)
    rejects = [json.loads(line) for line in (tmp_path / "out" / REJECTS_FILE).read_text().splitlines()]
    positions = [position for position, _ in read_source(src).items]
    assert [(r["position"], r["reason"]) for r in rejects] == [
        (positions[0], reasons[0]), (positions[3], reasons[1]), (positions[4], reasons[2])]


def test_the_examples_of_one_prompt_share_its_id_and_split(tmp_path: Path) -> None:
    src = tmp_path / "raw.jsonl"
    src.write_bytes(WRITERS["jsonl"]([{"prompt": f"Question {i}?", "completion": answer, "label": answer == "yes"}
                                      for i in range(20) for answer in ("yes", "no")]))
    report = prepare([src], tmp_path / "out", method=DPO, val_fraction=0.3)
    assert report["train"] % 2 == 0 and report["val"] % 2 == 0 and report["val"] > 0  # whole prompts in each
    for name in (DPO.train_file, DPO.val_file):
        rows = read_unpaired(tmp_path / "out" / name)
        ids = {row["prompt"][0]["content"]: row["id"] for row in rows}
        assert sorted(row["id"] for row in rows) == sorted([*ids.values(), *ids.values()])
        assert all(ids[q] == conversation_id((("user", q),)) for q in ids)


@pytest.mark.parametrize(("shape", "record", "reason", "detail"), [
    ("unpaired", {"prompt": "p", "completion": "c"}, "missing_label", None),
    ("unpaired", {"prompt": "p", "completion": "c", "label": "yes"}, "label_not_bool",
     "label is a string, expected true or false"),
    ("unpaired", {"prompt": "p", "completion": "c", "label": 1}, "label_not_bool",
     "label is a number, expected true or false"),
    ("unpaired", {"prompt": "p", "completion": "c", "label": None}, "label_not_bool",
     "label is null, expected true or false"),
    ("unpaired", {"prompt": "p", "label": True}, "missing_completion", None),
    ("unpaired", {"prompt": "p", "completion": 4, "label": True}, "completion_not_string", None),
    ("unpaired_conversational", {"prompt": chat("user", "q"), "completion": "a", "label": True}, "completion_not_list",
     "completion is a string"),
    ("unpaired_conversational", {"completion": chat("assistant", "a"), "label": True}, "empty_prompt", None),
    ("unpaired_conversational", {"prompt": chat("user", "q"), "completion": chat("assistant", "a", "user", "b"),
                                 "label": False}, "last_turn_not_assistant", "completion[1]"),
    ("unpaired_conversational", {"prompt": chat("user", "q"), "completion": chat("assistant", "a"), "label": "false"},
     "label_not_bool", "label is a string, expected true or false"),
])
def test_unpaired_rejects(shape: str, record: Any, reason: str, detail: str | None) -> None:
    with pytest.raises(RecordRejected) as info:
        shapes(PREFERENCE)[shape].convert(record)
    assert (info.value.reason, info.value.detail) == (reason, detail)


def test_a_csv_label_is_the_text_true_or_false(tmp_path: Path) -> None:
    src = tmp_path / "raw.csv"
    src.write_text("prompt,completion,label\nq1,a,TRUE\nq2,b,false\nq3,c,yes\n", encoding="utf-8")
    report = prepare([src], tmp_path / "out", method=DPO, val_fraction=0.01)
    assert report["sources"][0]["rejected"] == {"label_not_bool": 1}
    assert [(row["completion"], row["label"]) for row in read_unpaired(tmp_path / "out" / DPO.train_file)] in (
        [("a", True), ("b", False)], [("b", False), ("a", True)])


def test_pairs_and_unpaired_examples_are_not_prepared_into_one_set(tmp_path: Path) -> None:
    pairs, unpaired = tmp_path / "pairs.jsonl", tmp_path / "unpaired.jsonl"
    pairs.write_bytes(WRITERS["jsonl"]([{"prompt": "p", "chosen": "a", "rejected": "b"}]))
    unpaired.write_bytes(WRITERS["jsonl"]([{"prompt": "q", "completion": "a", "label": True}]))
    with pytest.raises(DataError) as info:
        prepare([pairs, unpaired], tmp_path / "out", method=DPO)
    assert str(info.value).startswith(f"{unpaired} holds unpaired examples (prompt, completion, label) but {pairs} "
                                      f"holds preference pairs; prepare each into its own --out-dir")
    assert not (tmp_path / "out").exists()


def test_the_command_prepares_unpaired_examples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "raw.jsonl"
    src.write_bytes(WRITERS["jsonl"](CASES["unpaired"][0]))
    assert sft_main(["prepare-preferences", "--source", str(src), "--out-dir", str(tmp_path / "out"),
                     "--format", "unpaired"]) == 0
    assert capsys.readouterr().out.startswith(f"{src} (unpaired): read 5, kept 2, rejected 2")


# --- the reader ------------------------------------------------------------------------------------


def _write(path: Path, *records: dict[str, Any]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_prepared_examples_read_back_as_written(tmp_path: Path) -> None:
    src = tmp_path / "raw.json"
    src.write_bytes(WRITERS["json"](CASES["unpaired_conversational"][0]))
    prepare([src], tmp_path / "out", method=DPO, val_fraction=0.5)
    for name in (DPO.train_file, DPO.val_file):
        path = tmp_path / "out" / name
        assert read_unpaired(path) == [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_file_of_pairs_reads_as_desirable_then_undesirable_examples(tmp_path: Path) -> None:
    path = _write(tmp_path / "dpo_train.jsonl",
                  {"id": "1", "source": "s", "prompt": chat("user", "q1"), "chosen": "c1", "rejected": "r1"},
                  {"id": "2", "source": "s", "prompt": chat("user", "q2"), "chosen": "c2", "rejected": "r2"})
    assert read_unpaired(path) == [
        {"id": "1", "source": "s", **example(chat("user", "q1"), "c1", True)},
        {"id": "2", "source": "s", **example(chat("user", "q2"), "c2", True)},
        {"id": "1", "source": "s", **example(chat("user", "q1"), "r1", False)},
        {"id": "2", "source": "s", **example(chat("user", "q2"), "r2", False)}]


@pytest.mark.parametrize(("records", "message"), [
    ([{"prompt": chat("user", "q"), "completion": "c", "label": "true"}],
     ":1: field 'label' must be true or false, got a string"),
    ([{"prompt": chat("user", "q"), "label": True}], ":1: field 'completion' must be a string, but it is missing"),
    ([{"prompt": chat("user", "q"), "chosen": "c", "rejected": "r"}, {"prompt": chat("user", "q"), "completion": "c",
                                                                       "label": True}],
     ":1: a preference pair, but {path}:2 is an unpaired example (prompt, completion, label); a prepared file holds "
     "one or the other"),
])
def test_read_unpaired_names_file_line_and_field(tmp_path: Path, records: list[dict[str, Any]], message: str) -> None:
    path = _write(tmp_path / "kto.jsonl", *records)
    with pytest.raises(DataError) as info:
        read_unpaired(path)
    assert str(info.value) == f"{path}{message.format(path=path)}"


def test_read_preferences_says_an_unpaired_file_is_kto_data(tmp_path: Path) -> None:
    path = _write(tmp_path / "kto.jsonl", {"prompt": chat("user", "q"), "completion": "c", "label": True})
    with pytest.raises(DataError) as info:
        read_preferences(path)
    assert str(info.value) == (f"{path}:1: an unpaired example (prompt, completion, label), not a preference pair "
                               f"(prompt, chosen, rejected); only KTO (--loss-type kto) trains on unpaired examples")


# --- token ids -------------------------------------------------------------------------------------


def test_an_example_is_tokenized_as_a_pairs_answer_and_the_prompt_fills_are_dropped(chatml_tokenizer) -> None:
    prompt = chat("user", "Name a colour.")
    examples = [{"id": "a", **example(prompt, "Blue.", True)}, {"id": "b", **example(prompt, "Seven. " * 40, False)},
                {"id": "c", **example(chat("user", "word " * 200), "x", True)}]
    encoded, stats = encode_unpaired(chatml_tokenizer, examples, 96, None, progress=False)
    pair, truncated = encode_pair(chatml_tokenizer, {"prompt": prompt, "chosen": "Blue.", "rejected": "Seven. " * 40},
                                  96, None)
    assert encoded == [
        {"id": "a", "prompt_ids": pair["prompt_ids"], "completion_ids": pair["chosen_ids"], "label": True},
        {"id": "b", "prompt_ids": pair["prompt_ids"], "completion_ids": pair["rejected_ids"], "label": False}]
    assert truncated and len(pair["prompt_ids"]) + len(pair["rejected_ids"]) == 96
    assert stats.as_dict() == {
        "read": 3, "kept": 2, "truncated": 1, "dropped_no_answer_tokens": 1, "desirable": 1, "undesirable": 1,
        "prompt_tokens": 2 * len(pair["prompt_ids"]),
        "completion_tokens": len(pair["chosen_ids"]) + len(pair["rejected_ids"]), "dropped_ids": ["c"]}
