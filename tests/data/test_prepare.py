"""Tests for normalizing, de-duplicating, splitting and writing SFT data (Alpaca sources)."""

from __future__ import annotations

import hashlib
import json
import random
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from sft.data.formats import RecordRejected, alpaca_fields, normalize_text, record_id
from sft.data.prepare import REJECTS_FILE, REPORT_FILE, TRAIN_FILE, VAL_FILE, is_val, main, prepare
from sft.errors import DataError
from sft.outputs import MANIFEST_FILE


def rid(instruction: str, input_text: str = "") -> str:
    """Independent reimplementation of the documented id rule."""
    key = f"{instruction}\x1f{input_text}".encode()
    return hashlib.sha256(key).hexdigest()[:16]


def rec(instruction: Any, output: Any = "out", **extra: Any) -> dict[str, Any]:
    return {"instruction": instruction, "output": output, **extra}


def messages(instruction: str, output: str = "out", input_text: str = "") -> list[dict[str, str]]:
    """The prepared conversation of an Alpaca record, by the documented rule."""
    user = f"{instruction}\n\n{input_text}" if input_text else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def prepared(instruction: str, source: Path, output: str = "out", input_text: str = "") -> dict[str, Any]:
    return {"id": rid(instruction, input_text), "source": str(source),
            "messages": messages(instruction, output, input_text)}


def answer(row: dict[str, Any]) -> str:
    return row["messages"][-1]["content"]


def write_json(path: Path, items: list[Any]) -> Path:
    path.write_text(json.dumps(items, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def write_jsonl(path: Path, items: list[Any]) -> Path:
    lines = [json.dumps(item, ensure_ascii=False) for item in items]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def outputs(out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        "train": read_jsonl(out_dir / TRAIN_FILE),
        "val": read_jsonl(out_dir / VAL_FILE),
        "rejects": read_jsonl(out_dir / REJECTS_FILE),
    }


def kept_ids(out_dir: Path) -> dict[str, str]:
    """Map every written id to its split."""
    files = outputs(out_dir)
    return {r["id"]: split for split in ("train", "val") for r in files[split]}


# --- normalize_text -------------------------------------------------------


def test_normalize_text_unifies_line_endings_and_strips() -> None:
    assert normalize_text("  \r\nline1\r\nline2\rline3  \n\t") == "line1\nline2\nline3"


def test_normalize_text_keeps_inner_whitespace() -> None:
    assert normalize_text("def f():\n    return  1\n\n") == "def f():\n    return  1"


def test_normalize_text_applies_nfc() -> None:
    decomposed = "cafe\u0301"
    assert normalize_text(decomposed) == "caf\u00e9"
    assert normalize_text(decomposed) == normalize_text("caf\u00e9")


def test_normalize_text_is_idempotent() -> None:
    alphabet = "a \t\r\n\u0301\u0327e\u00e9\u2000\u2028\u3000\u1100\u1161\u11a8\u212b\u0041\u030a"
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        once = normalize_text(text)
        assert normalize_text(once) == once, repr(text)
        assert unicodedata.is_normalized("NFC", once)


# --- alpaca_fields ---------------------------------------------------------


def test_alpaca_fields_defaults_input_and_ignores_extra_fields() -> None:
    assert alpaca_fields(rec(" do \r\n it ", "done", extra=1)) == ("do \n it", "", "done")
    assert alpaca_fields(rec("do", "done", input=None)) == ("do", "", "done")
    assert alpaca_fields(rec("do", "done", input=" x ")) == ("do", "x", "done")


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ([1, 2], "not_an_object"),
        ({"output": "o"}, "missing_instruction"),
        ({"instruction": "i"}, "missing_output"),
        (rec(None), "instruction_not_string"),
        (rec(5), "instruction_not_string"),
        (rec("i", None), "output_not_string"),
        (rec("i", ["o"]), "output_not_string"),
        (rec("i", input=3), "input_not_string"),
        (rec(" \r\n "), "empty_instruction"),
        (rec("i", "\t"), "empty_output"),
        (rec("i\ud800"), "instruction_invalid_unicode"),
        (rec("", None), "empty_instruction"),
    ],
)
def test_alpaca_fields_rejects(item: Any, reason: str) -> None:
    with pytest.raises(RecordRejected) as info:
        alpaca_fields(item)
    assert info.value.reason == reason


