"""Property-based tests (hypothesis) for normalizing, reading, de-duplicating and splitting.

Records are drawn from small alphabets, with whitespace, line-ending and
Unicode-normalization variants of the same text, so that duplicates and
invalid records are common. Every property is checked against an
independent model of the documented rules, not against the code's own
helpers (``normalize_text`` is used as the model of normalization only after
its own properties are checked here).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sft.data.formats import normalize_text
from sft.data.prepare import REJECTS_FILE, REPORT_FILE, TRAIN_FILE, VAL_FILE, prepare
from sft.data.sources import iter_records
from sft.errors import DataError

# Modest example counts keep these files well under the suite's time budget;
# database=None keeps hypothesis from writing a .hypothesis/ folder.
SETTINGS = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

OUTPUT_FILES = (TRAIN_FILE, VAL_FILE, REJECTS_FILE, REPORT_FILE)

# --- normalize_text ------------------------------------------------------

_AWKWARD = (
    " \t\r\n\x0b\x0c\x1c\x1d\x85\u00a0\u2000\u2001\u2028\u2029\u3000"  # whitespace
    "ae\u00e9\u0301\u0327\u030a\u212b\u0041\u1100\u1161\u11a8\uac00"  # NFC-sensitive
)


@SETTINGS
@given(st.text() | st.text(alphabet=_AWKWARD, max_size=20))
def test_normalize_text_is_idempotent_trimmed_nfc_and_cr_free(text: str) -> None:
    once = normalize_text(text)
    assert normalize_text(once) == once
    assert once == once.strip()
    assert "\r" not in once
    assert unicodedata.is_normalized("NFC", once)


# --- records ---------------------------------------------------------------

_PIECES = ["a", "b", "a ", " a", "a\r\n", "\ta\n", "A", "b\r\nc", "b\nc", "cafe\u0301", "caf\u00e9"]
_BLANKS = ["", " ", "\r\n", "\t \u3000"]

_text = st.sampled_from(_PIECES)
_field = st.one_of(_text, _text, _text, st.sampled_from(_BLANKS), st.sampled_from([None, 1, True, ["a"]]))
_record = st.fixed_dictionaries(
    {"instruction": _field, "output": _field},
    optional={"input": _field, "extra": st.integers()},
)
_missing_field = st.fixed_dictionaries({}, optional={"instruction": _text, "output": _text})
# No top-level lists: a JSONL file whose first line is an array reads as a JSON array.
_item = st.one_of(_record, _record, _record, _missing_field, st.sampled_from(["text", 3, None, False]))
_items = st.lists(_item, max_size=25)
_valid_record = st.fixed_dictionaries({"instruction": _text, "output": _text}, optional={"input": _text})
# Lists that hold at least one valid record, at any position.
_items_with_valid = st.tuples(_items, _valid_record, st.integers(0, 25)).map(
    lambda t: [*t[0][: t[2]], t[1], *t[0][t[2] :]]
)


def model_key(item: Any) -> str | None:
    """The documented de-dup key of a valid Alpaca record (its user turn), or None if rejected."""
    if not isinstance(item, dict):
        return None
    instruction, output, input_text = item.get("instruction"), item.get("output"), item.get("input")
    if not (isinstance(instruction, str) and isinstance(output, str)):
        return None
    if input_text is not None and not isinstance(input_text, str):
        return None
    if not normalize_text(instruction) or not normalize_text(output):
        return None
    input_text = normalize_text(input_text or "")
    return normalize_text(instruction) + (f"\n\n{input_text}" if input_text else "")


def fits_alpaca(items: list[Any]) -> bool:
    """Whether any item has an Alpaca field: a file where none does has no known shape."""
    return any(isinstance(item, dict) and ("instruction" in item or "output" in item) for item in items)


def user_text(row: dict[str, Any]) -> str:
    return "\n\n".join(m["content"] for m in row["messages"] if m["role"] == "user")


def write_source(path: Path, items: list[Any], fmt: str) -> Path:
    if fmt == "json":
        text = json.dumps(items, ensure_ascii=False, indent=1)
    else:
        text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    path.write_text(text, encoding="utf-8")
    return path


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")[:-1]]


def kept_rows(out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    return {"train": read_lines(out_dir / TRAIN_FILE), "val": read_lines(out_dir / VAL_FILE)}


def split_of_ids(out_dir: Path) -> dict[str, str]:
    return {row["id"]: split for split, rows in kept_rows(out_dir).items() for row in rows}


def check_balance(report: dict[str, Any]) -> None:
    for counts in [*report["sources"], report["total"]]:
        rejected = sum(counts["rejected"].values())
        assert counts["read"] == counts["kept"] + rejected + counts["replaced"], counts


# --- prepare ----------------------------------------------------------------


@SETTINGS
@given(items=_items, fmt=st.sampled_from(["json", "jsonl"]))
def test_prepare_is_deterministic_conserves_counts_and_keeps_one_per_key(
    items: list[Any], fmt: str
) -> None:
    keys = {key for key in map(model_key, items) if key is not None}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = write_source(root / f"s.{fmt}", items, fmt)
        if not keys:
            expected = "no usable records" if fits_alpaca(items) or not items else "no record has a known shape"
            with pytest.raises(DataError, match=expected):
                prepare([src], root / "out1")
            return
        report = prepare([src], root / "out1", val_fraction=0.3, seed=5)
        prepare([src], root / "out2", val_fraction=0.3, seed=5)
        for name in OUTPUT_FILES:
            assert (root / "out1" / name).read_bytes() == (root / "out2" / name).read_bytes()

        check_balance(report)
        total = report["total"]
        assert total["read"] == len(items)
        assert total["kept"] == len(keys) == report["train"] + report["val"]
        rows = [row for rows in kept_rows(root / "out1").values() for row in rows]
        assert {user_text(row) for row in rows} == keys
        assert len(rows) == len(keys)
        rejects = read_lines(root / "out1" / REJECTS_FILE)
        assert len(rejects) == sum(total["rejected"].values()) + total["replaced"]
        assert all(reject["reason"] for reject in rejects)


@SETTINGS
@given(first=_items_with_valid, second=_items)
def test_later_source_wins_and_adding_records_never_moves_a_split(
    first: list[Any], second: list[Any]
) -> None:
    assume(fits_alpaca(second) or not second)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src1 = write_source(root / "first.jsonl", first, "jsonl")
        src2 = write_source(root / "second.json", second, "json")
        expected: dict[str, tuple[str, str]] = {}
        for src, items in ((src1, first), (src2, second)):
            for item in items:
                key = model_key(item)
                if key is not None:
                    expected[key] = (normalize_text(item["output"]), str(src))

        prepare([src1], root / "alone", val_fraction=0.5, seed=1)
        report = prepare([src1, src2], root / "both", val_fraction=0.5, seed=1)
        check_balance(report)

        rows = [row for rows in kept_rows(root / "both").values() for row in rows]
        winners = {user_text(row): (row["messages"][-1]["content"], row["source"]) for row in rows}
        assert winners == expected

        before, after = split_of_ids(root / "alone"), split_of_ids(root / "both")
        assert set(before) <= set(after)
        assert {rid: after[rid] for rid in before} == before


# --- reading sources --------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
_json_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8,
)


@SETTINGS
@given(
    items=st.lists(_json_values, max_size=6),
    fmt=st.sampled_from(["json", "jsonl"]),
    bom=st.booleans(),
    crlf=st.booleans(),
    ascii_only=st.booleans(),
)
def test_iter_records_round_trips_any_json_items(
    items: list[Any], fmt: str, bom: bool, crlf: bool, ascii_only: bool
) -> None:
    if fmt == "jsonl":
        assume(not items or not isinstance(items[0], list))
        text = "".join(json.dumps(item, ensure_ascii=ascii_only) + "\n" for item in items)
        expected = list(enumerate(items, start=1))
    else:
        text = json.dumps(items, ensure_ascii=ascii_only, indent=2)
        expected = list(enumerate(items))
    if crlf:
        text = text.replace("\n", "\r\n")
    data = ("\ufeff" if bom else "") + text
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"items.{fmt}"
        path.write_text(data, encoding="utf-8", newline="")
        assert list(iter_records(path)) == expected


# --- conversations -----------------------------------------------------------

_ROLES = ["system", "user", "assistant", "user", "assistant", "tool", "User"]
_turn = st.fixed_dictionaries(
    {"role": st.sampled_from(_ROLES), "content": st.one_of(_text, _text, _text, st.sampled_from([*_BLANKS, None, 3]))}
)
_chat = st.fixed_dictionaries({"messages": st.lists(_turn, max_size=6)}, optional={"extra": st.integers()})


def model_conversation(item: dict[str, Any]) -> tuple[tuple[str, str], ...] | None:
    """The documented key of a valid conversation (its non-assistant turns), or None if rejected."""
    turns = item["messages"]
    if not turns or any(t["role"] not in ("system", "user", "assistant") for t in turns):
        return None
    if any(not isinstance(t["content"], str) or not normalize_text(t["content"]) for t in turns):
        return None
    roles = [t["role"] for t in turns]
    body = roles[1:] if roles[0] == "system" else roles
    if not body or body != ["user", "assistant"] * (len(body) // 2) or len(body) % 2:
        return None
    return tuple((t["role"], normalize_text(t["content"])) for t in turns if t["role"] != "assistant")


@SETTINGS
@given(first=st.lists(_chat, min_size=1, max_size=25), second=st.lists(_chat, max_size=10))
def test_conversations_keep_exactly_the_valid_ones_and_the_later_wins(
    first: list[dict[str, Any]], second: list[dict[str, Any]]
) -> None:
    expected: dict[tuple[tuple[str, str], ...], tuple[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sources = [write_source(root / "a.jsonl", first, "jsonl"), write_source(root / "b.json", second, "json")]
        for src, items in zip(sources, (first, second)):
            for item in items:
                key = model_conversation(item)
                if key is not None:
                    expected[key] = (normalize_text(item["messages"][-1]["content"]), str(src))
        if not expected:
            with pytest.raises(DataError, match="no usable records"):
                prepare(sources, root / "out")
            return
        report = prepare(sources, root / "out", val_fraction=0.5, seed=3)
        check_balance(report)
        assert [s["format"] for s in report["sources"]] == ["messages", "messages" if second else None]
        rows = [row for rows in kept_rows(root / "out").values() for row in rows]
        winners = {
            tuple((m["role"], m["content"]) for m in row["messages"] if m["role"] != "assistant"):
            (row["messages"][-1]["content"], row["source"])
            for row in rows
        }
        assert winners == expected and len(rows) == len(expected)


# --- reading CSV and Parquet ------------------------------------------------------

_cell = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
_rows = st.lists(st.fixed_dictionaries({"a": _cell, "b": _cell}), max_size=6)


@SETTINGS
@given(rows=_rows, compressed=st.booleans())
def test_csv_and_parquet_round_trip_any_text(rows: list[dict[str, str]], compressed: bool) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, ["a", "b"])
    writer.writeheader()
    writer.writerows(rows)
    table = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("a", pa.string()), ("b", pa.string())])), table)
    files = {"rows.csv": text.getvalue().encode("utf-8"), "rows.parquet": table.getvalue()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            path = Path(tmp) / (name + ".gz" if compressed else name)
            path.write_bytes(gzip.compress(data) if compressed else data)
            assert [row for _, row in iter_records(path)] == rows
