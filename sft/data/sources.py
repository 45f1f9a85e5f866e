"""Read Alpaca-format source files (a JSON array of objects, or JSONL).

The format is detected from the content, not the file name, because Alpaca
dumps circulate under both ``.json`` and ``.jsonl`` names in either format:
if the first non-whitespace character is ``[`` the file is a JSON array,
otherwise it is JSONL (one JSON value per line, blank lines skipped).

Everything that makes a whole file unusable (missing, a directory,
unreadable, not UTF-8, not JSON, wrong top-level shape, nested too deeply to
parse) raises :class:`DataError`, whose message names the file and, where
there is one, the line (and column); nothing escapes as a bare
``RecursionError`` or ``UnicodeDecodeError``. Single items that are not
objects are *not* fatal here: they are yielded like any other item so that
the caller can count and report them as rejects.

Decisions for input that JSON allows but that is almost always a mistake:

* **Duplicate keys** (``{"output": "a", "output": "b"}``): RFC 8259 leaves
  the meaning open and Python's ``json`` silently keeps the last value. Here
  the object is still built last-wins, but it is yielded as a
  :class:`DuplicateKeysObject` (a ``dict`` subclass) whose ``duplicate_keys``
  names the repeated keys, so that the caller can reject it;
  :func:`sft.data.prepare.normalize_record` rejects a record that repeats
  ``instruction``, ``input`` or ``output`` (reason ``<field>_duplicate_key``)
  and ignores a repeated extra field like any extra field.
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
"""

from __future__ import annotations

import codecs
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Whitespace as JSON defines it; ``str.strip()`` would also accept characters
# such as U+00A0 that ``json.loads`` rejects, hiding a broken line.
_JSON_WHITESPACE = " \t\r\n"
_WHITESPACE_RUN = re.compile(r"[ \t\r\n]*")

_OBTAIN_HINT = (
    "Put the Alpaca data there (alpaca_data.json from the Stanford Alpaca "
    "repository, cleaned_data.json from alpaca-cleaned), pass --source PATH, "
    "or try the demo set: `sft fetch-demo-data` writes data/raw/alpaca_eval_demo.json "
    "(then --source data/raw/alpaca_eval_demo.json)."
)

_EXPECTED_SHAPE = "expected an array of objects, or JSONL with one object per line"


class DataError(ValueError):
    """A source or the data as a whole cannot be used; the message says why."""


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


def iter_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """Yield ``(position, item)`` for every item in the source at ``path``.

    ``position`` is the 1-based line number for JSONL files (so it matches
    what an editor shows) and the 0-based array index for JSON arrays (so it
    matches ``data[position]``). Items are yielded as parsed, whatever their
    type.

    The whole file is read and parsed before the first item is yielded, so
    a syntax error anywhere raises :class:`DataError` before any item is
    seen.
    """
    text = _read_text(Path(path))
    if text.lstrip(_JSON_WHITESPACE).startswith("["):
        items = _parse_array(path, text)
    else:
        _reject_single_document(path, text)
        items = _parse_jsonl(path, text)
    yield from items


def _read_text(path: Path) -> str:
    """Return the file's text, decoded as UTF-8 with an optional BOM."""
    if not path.exists():
        if path.is_symlink():
            raise DataError(
                f"{path} is a symbolic link to a missing file (or a link loop); "
                "expected a JSON or JSONL file"
            )
        raise DataError(f"{path} not found. {_OBTAIN_HINT}")
    if path.is_dir():
        raise DataError(f"{path} is a directory; expected a JSON or JSONL file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return _decode(path, data)


def _decode(path: Path, data: bytes) -> str:
    """Decode UTF-8 (an optional BOM dropped), or raise naming the line."""
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
            f"{path}: NUL byte at line {line}, byte {column}; JSON text cannot contain "
            "one (write it as \\u0000 inside a string); expected UTF-8 JSON (is the "
            "file UTF-16 or binary?)"
        )
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = bom + exc.start
        line, column = _byte_line_column(data, offset)
        raise DataError(
            f"{path}: not valid UTF-8 at line {line}, byte {column} (byte offset "
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
        raise DataError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: "
            f"{_explain(exc.msg)}"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise _array_item_error(path, text, exc) from None
    return list(enumerate(value))


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


def _reject_single_document(path: str | os.PathLike[str], text: str) -> None:
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
    if spans_lines or Path(path).suffix.lower() == ".json":
        raise DataError(
            f"{path}: top-level JSON value is {_describe(value)}; {_EXPECTED_SHAPE}"
        )


def _parse_jsonl(path: str | os.PathLike[str], text: str) -> list[tuple[int, Any]]:
    """Parse JSONL into ``(line_number, item)`` pairs, skipping blank lines.

    Lines are split on ``\\n`` only: ``str.splitlines`` would also split on
    U+2028 and friends, which JSON allows unescaped inside strings.
    """
    items = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip(_JSON_WHITESPACE):
            continue
        try:
            items.append((line_number, _DECODER.decode(line)))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: invalid JSON at line {line_number}, column {exc.colno}: "
                f"{_explain(exc.msg)}"
            ) from None
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{path}: line {line_number} {_problem(exc)}") from None
    return items


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