def test_record_id_matches_documented_rule() -> None:
    assert record_id("ab", "c") == rid("ab", "c")
    assert record_id("ab", "c") != record_id("a", "bc")
    assert len(record_id("x", "")) == 16


# --- prepare: reading, rejects and counts ---------------------------------


def test_json_and_jsonl_sources_are_merged(tmp_path: Path) -> None:
    a = write_json(tmp_path / "a.json", [rec("A1", input="in"), rec("A2")])
    b = write_jsonl(tmp_path / "b.jsonl", [rec("B1")])
    report = prepare([a, b], tmp_path / "out", seed=1)
    files = outputs(tmp_path / "out")
    written = sorted(files["train"] + files["val"], key=lambda r: r["id"])
    rows = [("A1", "in", a), ("A2", "", a), ("B1", "", b)]
    expected = sorted((prepared(i, s, input_text=x) for i, x, s in rows), key=lambda r: r["id"])
    assert written == expected
    assert [list(r) for r in written] == [["id", "source", "messages"]] * 3
    assert written[[r["id"] for r in written].index(rid("A1", "in"))]["messages"][0]["content"] == "A1\n\nin"
    assert report["total"] == {"read": 3, "kept": 3, "rejected": {}, "replaced": 0}
    assert [s["format"] for s in report["sources"]] == ["alpaca", "alpaca"]
    assert report["train"] + report["val"] == 3


def test_output_is_normalized_and_unicode_kept_readable(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "s.jsonl", [rec(" cafe\u0301\r\nx ", "r\u00e9ponse\r")])
    prepare([src], tmp_path / "out")
    text = (tmp_path / "out" / TRAIN_FILE).read_text(encoding="utf-8") + (
        tmp_path / "out" / VAL_FILE
    ).read_text(encoding="utf-8")
    assert "caf\u00e9\\nx" in text  # NFC, CRLF -> \n, stripped, not \u-escaped
    assert "\r" not in text and "\\r" not in text
    [row] = [json.loads(line) for line in text.splitlines()]
    assert row == prepared("caf\u00e9\nx", src, "r\u00e9ponse")


def test_rejects_are_counted_exactly_and_written(tmp_path: Path) -> None:
    items = [
        rec("good1"),
        rec("   "),  # 1 empty_instruction
        rec("\r\n\t"),  # 2 empty_instruction
        rec("x", "  "),  # 3 empty_output
        "not an object",  # 4
        rec(7),  # 5
        {"output": "o"},  # 6
        {"instruction": "i"},  # 7
        rec("y", input=["list"]),  # 8
        rec("good2", input=None),
    ]
    src = write_json(tmp_path / "s.json", items)
    report = prepare([src], tmp_path / "out")
    assert report["sources"] == [
        {
            "path": str(src),
            "format": "alpaca",
            "read": 10,
            "kept": 2,
            "rejected": {
                "empty_instruction": 2,
                "empty_output": 1,
                "input_not_string": 1,
                "instruction_not_string": 1,
                "missing_instruction": 1,
                "missing_output": 1,
                "not_an_object": 1,
            },
            "replaced": 0,
        }
    ]
    rejects = outputs(tmp_path / "out")["rejects"]
    assert [(r["position"], r["reason"]) for r in rejects] == [
        (1, "empty_instruction"),
        (2, "empty_instruction"),
        (3, "empty_output"),
        (4, "not_an_object"),
        (5, "instruction_not_string"),
        (6, "missing_instruction"),
        (7, "missing_output"),
        (8, "input_not_string"),
    ]
    assert rejects[3] == {
        "source": str(src),
        "position": 4,
        "reason": "not_an_object",
        "record": "not an object",
    }
    assert rejects[0]["record"] == rec("   ")
    assert set(kept_ids(tmp_path / "out")) == {rid("good1"), rid("good2")}


