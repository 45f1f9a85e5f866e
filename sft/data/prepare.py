"""Merge raw sources into deterministic train/val JSONL files, for SFT or for DPO.

Pipeline: read each source in the order given, find its shape (:mod:`sft.data.formats`), convert
and normalize every record, de-duplicate on the record's key (a conversation's non-assistant turns,
a preference pair's prompt) with the *later* record winning (a cleaned set listed after the
original corrects it), split by hashing each kept record's content id, and write the train and
validation files, ``rejects.jsonl`` and ``prepare_report.json``. Nothing here knows a shape: SFT
and DPO differ only in their :class:`Method` (which shapes, which file names).

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
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sft.data.formats import (
    AUTO,
    CONVERSATION,
    PREFERENCE,
    Prepared,
    RecordRejected,
    Shape,
    choose_shape,
    format_choices,
    shapes,
)
from sft.data.sources import read_source
from sft.errors import ConfigError, DataError, run_command
from sft.files import atomic_files
from sft.outputs import check_outputs, writing_into

DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SEED = 42

REJECTS_FILE = "rejects.jsonl"
REPORT_FILE = "prepare_report.json"

DUPLICATE_REPLACED = "duplicate_replaced"


@dataclass(frozen=True)
class Method:
    """What one training method prepares: which kind of record, and where it goes by default."""

    kind: str
    prog: str
    train_file: str
    val_file: str
    default_sources: tuple[str, ...]
    default_out_dir: str
    summary: str


SFT = Method(CONVERSATION, "prepare_sft_data.py", "sft_train.jsonl", "sft_val.jsonl",
             ("data/raw/alpaca_data.json", "data/raw/cleaned_data.json"), "data/processed",
             "Merge conversation sources (Alpaca, ShareGPT, OpenAI messages or prompt/completion records in JSON, "
             "JSONL, CSV or Parquet files), normalize and de-duplicate them, and write a deterministic train/val "
             "split of conversations as JSONL, plus rejects.jsonl and prepare_report.json. Duplicates are "
             "conversations with the same non-assistant turns.")
DPO = Method(PREFERENCE, "prepare_dpo_data.py", "dpo_train.jsonl", "dpo_val.jsonl",
             ("data/raw/dpo_en_demo.json",), "data/processed_dpo",
             "Merge preference sources (prompt/chosen/rejected as text, as TRL's conversational message lists, or "
             "as LLaMA-Factory's ShareGPT layout; or KTO's unpaired prompt/completion/label examples, as text or "
             "message lists; in JSON, JSONL, CSV or Parquet files), normalize and de-duplicate them, and write a "
             "deterministic train/val split of pairs (or of unpaired examples) as JSONL, plus rejects.jsonl and "
             "prepare_report.json. Duplicates are pairs with the same prompt (every turn before the answers), "
             "unpaired examples with the same prompt and completion.")

TRAIN_FILE = SFT.train_file
VAL_FILE = SFT.val_file


@dataclass(frozen=True)
class Example:
    """A converted record that survived validation, with where it came from."""

    prepared: Prepared
    source: str
    source_index: int
    position: int
    raw: Any


@dataclass
class SourceCounts:
    """Per-source bookkeeping; ``read == kept + sum(rejected) + replaced``."""

    path: str
    format: str | None = None
    read: int = 0
    kept: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    replaced: int = 0

    def as_dict(self, *, with_source: bool = True) -> dict[str, Any]:
        """Render for the report, with reasons sorted so the JSON is stable."""
        data: dict[str, Any] = {"path": self.path, "format": self.format} if with_source else {}
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


def is_val(rid: str, seed: int, val_fraction: float) -> bool:
    """Decide a record's split from its id and the seed alone.

    Hashing instead of shuffling means the decision for one record never
    depends on the other records, so adding data never moves a record
    between train and val (which would leak val examples into training).
    """
    digest = hashlib.sha256(f"{seed}:{rid}".encode()).hexdigest()
    return int(digest[:16], 16) / 2**64 < val_fraction


@dataclass
class _Merge:
    """State of the merge across sources: winners, rejects and counts."""

    kept: dict[Any, Example] = field(default_factory=dict)
    rejects: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)
    counts: list[SourceCounts] = field(default_factory=list)

    def add_source(self, path: str, shape: Shape | None, items: Iterable[tuple[int, Any]]) -> None:
        """Merge every item of one source, converted as ``shape``, in order, into the state."""
        index = len(self.counts)
        counts = SourceCounts(path, None if shape is None else shape.name)
        self.counts.append(counts)
        for position, item in items:
            counts.read += 1
            assert shape is not None  # a source with an item always has a shape
            try:
                prepared = shape.convert(item)
            except RecordRejected as exc:
                counts.rejected[exc.reason] += 1
                detail = {} if exc.detail is None else {"detail": exc.detail}
                self._reject(index, path, position, exc.reason, item, **detail)
                continue
            self._keep(Example(prepared, path, index, position, raw=item))

    def _keep(self, example: Example) -> None:
        """Keep ``example``; an earlier record with the same key is replaced."""
        earlier = self.kept.pop(example.prepared.key, None)
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
        self.kept[example.prepared.key] = example

    def _reject(self, index: int, path: str, position: int, reason: str, item: Any, **extra: Any) -> None:
        """Record a dropped item for ``rejects.jsonl``; ``extra`` goes between reason and record."""
        entry = {"source": path, "position": position, "reason": reason, **extra, "record": item}
        self.rejects.append((index, position, entry))

    def finish(self) -> list[Example]:
        """Tally kept counts and return the kept examples sorted by id."""
        for example in self.kept.values():
            self.counts[example.source_index].kept += 1
        for counts in self.counts:
            counts.check_balance()
        return sorted(self.kept.values(), key=lambda e: (e.prepared.id, e.prepared.key))

    def sorted_rejects(self) -> list[dict[str, Any]]:
        """Rejects in source order, then by position within the source."""
        return [entry for _, _, entry in sorted(self.rejects, key=lambda r: r[:2])]


def prepare(
    sources: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    format_name: str = AUTO,
    method: Method = SFT,
    force: bool = False,
) -> dict[str, Any]:
    """Merge ``sources`` into train/val files under ``out_dir``; return the report.

    An output is never an input, never anything but a regular file, and never a file this tool
    did not write there unless ``force`` (:func:`sft.outputs.check_output`): checked before the
    sources are read, and again under ``out_dir``'s writer lock when the set is written.

    ``format_name`` is a shape of ``method``'s kind, or ``auto`` to detect each source's shape.
    Raises :class:`DataError` for unusable input (missing or malformed
    source, a source listed twice, a source of mixed or unknown shape, no
    usable record at all) before anything is written, and :class:`ConfigError`
    if ``val_fraction`` is not strictly between 0 and 1, ``format_name``
    is not a shape of that kind, or ``out_dir`` is empty (which would mean the
    current directory, never what was meant).
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    if format_name not in format_choices(method.kind):
        raise ConfigError(f"format must be one of {', '.join(format_choices(method.kind))}, got {format_name!r}")
    if not os.fspath(out_dir).strip():
        raise ConfigError(f"--out-dir is empty; name the directory for the output files (default: "
                          f"{method.default_out_dir})")
    paths = [os.fspath(source) for source in sources]
    _check_distinct(paths)
    outputs = _output_names(method)
    check_outputs([Path(out_dir) / name for name in outputs], paths, force, "--out-dir")
    merge = _Merge()
    layouts: dict[bool, str] = {}
    for path in paths:
        source = read_source(path)
        shape = choose_shape(source, method.kind, format_name)
        if shape is not None:
            _check_one_layout(layouts, path, shape)
        # The name as text: a file name need not be UTF-8, but the records' "source" field must be.
        name = os.fsencode(path).decode("utf-8", "backslashreplace")
        merge.add_source(name, shape, tqdm(source.items, desc=name, unit="rec", disable=None))
    examples = merge.finish()
    if not examples:
        raise DataError(_no_usable_records(merge.counts, method.kind))
    train, val = _split(examples, seed, val_fraction)
    report = _build_report(merge.counts, len(train), len(val), val_fraction, seed)
    with writing_into(out_dir, outputs, paths, force, "--out-dir"):
        _write_outputs(Path(out_dir), method, train, val, merge.sorted_rejects(), report)
    return report


