"""Tests for reading source files: JSON, JSONL, CSV and Parquet, plain or gzip-compressed."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sft.data.sources import CsvRecord, iter_records, read_source
from sft.errors import DataError


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_json_array_positions_are_zero_based_indices(tmp_path: Path) -> None:
    items = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    path = write(tmp_path / "data.json", json.dumps(items, indent=2))
    assert list(iter_records(path)) == [(0, items[0]), (1, items[1])]


def test_jsonl_positions_are_line_numbers_and_blank_lines_skipped(tmp_path: Path) -> None:
    text = '{"instruction": "a"}\n\n   \n{"instruction": "b"}\n\n'
    path = write(tmp_path / "data.jsonl", text)
    assert list(iter_records(path)) == [(1, {"instruction": "a"}), (4, {"instruction": "b"})]


def test_format_is_detected_by_content_not_suffix(tmp_path: Path) -> None:
    array = write(tmp_path / "array.jsonl", '\n  [{"instruction": "a"}]')
    lines = write(tmp_path / "lines.json", '{"instruction": "a"}\n{"instruction": "b"}\n')
    assert list(iter_records(array)) == [(0, {"instruction": "a"})]
    assert list(iter_records(lines)) == [(1, {"instruction": "a"}), (2, {"instruction": "b"})]


def test_jsonl_with_crlf_line_endings(tmp_path: Path) -> None:
    path = write(tmp_path / "data.jsonl", '{"a": 1}\r\n\r\n{"a": 2}\r\n')
    assert list(iter_records(path)) == [(1, {"a": 1}), (3, {"a": 2})]


@pytest.mark.parametrize("text", ['[{"a": "é"}]', '{"a": "é"}\n'])
def test_utf8_bom_is_accepted(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "bom.jsonl", text, encoding="utf-8-sig")
    assert [item for _, item in iter_records(path)] == [{"a": "é"}]


def test_non_object_items_are_yielded_not_fatal(tmp_path: Path) -> None:
    path = write(tmp_path / "data.json", '[1, "x", null, [], {"a": 1}]')
    assert list(iter_records(path)) == [(0, 1), (1, "x"), (2, None), (3, []), (4, {"a": 1})]


def test_line_separator_inside_jsonl_string_does_not_split_line(tmp_path: Path) -> None:
    path = write(tmp_path / "data.jsonl", '{"a": "x\u2028y"}\n{"a": 2}\n')
    assert list(iter_records(path)) == [(1, {"a": "x\u2028y"}), (2, {"a": 2})]


def test_single_line_object_in_jsonl_file_is_one_record(tmp_path: Path) -> None:
    path = write(tmp_path / "one.jsonl", '{"instruction": "a", "output": "b"}\n')
    assert list(iter_records(path)) == [(1, {"instruction": "a", "output": "b"})]


def test_empty_file_yields_nothing(tmp_path: Path) -> None:
    assert list(iter_records(write(tmp_path / "empty.jsonl", "\n \n"))) == []


def test_broken_jsonl_line_names_file_line_and_column(tmp_path: Path) -> None:
    text = '{"a": 1}\n{"a": 2}\n{"a": 3,, }\n{"a": 4}\n'
    path = write(tmp_path / "broken.jsonl", text)
    with pytest.raises(DataError) as info:
        list(iter_records(path))
    message = str(info.value)
    assert str(path) in message
    assert f"{path}:3:9: invalid JSON" in message


def test_broken_array_names_file_line_and_column(tmp_path: Path) -> None:
    text = '[\n  {"a": 1},\n  {"a": 2}\n  {"a": 3}\n]\n'
    path = write(tmp_path / "broken.json", text)
    with pytest.raises(DataError) as info:
        list(iter_records(path))
    message = str(info.value)
    assert str(path) in message
    assert f"{path}:4:3: invalid JSON" in message


def test_missing_source_names_path_and_how_to_get_data(tmp_path: Path) -> None:
    path = tmp_path / "raw" / "alpaca_data.json"
    with pytest.raises(DataError) as info:
        list(iter_records(path))
    message = str(info.value)
    assert message.startswith(f"{path} not found.")
    assert "--source PATH" in message
    assert "sft fetch-demo-data" in message


def test_directory_as_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a directory"):
        list(iter_records(tmp_path))


@pytest.mark.parametrize(
    ("name", "text", "kind"),
    [
        ("obj.json", '{"instruction": "a", "output": "b"}', "an object"),
        ("obj.jsonl", '{\n  "data": [{"instruction": "a"}]\n}\n', "an object"),
        ("str.json", '"hello"', "a string"),
        ("num.json", "3", "a number"),
    ],
)
def test_top_level_non_array_document_is_an_error(
    tmp_path: Path, name: str, text: str, kind: str
) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(DataError) as info:
        list(iter_records(path))
    message = str(info.value)
    assert message.startswith(f"{path}: top-level JSON value is {kind}")
    assert "expected an array of objects" in message


def test_invalid_utf8_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"a": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        list(iter_records(path))


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)


# --- CSV, Parquet and gzip --------------------------------------------------------------------


def test_csv_positions_are_the_lines_where_rows_start(tmp_path: Path) -> None:
    path = write(tmp_path / "data.csv", 'instruction,output\n"two\nlines",a\n\nb,"c"\n')
    source = read_source(path)
    assert source.unit == "line"
    assert source.items == [(2, {"instruction": "two\nlines", "output": "a"}), (5, {"instruction": "b", "output": "c"})]
    assert all(isinstance(item, CsvRecord) for _, item in source.items)


def test_csv_cells_holding_json_lists_or_objects_are_read_as_such() -> None:
    row = CsvRecord({"messages": '[{"role": "user"}]', "meta": '{"a": 1}', "answer": "42", "text": "[not json"})
    assert row.structured("messages") == [{"role": "user"}]
    assert row.structured("meta") == {"a": 1}
    assert row.structured("answer") == "42"
    assert row.structured("text") == "[not json"
    assert row.structured("missing") is None


def test_parquet_positions_are_rows_and_nested_columns_are_lists(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "q"}]}, {"messages": []}]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    path = tmp_path / "data.parquet"
    path.write_bytes(gzip.compress(buffer.getvalue()))
    with pytest.raises(DataError, match="not a readable Parquet file"):  # the name does not say gzip
        read_source(path)
    path = path.rename(tmp_path / "data.parquet.gz")
    source = read_source(path)
    assert (source.unit, source.items) == ("row", [(0, rows[0]), (1, rows[1])])
    assert source.where(1) == "row 1"


def test_gzip_json_keeps_content_detection(tmp_path: Path) -> None:
    path = tmp_path / "data.json.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n{"a": 2}\n'))
    source = read_source(path)
    assert (source.unit, source.items) == ("line", [(1, {"a": 1}), (2, {"a": 2})])


def test_read_jsonl_gives_each_line_value_and_the_callers_messages(tmp_path: Path) -> None:
    """The one JSONL reader: any name, any value a line, the caller's words for a missing file."""
    from sft.data.sources import DuplicateKeysObject, read_jsonl

    path = write(tmp_path / "answers.txt", '\ufeff{"a": 1}\n\n  \n[2]\n{"k": 1, "k": 2}\n')
    values = list(read_jsonl(path, "a test file", "no such file"))
    assert values == [(1, {"a": 1}), (4, [2]), (5, {"k": 2})]
    assert isinstance(values[2][1], DuplicateKeysObject)
    with pytest.raises(DataError, match="^no such file$"):
        list(read_jsonl(tmp_path / "missing.jsonl", "a test file", "no such file"))
    with pytest.raises(DataError, match="is a directory; expected a test file$"):
        list(read_jsonl(tmp_path, "a test file", "no such file"))
    broken = write(tmp_path / "broken.jsonl", '{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=f"^{broken}:2:7: invalid JSON: Expecting value$"):
        list(read_jsonl(broken, "a test file", "no such file"))
