"""Read Alpaca-format source files (a JSON array of objects, or JSONL).

The format is detected from the content, not the file name, because Alpaca
dumps circulate under both ``.json`` and ``.jsonl`` names in either format:
if the first non-whitespace character is ``[`` the file is a JSON array,
otherwise it is JSONL (one JSON value per line, blank lines skipped).

Everything that makes a whole file unusable (missing, unreadable, not JSON,
wrong top-level shape) raises :class:`DataError`, whose message names the
file and, for syntax errors, the line and column. Single items that are not
objects are *not* fatal here: they are yielded like any other item so that
the caller can count and report them as rejects.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Whitespace as JSON defines it; ``str.strip()`` would also accept characters
# such as U+00A0 that ``json.loads`` rejects, hiding a broken line.
_JSON_WHITESPACE = " \t\r\n"

_OBTAIN_HINT = (
    "Put the Alpaca data there (alpaca_data.json from the Stanford Alpaca "
    "repository, cleaned_data.json from alpaca-cleaned), pass --source PATH, "
    "or run `make demo-data` to fetch the bundled demo set."
)


class DataError(ValueError):
    """A source or the data as a whole cannot be used; the message says why."""


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
        raise DataError(f"{path} not found. {_OBTAIN_HINT}")
    if path.is_dir():
        raise DataError(f"{path} is a directory; expected a JSON or JSONL file")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not valid UTF-8 (byte offset {exc.start}): {exc.reason}"
        ) from exc


def _parse_array(path: str | os.PathLike[str], text: str) -> list[tuple[int, Any]]:
    """Parse a whole-file JSON array into ``(index, item)`` pairs."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    return list(enumerate(value))


def _reject_single_document(path: str | os.PathLike[str], text: str) -> None:
    """Raise if the file is one non-array JSON document rather than JSONL.

    A pretty-printed object (``{"data": [...]}`` over several lines) would
    otherwise fail on line 1 with a confusing syntax error, and a ``.json``
    file holding one object is almost certainly the wrong file rather than a
    one-record dataset. A single-line object in any other file is a valid
    one-record JSONL file and is left alone.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return
    spans_lines = "\n" in text.strip(_JSON_WHITESPACE)
    if spans_lines or Path(path).suffix.lower() == ".json":
        raise DataError(
            f"{path}: top-level JSON value is {_describe(value)}; expected an "
            "array of objects, or JSONL with one object per line"
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
            items.append((line_number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: invalid JSON at line {line_number}, column {exc.colno}: "
                f"{exc.msg}"
            ) from exc
    return items


def _describe(value: Any) -> str:
    """Name a parsed JSON value's type the way JSON does, for messages."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null"
