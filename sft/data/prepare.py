"""Merge Alpaca-format sources into deterministic train/val JSONL files.

Pipeline: read each source in the order given, normalize every record,
de-duplicate on the normalized ``(instruction, input)`` with the *later*
record winning (a cleaned set listed after the original corrects it), assign
each kept record a content-derived id, split by hashing that id, and write
``sft_train.jsonl``, ``sft_val.jsonl``, ``rejects.jsonl`` and
``prepare_report.json``.

Every step is a pure function of the input bytes, the seed and the val
fraction, so running twice gives byte-identical files, and a record's split
never changes when other records are added or removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sft.data.sources import DataError, iter_records

DEFAULT_SOURCES = ("data/raw/alpaca_data.json", "data/raw/cleaned_data.json")
DEFAULT_OUT_DIR = "data/processed"
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SEED = 42

TRAIN_FILE = "sft_train.jsonl"
VAL_FILE = "sft_val.jsonl"
REJECTS_FILE = "rejects.jsonl"
REPORT_FILE = "prepare_report.json"

DUPLICATE_REPLACED = "duplicate_replaced"

# Separates instruction from input in the id hash; it cannot be confused with
# ordinary text, so ("ab", "c") and ("a", "bc") get different ids.
_KEY_SEPARATOR = "\x1f"


class RecordRejected(Exception):
    """A record cannot be used; ``reason`` is the short code that is reported."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Example:
    """A normalized record that survived validation, with where it came from."""

    instruction: str
    input: str
    output: str
    source: str
    source_index: int
    position: int
    raw: Any

    @property
    def key(self) -> tuple[str, str]:
        """The de-duplication key: two records with equal keys are one example."""
        return (self.instruction, self.input)

    @property
    def id(self) -> str:
        """The content id: it depends only on the de-duplication key."""
        return record_id(self.instruction, self.input)


@dataclass
class SourceCounts:
    """Per-source bookkeeping; ``read == kept + sum(rejected) + replaced``."""

    path: str
    read: int = 0
    kept: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    replaced: int = 0

    def as_dict(self, *, with_path: bool = True) -> dict[str, Any]:
        """Render for the report, with reasons sorted so the JSON is stable."""
        data: dict[str, Any] = {"path": self.path} if with_path else {}
        data.update(
            read=self.read,
            kept=self.kept,
            rejected=dict(sorted(self.rejected.items())),
            replaced=self.replaced,
        )
        return data

    def check_balance(self) -> None:
        """Fail loudly if a record was lost or double-counted."""
        accounted = self.kept + sum(self.rejected.values()) + self.replaced
        assert self.read == accounted, (
            f"{self.path}: read {self.read} != kept + rejected + replaced ({accounted})"
        )