def _check_one_layout(layouts: dict[bool, str], path: str, shape: Shape) -> None:
    """Refuse preference pairs and unpaired examples in one set (``layouts``: the first source of
    each seen so far): a prepared file holds one or the other."""
    layouts.setdefault(shape.unpaired, path)
    if len(layouts) > 1:
        raise DataError(f"{layouts[True]} holds unpaired examples (prompt, completion, label) but {layouts[False]} "
                        f"holds preference pairs; prepare each into its own --out-dir (KTO trains on a file of "
                        f"either: a pair is split into a desirable and an undesirable example)")


def _output_names(method: Method) -> tuple[str, ...]:
    return method.train_file, method.val_file, REJECTS_FILE, REPORT_FILE


def _no_usable_records(counts: list[SourceCounts], kind: str) -> str:
    """Explain, per source, why nothing could be kept (no rejects file is written)."""
    parts = []
    for source in counts:
        if source.read == 0:
            parts.append(f"{source.path} (no records: empty file or empty array)")
        else:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(source.rejected.items()))
            expects = shapes(kind)[source.format].expects  # a source with records has a shape
            parts.append(f"{source.path} ({source.read} read, all rejected: {reasons}; "
                         f"{source.format} records need {expects})")
    return "no usable records in " + "; ".join(parts)