def test_duplicate_across_sources_later_wins(tmp_path: Path) -> None:
    original = write_json(
        tmp_path / "alpaca_data.json",
        [rec("Q1", "old answer"), rec("Q2", "keep me"), rec("Q3 ", "old", input="in")],
    )
    cleaned = write_jsonl(
        tmp_path / "cleaned.jsonl",
        [rec("Q1", "new answer"), rec("Q3", "new", input=" in\r\n"), rec("Q4")],
    )
    report = prepare([original, cleaned], tmp_path / "out")
    assert report["sources"] == [
        {"path": str(original), "format": "alpaca", "read": 3, "kept": 1, "rejected": {}, "replaced": 2},
        {"path": str(cleaned), "format": "alpaca", "read": 3, "kept": 3, "rejected": {}, "replaced": 0},
    ]
    assert report["total"] == {"read": 6, "kept": 4, "rejected": {}, "replaced": 2}
    files = outputs(tmp_path / "out")
    by_id = {r["id"]: r for r in files["train"] + files["val"]}
    assert set(by_id) == {rid("Q1"), rid("Q2"), rid("Q3", "in"), rid("Q4")}
    assert answer(by_id[rid("Q1")]) == "new answer"
    assert by_id[rid("Q1")]["source"] == str(cleaned)
    assert answer(by_id[rid("Q3", "in")]) == "new"
    assert by_id[rid("Q2")]["source"] == str(original)
    assert files["rejects"] == [
        {
            "source": str(original),
            "position": 0,
            "reason": "duplicate_replaced",
            "record": rec("Q1", "old answer"),
            "replaced_by": {"source": str(cleaned), "position": 1},
        },
        {
            "source": str(original),
            "position": 2,
            "reason": "duplicate_replaced",
            "record": rec("Q3 ", "old", input="in"),
            "replaced_by": {"source": str(cleaned), "position": 2},
        },
    ]


def test_duplicate_within_one_source_last_wins(tmp_path: Path) -> None:
    items = [rec("Q", "first"), rec("other"), rec("Q", "second"), rec("Q", "third")]
    src = write_jsonl(tmp_path / "s.jsonl", items)
    report = prepare([src], tmp_path / "out")
    assert report["sources"][0] == {
        "path": str(src),
        "format": "alpaca",
        "read": 4,
        "kept": 2,
        "rejected": {},
        "replaced": 2,
    }
    files = outputs(tmp_path / "out")
    assert {r["id"]: answer(r) for r in files["train"] + files["val"]} == {
        rid("Q"): "third",
        rid("other"): "out",
    }
    assert [(r["position"], r["replaced_by"]["position"]) for r in files["rejects"]] == [
        (1, 3),
        (3, 4),
    ]


def test_counts_add_up_per_source_and_total(tmp_path: Path) -> None:
    a = write_json(tmp_path / "a.json", [rec("1"), rec("2"), rec(""), 5, rec("3"), rec("1")])
    b = write_jsonl(tmp_path / "b.jsonl", [rec("2"), rec("x", None), rec("4"), rec("3")])
    c = write_jsonl(tmp_path / "c.jsonl", [rec("4"), {"instruction": "z"}])
    report = prepare([a, b, c], tmp_path / "out")
    summary = [
        (s["read"], s["kept"], sum(s["rejected"].values()), s["replaced"])
        for s in report["sources"]
    ]
    assert summary == [(6, 1, 2, 3), (4, 2, 1, 1), (2, 1, 1, 0)]
    total = report["total"]
    assert (total["read"], total["kept"], total["replaced"]) == (12, 4, 4)
    assert total["rejected"] == {
        "empty_instruction": 1,
        "missing_output": 1,
        "not_an_object": 1,
        "output_not_string": 1,
    }
    for counts in [*report["sources"], total]:
        rejected = sum(counts["rejected"].values())
        assert counts["read"] == counts["kept"] + rejected + counts["replaced"]
    assert len(outputs(tmp_path / "out")["rejects"]) == 8
    assert report["train"] + report["val"] == 4