def normalize_text(text: str) -> str:
    """Return ``text`` in NFC with ``\\n`` line endings and no outer whitespace.

    NFC makes visually identical strings compare equal, so duplicates that
    differ only in how an accent was encoded are caught; line endings are
    unified so Windows-edited records dedupe against the rest. Inner
    whitespace is kept because it can be meaningful (code, poems, lists).
    The function is idempotent.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text).strip()


def record_id(instruction: str, input_text: str) -> str:
    """Return the 16-hex-char id of a normalized ``(instruction, input)`` pair."""
    key = f"{instruction}{_KEY_SEPARATOR}{input_text}".encode("utf-8")
    return hashlib.sha256(key).hexdigest()[:16]


def is_val(rid: str, seed: int, val_fraction: float) -> bool:
    """Decide a record's split from its id and the seed alone.

    Hashing instead of shuffling means the decision for one record never
    depends on the other records, so adding data never moves a record
    between train and val (which would leak val examples into training).
    """
    digest = hashlib.sha256(f"{seed}:{rid}".encode("utf-8")).hexdigest()
    return int(digest[:16], 16) / 2**64 < val_fraction


def normalize_record(item: Any) -> tuple[str, str, str]:
    """Validate and normalize one raw item into ``(instruction, input, output)``.

    Fields are checked in the order instruction, input, output, and the first
    problem found is the reason given. Extra fields are ignored. Raises
    :class:`RecordRejected` with one of: ``not_an_object``,
    ``<field>_duplicate_key`` (the object repeats the field's key, see
    :class:`sft.data.sources.DuplicateKeysObject`), ``missing_<field>``,
    ``<field>_not_string`` (also for a number, boolean, array, object, null,
    NaN or Infinity), ``<field>_invalid_unicode`` (a lone surrogate such as
    ``"\\ud800"``, which cannot be written as UTF-8) or ``empty_instruction``
    / ``empty_output`` (empty or whitespace only). A missing or null
    ``input`` means no input; a null instruction or output is
    ``<field>_not_string``. Control characters other than ``\\r`` are kept
    as they are, and there is no length limit: a 10 MB instruction is kept
    (training truncates, or drops a record left with no answer tokens).
    """
    if not isinstance(item, dict):
        raise RecordRejected("not_an_object")
    instruction = _required_text(item, "instruction")
    input_text = _optional_text(item, "input")
    output = _required_text(item, "output")
    return instruction, input_text, output


def _required_text(item: dict[str, Any], name: str) -> str:
    """Return the normalized, non-empty string field ``name``."""
    _check_unique(item, name)
    if name not in item:
        raise RecordRejected(f"missing_{name}")
    text = _normalized_string(item[name], name)
    if not text:
        raise RecordRejected(f"empty_{name}")
    return text


def _optional_text(item: dict[str, Any], name: str) -> str:
    """Return the normalized string field ``name``, or "" if absent or null."""
    _check_unique(item, name)
    value = item.get(name)
    return "" if value is None else _normalized_string(value, name)


def _check_unique(item: dict[str, Any], name: str) -> None:
    """Reject an object that gives field ``name`` more than once."""
    if name in getattr(item, "duplicate_keys", ()):
        raise RecordRejected(f"{name}_duplicate_key")


def _normalized_string(value: Any, name: str) -> str:
    """Normalize ``value`` if it is a string that can be encoded as UTF-8."""
    if not isinstance(value, str):
        raise RecordRejected(f"{name}_not_string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RecordRejected(f"{name}_invalid_unicode") from None
    return normalize_text(value)


@dataclass
class _Merge:
    """State of the merge across sources: winners, rejects and counts."""

    kept: dict[tuple[str, str], Example] = field(default_factory=dict)
    rejects: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)
    counts: list[SourceCounts] = field(default_factory=list)

    def add_source(self, path: str, items: Iterable[tuple[int, Any]]) -> None:
        """Merge every item of one source, in order, into the state."""
        index = len(self.counts)
        counts = SourceCounts(path)
        self.counts.append(counts)
        for position, item in items:
            counts.read += 1
            try:
                fields = normalize_record(item)
            except RecordRejected as exc:
                counts.rejected[exc.reason] += 1
                self._reject(index, path, position, exc.reason, item)
                continue
            self._keep(Example(*fields, path, index, position, raw=item))

    def _keep(self, example: Example) -> None:
        """Keep ``example``; an earlier record with the same key is replaced."""
        earlier = self.kept.pop(example.key, None)
        if earlier is not None:
            self.counts[earlier.source_index].replaced += 1
            self._reject(
                earlier.source_index,
                earlier.source,
                earlier.position,
                DUPLICATE_REPLACED,
                earlier.raw,
                replaced_by={"source": example.source, "position": example.position},
            )
        self.kept[example.key] = example

    def _reject(
        self, index: int, path: str, position: int, reason: str, item: Any, **extra: Any
    ) -> None:
        """Record a dropped item for ``rejects.jsonl``."""
        entry = {"source": path, "position": position, "reason": reason, "record": item}
        self.rejects.append((index, position, entry | extra))

    def finish(self) -> list[Example]:
        """Tally kept counts and return the kept examples sorted by id."""
        for example in self.kept.values():
            self.counts[example.source_index].kept += 1
        for counts in self.counts:
            counts.check_balance()
        return sorted(self.kept.values(), key=lambda e: (e.id, e.key))

    def sorted_rejects(self) -> list[dict[str, Any]]:
        """Rejects in source order, then by position within the source."""
        return [entry for _, _, entry in sorted(self.rejects, key=lambda r: r[:2])]


def prepare(
    sources: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Merge ``sources`` into train/val files under ``out_dir``; return the report.

    Raises :class:`DataError` for unusable input (missing or malformed
    source, a source listed twice, no usable record at all) before anything
    is written, and :class:`ValueError` if ``val_fraction`` is not strictly
    between 0 and 1.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    paths = [os.fspath(source) for source in sources]
    _check_distinct(paths)
    merge = _Merge()
    for path in paths:
        items = list(iter_records(path))
        merge.add_source(path, tqdm(items, desc=path, unit="rec", disable=None))
    examples = merge.finish()
    if not examples:
        raise DataError(_no_usable_records(merge.counts))
    train, val = _split(examples, seed, val_fraction)
    report = _build_report(merge.counts, len(train), len(val), val_fraction, seed)
    _write_outputs(Path(out_dir), train, val, merge.sorted_rejects(), report)
    return report


def _no_usable_records(counts: list[SourceCounts]) -> str:
    """Explain, per source, why nothing could be kept (no rejects file is written)."""
    parts = []
    for source in counts:
        if source.read == 0:
            parts.append(f"{source.path} (no records: empty file or empty array)")
        else:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(source.rejected.items()))
            parts.append(f"{source.path} ({source.read} read, all rejected: {reasons})")
    return (
        "no usable records in " + "; ".join(parts) + ". Expected objects with non-empty "
        'string "instruction" and "output" fields (and an optional string "input")'
    )


def _split(
    examples: list[Example], seed: int, val_fraction: float
) -> tuple[list[Example], list[Example]]:
    """Partition examples into (train, val), preserving their order."""
    train: list[Example] = []
    val: list[Example] = []
    for example in examples:
        (val if is_val(example.id, seed, val_fraction) else train).append(example)
    return train, val


def _check_distinct(paths: list[str]) -> None:
    """Refuse a source listed twice: it would silently replace itself."""
    seen: dict[Path, str] = {}
    for path in paths:
        try:
            resolved = Path(path).resolve()
        except (OSError, RuntimeError):  # a symlink loop; reading it reports it
            resolved = Path(os.path.abspath(path))
        if resolved in seen:
            raise DataError(f"source {path} is given more than once (as {seen[resolved]})")
        seen[resolved] = path


def _build_report(
    counts: list[SourceCounts], train: int, val: int, val_fraction: float, seed: int
) -> dict[str, Any]:
    """Assemble the report, including totals summed over sources."""
    total = SourceCounts("total")
    for source in counts:
        total.read += source.read
        total.kept += source.kept
        total.rejected.update(source.rejected)
        total.replaced += source.replaced
    total.check_balance()
    return {
        "sources": [source.as_dict() for source in counts],
        "total": total.as_dict(with_path=False),
        "train": train,
        "val": val,
        "val_fraction": val_fraction,
        "seed": seed,
    }


def _example_json(example: Example) -> dict[str, str]:
    """The output record; key order is part of the file format."""
    return {
        "id": example.id,
        "instruction": example.instruction,
        "input": example.input,
        "output": example.output,
        "source": example.source,
    }


def _json_line(obj: Any) -> str:
    """Serialize one JSONL line as strict JSON, readable UTF-8 where possible.

    Rejected raw records may hold lone surrogates (and paths undecodable
    bytes), which UTF-8 cannot encode; those lines fall back to ASCII escapes
    so the file stays valid. They may also hold NaN or Infinity, which
    strict JSON cannot express, or nesting too deep to serialize: see
    :func:`_strict_json_value`.
    """
    return _json_text(obj) + "\n"


def _json_text(obj: Any, indent: int | None = None) -> str:
    """``json.dumps`` that always produces strict JSON encodable as UTF-8."""
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=indent)
    except (ValueError, RecursionError):
        obj = _strict_json_value(obj)
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=indent)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, allow_nan=False, indent=indent)
    return text


# Rejected records are written only for people to read; anything nested
# deeper than this is replaced by a marker rather than risking recursion.
_MAX_WRITTEN_DEPTH = 100
_TOO_DEEP = "<nested too deeply to write>"


def _strict_json_value(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` that strict JSON can express.

    Non-finite floats become the strings ``"NaN"``, ``"Infinity"`` and
    ``"-Infinity"``; containers nested more than ``_MAX_WRITTEN_DEPTH`` deep
    become the string ``"<nested too deeply to write>"``.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, (dict, list)):
        if depth >= _MAX_WRITTEN_DEPTH:
            return _TOO_DEEP
        if isinstance(value, dict):
            return {k: _strict_json_value(v, depth + 1) for k, v in value.items()}
        return [_strict_json_value(v, depth + 1) for v in value]
    return value


def _write_outputs(
    out_dir: Path,
    train: list[Example],
    val: list[Example],
    rejects: list[dict[str, Any]],
    report: dict[str, Any],
) -> None:
    """Write all four output files, each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / TRAIN_FILE, (_json_line(_example_json(e)) for e in train))
    _write_atomic(out_dir / VAL_FILE, (_json_line(_example_json(e)) for e in val))
    _write_atomic(out_dir / REJECTS_FILE, (_json_line(r) for r in rejects))
    report_text = _json_text(report, indent=2) + "\n"
    _write_atomic(out_dir / REPORT_FILE, [report_text])


