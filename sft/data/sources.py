"""Read source files: a JSON array, JSONL, CSV or Parquet, each optionally gzip-compressed.

CSV and Parquet are told by the file name (``.csv``, ``.parquet``, before an optional ``.gz``).
JSON and JSONL are told apart by the content, not the name, because dumps circulate under both
``.json`` and ``.jsonl`` names in either layout: if the first non-whitespace character is ``[``
the file is a JSON array, otherwise it is JSONL (one JSON value per line, blank lines skipped).
What the records mean (which fields, which shape) is :mod:`sft.data.formats`' business.
:func:`read_jsonl` (and :func:`jsonl_values` for text already read) is the JSONL reader of the
whole package: prepared files, prompt files and answer logs are read through it, so a broken
line is always named as ``<path>:<line>[:<column>]: ...``.

Everything that makes a whole file unusable (missing, a directory, unreadable, not gzip where the
name says so, not UTF-8, not JSON, wrong top-level shape, nested too deeply to parse, a CSV row
with more or fewer values than the header, a broken Parquet file) raises :class:`DataError`, whose
message names the file and, where there is one, the line (and column); nothing escapes as a bare
``RecursionError`` or ``UnicodeDecodeError``. Single items that are not objects are *not* fatal
here: they are yielded like any other item so that the caller can count and report them as
rejects.

Decisions for input that JSON allows but that is almost always a mistake:

* **Duplicate keys** (``{"output": "a", "output": "b"}``): RFC 8259 leaves
  the meaning open and Python's ``json`` silently keeps the last value. Here
  the object is still built last-wins, but it is yielded as a
  :class:`DuplicateKeysObject` (a ``dict`` subclass) whose ``duplicate_keys``
  names the repeated keys, so that the caller can reject it;
  :mod:`sft.data.formats` rejects a record that repeats a field it reads
  (reason ``<field>_duplicate_key``) and ignores a repeated extra field like
  any extra field.
* **NaN, Infinity, -Infinity** and number literals too large for a float
  (``1e999``) are parsed, as Python's ``json`` does, into float values; a
  record whose text field holds one is rejected as ``<field>_not_string``.
* **Nesting deeper than Python's parser can follow** (it raises
  ``RecursionError`` at roughly ``sys.getrecursionlimit()`` levels) makes the
  file unusable: :class:`DataError` names the file, the line, and for an
  array the index of the item.
* **Integer literals longer than** ``sys.get_int_max_str_digits()`` digits
  (Python refuses to convert them) likewise make the file unusable.
* A UTF-8 byte-order mark is accepted; a UTF-16/UTF-32 one, NUL bytes and
  invalid UTF-8 are errors naming the line.

CSV has no types: every value is text, an empty cell is the empty string, and a field that holds a
list (a conversation) holds it as JSON text, read by :meth:`CsvRecord.structured`.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.errors import DataError

# Whitespace as JSON defines it; ``str.strip()`` would also accept characters
# such as U+00A0 that ``json.loads`` rejects, hiding a broken line.
_JSON_WHITESPACE = " \t\r\n"
_WHITESPACE_RUN = re.compile(r"[ \t\r\n]*")

_OBTAIN_HINT = (
    "Put the data there (the SFT defaults are alpaca_data.json from the Stanford Alpaca "
    "repository and cleaned_data.json from alpaca-cleaned), pass --source PATH, "
    "or try a demo set: `sft fetch-demo-data` writes data/raw/alpaca_eval_demo.json "
    "(then --source data/raw/alpaca_eval_demo.json), `sft fetch-demo-data --set dpo` writes the "
    "preference pairs data/raw/dpo_en_demo.json."
)

_A_DATA_FILE = "a JSON, JSONL, CSV or Parquet file"

_EXPECTED_SHAPE = "expected an array of objects, or JSONL with one object per line"


class DuplicateKeysObject(dict):  # type: ignore[type-arg]
    """A parsed JSON object that repeated at least one key (last value kept).

    ``duplicate_keys`` lists each repeated key once, in order of first
    repetition. Plain objects are parsed as plain ``dict``.
    """

    duplicate_keys: tuple[str, ...]

    def __init__(self, pairs: list[tuple[str, Any]], duplicate_keys: tuple[str, ...]) -> None:
        super().__init__(pairs)
        self.duplicate_keys = duplicate_keys


def _object_from_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: a plain dict, or a DuplicateKeysObject if keys repeat."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    repeated: dict[str, None] = {}
    for key, _ in pairs:
        if key in seen:
            repeated[key] = None
        seen.add(key)
    return DuplicateKeysObject(pairs, tuple(repeated))


_DECODER = json.JSONDecoder(object_pairs_hook=_object_from_pairs)


class CsvRecord(dict):  # type: ignore[type-arg]
    """A CSV row as ``{column: text}``; CSV has no lists, so a list-valued field holds JSON text."""

    def structured(self, name: str) -> Any:
        """The field ``name`` parsed as JSON where it holds a JSON array or object, else as is.

        Text that parses to anything else (``"42"``, ``"null"``) stays text: only lists and
        objects need JSON in a CSV cell, and an answer that reads "42" is text. An empty cell is
        None: a column that some rows leave empty (an optional list) holds nothing there.
        """
        value = self.get(name)
        if not value:
            return None
        try:
            parsed = _DECODER.decode(value)
        except (ValueError, RecursionError):
            return value
        return parsed if isinstance(parsed, (list, dict)) else value


@dataclass(frozen=True)
class Source:
    """The items of one source file and what their positions count.

    ``unit`` says what a position is, so that messages can name a record the way an editor or a
    program would find it: ``"line"`` (1-based line number, for JSONL and CSV), ``"item"``
    (0-based index of a JSON array) or ``"row"`` (0-based row of a Parquet table).
    """

    path: str
    items: list[tuple[int, Any]]
    unit: str

    def where(self, position: int) -> str:
        """Name the record at ``position``, e.g. ``"line 3"``."""
        return f"{self.unit} {position}"


def iter_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """Yield ``(position, item)`` for every item in the source at ``path``; see :func:`read_source`."""
    yield from read_source(path).items


def read_source(path: str | os.PathLike[str]) -> Source:
    """Read every item of the source at ``path``, whatever its type.

    ``position`` is the 1-based line number for JSONL and CSV files (so it matches what an editor
    shows; for CSV the line where the row starts), the 0-based array index for JSON arrays (so it
    matches ``data[position]``) and the 0-based row for Parquet. The whole file is read and parsed
    first, so a syntax error anywhere raises :class:`DataError` before any item is used.
    """
    file_path = Path(path)
    name = file_path.name.lower()
    compressed = name.endswith(".gz")
    name = name.removesuffix(".gz")
    data = _read_bytes(file_path, _A_DATA_FILE, f"{file_path} not found. {_OBTAIN_HINT}")
    if compressed:
        data = _gunzip(file_path, data)
    if name.endswith(".parquet"):
        return Source(os.fspath(path), _parse_parquet(file_path, data), "row")
    text = decode_utf8(file_path, data)
    if name.endswith(".csv"):
        return Source(os.fspath(path), _parse_csv(file_path, text), "line")
    if text.lstrip(_JSON_WHITESPACE).startswith("["):
        return Source(os.fspath(path), _parse_array(path, text), "item")
    _reject_single_document(path, text, json_named=name.endswith(".json"))
    return Source(os.fspath(path), list(jsonl_values(path, text)), "line")


def read_jsonl(path: str | os.PathLike[str], expected: str, missing: str) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line of the JSONL file at ``path``, whatever the
    file's name; ``expected`` says what the file should be and ``missing`` is the whole message for
    a path where there is no file. Every problem raises :class:`DataError` as :func:`read_source`'s do."""
    path = Path(path)
    return jsonl_values(path, decode_utf8(path, _read_bytes(path, expected, missing)))