def _split(examples: list[Example], seed: int, val_fraction: float) -> tuple[list[Example], list[Example]]:
    """Partition examples into (train, val), preserving their order."""
    train: list[Example] = []
    val: list[Example] = []
    for example in examples:
        (val if is_val(example.prepared.id, seed, val_fraction) else train).append(example)
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
        "total": total.as_dict(with_source=False),
        "train": train,
        "val": val,
        "val_fraction": val_fraction,
        "seed": seed,
    }


def _example_json(example: Example) -> dict[str, Any]:
    """The output record; key order is part of the file format."""
    return {"id": example.prepared.id, "source": example.source, **example.prepared.fields}


def _json_line(obj: Any) -> str:
    """Serialize one JSONL line as strict JSON, readable UTF-8 where possible.

    Rejected raw records may hold lone surrogates (and paths undecodable
    bytes), which UTF-8 cannot encode; those lines fall back to ASCII escapes
    so the file stays valid. They may also hold NaN or Infinity, which
    strict JSON cannot express, or nesting too deep to serialize: see
    :func:`_strict_json_value`. Values that JSON has no type for (a
    Parquet source's bytes, dates or decimals) are written as their ``str``.
    """
    return _json_text(obj) + "\n"


def _json_text(obj: Any, indent: int | None = None) -> str:
    """``json.dumps`` that always produces strict JSON encodable as UTF-8."""
    options: dict[str, Any] = {"allow_nan": False, "indent": indent, "default": str}
    try:
        text = json.dumps(obj, ensure_ascii=False, **options)
    except (ValueError, RecursionError):
        obj = _strict_json_value(obj)
        text = json.dumps(obj, ensure_ascii=False, **options)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, **options)
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
    method: Method,
    train: list[Example],
    val: list[Example],
    rejects: list[dict[str, Any]],
    report: dict[str, Any],
) -> None:
    """Write the four output files as one set (:func:`sft.files.atomic_files`).

    A failure part-way (a full disk, a kill) leaves the previous set as it was: never a new
    training file beside an old validation file and a report naming other sources, which the
    next training run would read without a word.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_files([out_dir / name for name in _output_names(method)]) as (train_file, val_file, rejects_file, report_file):
        train_file.writelines(_json_line(_example_json(e)) for e in train)
        val_file.writelines(_json_line(_example_json(e)) for e in val)
        rejects_file.writelines(_json_line(r) for r in rejects)
        report_file.write(_json_text(report, indent=2) + "\n")


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




def build_parser(method: Method = SFT) -> argparse.ArgumentParser:
    """Return the command-line parser of ``method``'s prepare script."""
    parser = argparse.ArgumentParser(
        prog=method.prog,
        allow_abbrev=False,
        description=method.summary,
        epilog=(
            "Of duplicates (text compared after normalizing), the record in the later source wins, so "
            "list a cleaned set last. Outputs are byte-identical across runs with the same inputs."
        ),
    )
    parser.add_argument(
        "--source",
        action="append",
        metavar="PATH",
        help=(
            "source file: JSON array, JSONL, CSV or Parquet, optionally gzip-compressed (.gz); repeat for "
            "several, in priority order (later wins on duplicates). Default: "
            + " then ".join(method.default_sources)
        ),
    )
    parser.add_argument(
        "--format",
        choices=format_choices(method.kind),
        default=AUTO,
        dest="format_name",
        help=(
            "the shape of every source's records (default: auto, detected per file from its first "
            "records; a file that mixes shapes is an error)"
        ),
    )
    parser.add_argument(
        "--out-dir",
        default=method.default_out_dir,
        metavar="DIR",
        help=f"directory for the output files, created if needed (default: {method.default_out_dir})",
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
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace output files of the same names that this tool did not write there (default: refuse)",
    )
    return parser


def format_summary(report: dict[str, Any], out_dir: str | os.PathLike[str], method: Method = SFT) -> list[str]:
    """Render the report as short human-readable lines, warnings included."""
    lines = [_counts_line(f"{s['path']} ({s['format']})" if s["format"] else s["path"], s) for s in report["sources"]]
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
    for name in _output_names(method):
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


def main(argv: Sequence[str] | None = None, method: Method = SFT) -> int:
    """Run the command line under the one error boundary (:func:`sft.errors.run_command`)."""
    args = build_parser(method).parse_args(argv)
    sources = args.source or list(method.default_sources)

    def run() -> None:
        report = prepare(sources, args.out_dir, args.val_fraction, args.seed, args.format_name, method,
                         args.force)
        _print_safely("\n".join(format_summary(report, args.out_dir, method)))

    return run_command(run)


def _print_safely(text: str) -> None:
    """Print ``text``, escaping what stdout cannot encode (odd file names)."""
    try:
        print(text)
    except UnicodeEncodeError:
        encoding = getattr(sys.stdout, "encoding", None) or "ascii"
        print(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))