# --- prepare: split and determinism ---------------------------------------


def synthetic(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [rec(f"instruction {i}", f"output {i}") for i in range(start, start + n)]


def test_split_follows_hash_rule_and_output_is_sorted(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "s.jsonl", synthetic(300))
    report = prepare([src], tmp_path / "out", val_fraction=0.2, seed=7)
    files = outputs(tmp_path / "out")
    all_ids = [rid(f"instruction {i}") for i in range(300)]
    expected_val = sorted(i for i in all_ids if is_val(i, 7, 0.2))
    expected_train = sorted(i for i in all_ids if not is_val(i, 7, 0.2))
    assert [r["id"] for r in files["val"]] == expected_val
    assert [r["id"] for r in files["train"]] == expected_train
    assert (report["train"], report["val"]) == (len(expected_train), len(expected_val))
    assert report["val_fraction"] == 0.2 and report["seed"] == 7


def test_is_val_matches_documented_formula() -> None:
    for i in range(200):
        record = rid(f"q{i}")
        digest = hashlib.sha256(f"3:{record}".encode()).hexdigest()
        assert is_val(record, 3, 0.3) == (int(digest[:16], 16) / 2**64 < 0.3)


def test_adding_records_never_moves_existing_ones(tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "v1.jsonl", synthetic(500))
    prepare([first], tmp_path / "out1", val_fraction=0.1)
    before = kept_ids(tmp_path / "out1")
    grown = write_jsonl(tmp_path / "v2.jsonl", synthetic(500) + synthetic(700, start=500))
    prepare([grown], tmp_path / "out2", val_fraction=0.1)
    after = kept_ids(tmp_path / "out2")
    assert len(before) == 500 and len(after) == 1200
    assert {k: after[k] for k in before} == before
    assert "val" in before.values() and "train" in before.values()


def test_seed_changes_the_split(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "s.jsonl", synthetic(400))
    prepare([src], tmp_path / "a", seed=1)
    prepare([src], tmp_path / "b", seed=2)
    assert kept_ids(tmp_path / "a") != kept_ids(tmp_path / "b")


def test_val_fraction_is_roughly_respected(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "s.jsonl", synthetic(2000))
    report = prepare([src], tmp_path / "out", val_fraction=0.05)
    assert report["train"] + report["val"] == 2000
    assert 0.03 <= report["val"] / 2000 <= 0.07


def test_two_runs_give_identical_bytes(tmp_path: Path) -> None:
    a = write_json(tmp_path / "a.json", synthetic(50) + [rec(""), 3, rec("instruction 1")])
    b = write_jsonl(tmp_path / "b.jsonl", synthetic(30, start=40) + [{"output": "x"}])
    names = [TRAIN_FILE, VAL_FILE, REJECTS_FILE, REPORT_FILE]
    prepare([a, b], tmp_path / "out", val_fraction=0.2)
    first = {name: (tmp_path / "out" / name).read_bytes() for name in names}
    prepare([a, b], tmp_path / "out", val_fraction=0.2)
    second = {name: (tmp_path / "out" / name).read_bytes() for name in names}
    assert first == second
    assert all(first.values())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*names, MANIFEST_FILE])
    assert b"\r" not in b"".join(first.values())


def test_report_file_matches_returned_report(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "s.jsonl", synthetic(10))
    report = prepare([src], tmp_path / "out", val_fraction=0.5, seed=3)
    on_disk = json.loads((tmp_path / "out" / REPORT_FILE).read_text(encoding="utf-8"))
    assert on_disk == report
    assert list(on_disk) == ["sources", "total", "train", "val", "val_fraction", "seed"]