def _read_bytes(path: Path, expected: str, missing: str) -> bytes:
    """Return the file's bytes, or raise naming what is wrong with the path (``missing``: the
    message where nothing is there; ``expected``: what the path should be)."""
    if not path.exists():
        if path.is_symlink():
            raise DataError(f"{path} is a symbolic link to a missing file (or a link loop); expected {expected}")
        raise DataError(missing)
    if path.is_dir():
        raise DataError(f"{path} is a directory; expected {expected}")
    if not path.is_file():  # /dev/zero never ends, a FIFO blocks: only a file has a size to read
        raise DataError(f"{path} is not a regular file (a device, FIFO or socket); expected {expected}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc


MAX_DECOMPRESSED_BYTES = 2 << 30
"""The most a ``.gz`` source may expand to. Gzip shrinks a run of one byte a thousandfold, so a
small file can hold gigabytes; past this size the source is refused before more is inflated (a
really larger data set can be decompressed beforehand, where its size is there to see)."""


def _gunzip(path: Path, data: bytes) -> bytes:
    """Decompress a ``.gz`` source (every member, as gzip does), or raise: the name promised gzip,
    and the data must fit MAX_DECOMPRESSED_BYTES."""
    chunks, size, rest = [], 0, data
    if not data:
        return data
    try:
        while True:
            inflate = zlib.decompressobj(wbits=31)  # a gzip header and trailer around one member
            while rest:
                chunk = inflate.decompress(rest, 1 << 20)  # at most 1 MiB out per call
                rest = inflate.unconsumed_tail
                size += len(chunk)
                if size > MAX_DECOMPRESSED_BYTES:
                    raise DataError(f"{path}: decompresses to more than {MAX_DECOMPRESSED_BYTES >> 20} MiB (from "
                                    f"{len(data)} bytes); refused before it fills memory. If the data really is "
                                    f"that large, decompress it (gunzip) and pass the plain file")
                chunks.append(chunk)
                if inflate.eof:
                    break
            if not inflate.eof:
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
            rest = inflate.unused_data.lstrip(b"\x00")  # gzip pads members with zeros at times
            if not rest:
                return b"".join(chunks)
    except (zlib.error, EOFError) as exc:
        raise DataError(f"{path}: not valid gzip data ({exc}); a name ending in .gz promises a gzip file") from None


def _parse_parquet(path: Path, data: bytes) -> list[tuple[int, Any]]:
    """Rows of a Parquet table as ``(row, {column: value})``; nested columns become lists and dicts."""
    import pyarrow as pa  # imported here: only Parquet sources pay for loading pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    return list(enumerate(table.to_pylist()))


# Python's csv module refuses fields over 128 KiB by default; a long answer is not an error here
# (JSON sources have no such limit), so the limit is raised while a CSV file is parsed.
_CSV_FIELD_LIMIT = 2**31 - 1


def _parse_csv(path: Path, text: str) -> list[tuple[int, CsvRecord]]:
    """Rows of a CSV file with a header line, as ``(first line of the row, CsvRecord)``.

    Blank lines are skipped. Quoting is strict, and a row with more or fewer values than the header
    is an error naming its line: such a row is almost always an unquoted comma, and guessing which
    value went where would train on shifted fields.
    """
    previous_limit = csv.field_size_limit(_CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[int, CsvRecord]] = []
    header: list[str] | None = None
    header_line = start = 1
    try:
        for row in reader:
            if not row:
                start = reader.line_num + 1
                continue
            if header is None:
                header, header_line = row, start
                _check_header(path, header, header_line)
            elif len(row) != len(header):
                raise DataError(
                    f"{path}: line {start} has {len(row)} values but the header (line {header_line}) has "
                    f"{len(header)} columns; expected one value per column (quote values that hold commas)")
            else:
                rows.append((start, CsvRecord(zip(header, row))))
            start = reader.line_num + 1
    except csv.Error as exc:
        row_start = "" if start == reader.line_num else f" (in the row that starts at line {start})"
        raise DataError(f"{path}: invalid CSV at line {reader.line_num}{row_start}: {exc}") from None
    finally:
        csv.field_size_limit(previous_limit)
    return rows


def _check_header(path: Path, header: list[str], line: int) -> None:
    """Refuse a header that names one column twice: which value would a field be?"""
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataError(f"{path}: line {line}: the header names column {name!r} twice; expected distinct names")
        seen.add(name)


def decode_utf8(path: Path, data: bytes) -> str:
    """The text of a file's bytes, UTF-8 with an optional BOM dropped, or DataError naming the line."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(
            f"{path}: starts with a UTF-16 or UTF-32 byte-order mark; expected UTF-8 "
            "(re-save the file as UTF-8)"
        )
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    nul = data.find(b"\x00", bom)
    if nul >= 0:
        line, column = _byte_line_column(data, nul)
        raise DataError(
            f"{path}:{line}: NUL byte at byte {column} of the line; JSON text cannot contain "
            "one (write it as \\u0000 inside a string); expected UTF-8 JSON (is the "
            "file UTF-16 or binary?)"
        )
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = bom + exc.start
        line, column = _byte_line_column(data, offset)
        raise DataError(
            f"{path}:{line}: not valid UTF-8 at byte {column} of the line (byte offset "
            f"{offset}): {exc.reason}; expected UTF-8 text (re-encode the file as UTF-8)"
        ) from None


def _byte_line_column(data: bytes, offset: int) -> tuple[int, int]:
    """1-based line and byte column of ``offset`` in ``data``."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1


def _parse_array(path: str | os.PathLike[str], text: str) -> list[tuple[int, Any]]:
    """Parse a whole-file JSON array into ``(index, item)`` pairs."""
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise _invalid_json(path, exc.lineno, exc) from None
    except (ValueError, RecursionError) as exc:
        raise _array_item_error(path, text, exc) from None
    return list(enumerate(value))


def _invalid_json(path: str | os.PathLike[str], line: int, exc: json.JSONDecodeError) -> DataError:
    """The error of a JSON syntax error at ``line`` of the file (``exc``'s column), as
    ``<path>:<line>:<column>: ...``, the form an editor jumps to."""
    return DataError(f"{path}:{line}:{exc.colno}: invalid JSON: {_explain(exc.msg)}")


def _array_item_error(
    path: str | os.PathLike[str], text: str, exc: ValueError | RecursionError
) -> DataError:
    """Name the array item that made the whole-file parse fail with ``exc``.

    Only the error path pays for this: the array is walked item by item
    with ``raw_decode`` until one fails.
    """
    index, offset = _failing_item(text)
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    where = f"{path}: item {index} (line {line}, column {column})"
    return DataError(f"{where} {_problem(exc)}")


def _failing_item(text: str) -> tuple[int, int]:
    """Index and text offset of the first array item that does not parse."""
    offset = _WHITESPACE_RUN.match(text).end() + 1  # just after "["
    offset = _WHITESPACE_RUN.match(text, offset).end()
    index = 0
    while True:
        start = offset
        try:
            _, offset = _DECODER.raw_decode(text, offset)
        except (ValueError, RecursionError):
            return index, start
        offset = _WHITESPACE_RUN.match(text, offset).end()
        if not text.startswith(",", offset):
            return index, start
        offset = _WHITESPACE_RUN.match(text, offset + 1).end()
        index += 1


def _problem(exc: ValueError | RecursionError) -> str:
    """Describe a parse failure that is not a plain syntax error."""
    if isinstance(exc, RecursionError):
        return (
            "is nested too deeply to parse (Python's JSON parser follows about "
            f"{sys.getrecursionlimit()} levels of arrays and objects); expected an "
            "object whose fields are strings"
        )
    return f"cannot be parsed: {exc}"


def _explain(msg: str) -> str:
    """Add a hint to the ``json`` messages that are hard to act on."""
    if msg.startswith("Invalid control character"):
        return (
            "invalid control character inside a string; expected it escaped "
            "(\\n, \\t, \\u001b, ...)"
        )
    return msg


def _reject_single_document(path: str | os.PathLike[str], text: str, *, json_named: bool) -> None:
    """Raise if the file is one non-array JSON document rather than JSONL.

    A pretty-printed object (``{"data": [...]}`` over several lines) would
    otherwise fail on line 1 with a confusing syntax error, and a ``.json``
    file holding one object is almost certainly the wrong file rather than a
    one-record dataset. A single-line object in any other file is a valid
    one-record JSONL file and is left alone.
    """
    try:
        value = _DECODER.decode(text)
    except (ValueError, RecursionError):
        return  # JSONL, or broken: the line-by-line parse names the line
    spans_lines = "\n" in text.strip(_JSON_WHITESPACE)
    if spans_lines or json_named:
        raise DataError(
            f"{path}: top-level JSON value is {_describe(value)}; {_EXPECTED_SHAPE}"
        )


def jsonl_values(path: str | os.PathLike[str], text: str) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of JSONL ``text`` read from ``path``, parsed
    one at a time: the one JSONL line parser of the package. A line that does not parse raises
    :class:`DataError` naming the file, the line and the column; an object that repeats a key is a
    :class:`DuplicateKeysObject`.

    Lines are split on ``\\n`` only: ``str.splitlines`` would also split on
    U+2028 and friends, which JSON allows unescaped inside strings.
    """
    for line_number, line in nonblank_lines(text):
        try:
            value = _DECODER.decode(line)
        except json.JSONDecodeError as exc:
            raise _invalid_json(path, line_number, exc) from None
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{path}:{line_number}: the line {_problem(exc)}") from None
        yield line_number, value


_NOT_JSON_WHITESPACE = re.compile(r"[^ \t\r\n]")


def nonblank_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of the lines of ``text`` (split on ``\\n``) that are not blank, one at
    a time: a list of every line would cost a pointer per line, gigabytes for a file of blank
    lines, and blank runs are skipped by a search rather than line by line."""
    start, number = 0, 1
    while (found := _NOT_JSON_WHITESPACE.search(text, start)) is not None:
        line_start = max(start, text.rfind("\n", start, found.start()) + 1)
        number += text.count("\n", start, line_start)
        end = text.find("\n", found.start())
        end = len(text) if end < 0 else end
        yield number, text[line_start:end]
        start, number = end + 1, number + 1


def describe_json_type(value: Any) -> str:
    """Name a parsed JSON value's type the way JSON does, for messages."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null"


_describe = describe_json_type