def _write_atomic(path: Path, chunks: Iterable[str]) -> None:
    """Write via a temp file in the same directory and ``os.replace`` it.

    An interrupted run then leaves either the old file or the new one,
    never a truncated file that a training run could silently consume. The
    temp name is per process and opened normally (not ``mkstemp``) so the
    result gets the usual umask-based permissions rather than 0600.
    """
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp_path, "w", encoding="utf-8", newline="\n") as handle:
            handle.writelines(chunks)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _fraction(text: str) -> float:
    """Parse ``--val-fraction``: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"must be strictly between 0 and 1 (exclusive), got {text}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser for ``prepare_sft_data.py``."""
    parser = argparse.ArgumentParser(
        prog="prepare_sft_data.py",
        allow_abbrev=False,
        description=(
            "Merge Alpaca-format sources (JSON array or JSONL with instruction/"
            "input/output fields), normalize and de-duplicate them, and write a "
            "deterministic train/val split as JSONL, plus rejects.jsonl and "
            "prepare_report.json."
        ),
        epilog=(
            "Duplicates are matched on normalized (instruction, input); a record "
            "in a later source replaces an earlier one, so list the cleaned set "
            "last. Outputs are byte-identical across runs with the same inputs."
        ),
    )
    parser.add_argument(
        "--source",
        action="append",
        metavar="PATH",
        help=(
            "source file, JSON array or JSONL; repeat for several, in priority "
            "order (later wins on duplicates). Default: "
            + " then ".join(DEFAULT_SOURCES)
        ),
    )
    parser.add_argument(
        "--out-dir",
        default=DEFAULT_OUT_DIR,
        metavar="DIR",
        help=f"directory for the output files, created if needed (default: {DEFAULT_OUT_DIR})",
    )
    parser.add_argument(
        "--val-fraction",
        type=_fraction,
        default=DEFAULT_VAL_FRACTION,
        metavar="F",
        help=(
            "expected fraction of records in the validation split, strictly "
            f"between 0 and 1 (default: {DEFAULT_VAL_FRACTION})"
        ),
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        metavar="N",
        help=f"seed for the hash-based split (default: {DEFAULT_SEED})",
    )
    return parser