def test_empty_val_is_reported_not_fixed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = synthetic(3)
    ids = [rid(r["instruction"]) for r in items]
    seed = next(s for s in range(1000) if not any(is_val(i, s, 0.01) for i in ids))
    src = write_jsonl(tmp_path / "s.jsonl", items)
    argv = ["--source", str(src), "--out-dir", str(tmp_path / "out"), "--val-fraction", "0.01"]
    code = main([*argv, "--seed", str(seed)])
    assert code == 0
    assert "warning: the val split is empty" in capsys.readouterr().out
    assert (tmp_path / "out" / VAL_FILE).read_bytes() == b""
    assert len(read_jsonl(tmp_path / "out" / TRAIN_FILE)) == 3


# --- prepare: errors ------------------------------------------------------


def test_no_usable_records_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "s.jsonl", [rec(""), 4])
    with pytest.raises(DataError, match="no usable records"):
        prepare([src], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_source_fails_before_writing(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", synthetic(5))
    with pytest.raises(DataError, match="missing.json not found"):
        prepare([good, tmp_path / "missing.json"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_same_source_twice_is_an_error(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "s.jsonl", synthetic(5))
    with pytest.raises(DataError, match="more than once"):
        prepare([src, tmp_path / "." / "s.jsonl"], tmp_path / "out")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_prepare_rejects_bad_val_fraction(tmp_path: Path, fraction: float) -> None:
    src = write_jsonl(tmp_path / "s.jsonl", synthetic(5))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        prepare([src], tmp_path / "out", val_fraction=fraction)


# --- CLI ------------------------------------------------------------------


def test_main_success_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_json(tmp_path / "a.json", [rec("Q1", "old"), rec(""), rec("Q2")])
    b = write_jsonl(tmp_path / "b.jsonl", [rec("Q1", "new")])
    out_dir = tmp_path / "out"
    argv = ["--source", str(a), "--source", str(b), "--out-dir", str(out_dir)]
    assert main([*argv, "--val-fraction", "0.5"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert lines[0] == f"{a} (alpaca): read 3, kept 1, rejected 1 (empty_instruction 1), replaced 1"
    assert lines[1] == f"{b} (alpaca): read 1, kept 1, rejected 0, replaced 0"
    assert lines[2] == "total: read 4, kept 2, rejected 1 (empty_instruction 1), replaced 1"
    assert lines[3].startswith("split: train ") and "(val fraction 0.5, seed 42)" in lines[3]
    assert f"wrote {out_dir / TRAIN_FILE}" in lines
    assert f"wrote {out_dir / REPORT_FILE}" in lines
    report = json.loads((out_dir / REPORT_FILE).read_text(encoding="utf-8"))
    assert report["val_fraction"] == 0.5 and report["seed"] == 42


def test_main_missing_default_source_returns_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: data/raw/alpaca_data.json not found.")
    assert captured.err.count("\n") == 1
    assert "Traceback" not in captured.err
    assert not (tmp_path / "data" / "processed").exists()


def test_main_bad_json_returns_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n', encoding="utf-8")
    assert main(["--source", str(src), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src}:2:") and "invalid JSON" in err


def test_main_unwritable_out_dir_returns_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_jsonl(tmp_path / "s.jsonl", synthetic(3))
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    assert main(["--source", str(src), "--out-dir", str(blocker / "out")]) == 2
    assert capsys.readouterr().err == f"error: {blocker / 'out'}: Not a directory\n"


@pytest.mark.parametrize("value", ["1.5", "0", "1", "-0.2", "nan", "abc"])
def test_main_rejects_bad_val_fraction(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--val-fraction", value])
    assert info.value.code == 2
    assert "--val-fraction" in capsys.readouterr().err