def format_summary(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[str]:
    """Render the report as short human-readable lines, warnings included."""
    lines = [_counts_line(s["path"], s) for s in report["sources"]]
    lines.append(_counts_line("total", report["total"]))
    lines.append(
        f"split: train {report['train']}, val {report['val']} "
        f"(val fraction {report['val_fraction']}, seed {report['seed']})"
    )
    for source in report["sources"]:
        if source["read"] == 0:
            lines.append(f"warning: {source['path']} holds no records (empty file or empty array)")
    kept = report["total"]["kept"]
    for name in ("train", "val"):
        if report[name] == 0 and kept >= 2:
            lines.append(
                f"warning: the {name} split is empty; with {kept} records, try "
                "another --val-fraction or --seed"
            )
    for name in (TRAIN_FILE, VAL_FILE, REJECTS_FILE, REPORT_FILE):
        lines.append(f"wrote {Path(out_dir) / name}")
    return lines


def _counts_line(label: str, counts: dict[str, Any]) -> str:
    """One line of read/kept/rejected/replaced counts, reasons in brackets."""
    rejected = counts["rejected"]
    reasons = ", ".join(f"{reason} {n}" for reason, n in rejected.items())
    detail = f" ({reasons})" if reasons else ""
    return (
        f"{label}: read {counts['read']}, kept {counts['kept']}, "
        f"rejected {sum(rejected.values())}{detail}, replaced {counts['replaced']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return 0 on success and 2 on a user error."""
    args = build_parser().parse_args(argv)
    sources = args.source or list(DEFAULT_SOURCES)
    try:
        report = prepare(sources, args.out_dir, args.val_fraction, args.seed)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write to {args.out_dir}: {exc}", file=sys.stderr)
        return 2
    _print_safely("\n".join(format_summary(report, args.out_dir)))
    return 0


def _print_safely(text: str) -> None:
    """Print ``text``, escaping what stdout cannot encode (odd file names)."""
    try:
        print(text)
    except UnicodeEncodeError:
        encoding = getattr(sys.stdout, "encoding", None) or "ascii"
        print(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))
