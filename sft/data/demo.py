"""Fetch the demo training data: 805 real instruction/answer pairs from the PyPI registry.

The source distribution of ``alpaca-eval==0.6.6`` ships ``example/outputs.json`` (instruction,
output, generator, dataset, datasplit). pip downloads the sdist, and the records are written in
Alpaca format (instruction, input, output) to ``data/raw/alpaca_eval_demo.json``; prepare it with
``python scripts/prepare_sft_data.py --source data/raw/alpaca_eval_demo.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from sft.config import StrictArgumentParser

PACKAGE = "alpaca-eval==0.6.6"
MEMBER = "alpaca_eval-0.6.6/example/outputs.json"
DEFAULT_OUT = "data/raw/alpaca_eval_demo.json"


def fetch(out: Path) -> int:
    """Download, convert and write the demo set; returns the number of records."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "--dest", tmp, PACKAGE], check=True)
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as archive:
            handle = archive.extractfile(MEMBER)
            assert handle is not None, f"{sdist.name} has no {MEMBER}"
            raw = json.load(handle)
    records = [{"instruction": r["instruction"], "input": "", "output": r["output"]} for r in raw]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + ".tmp")
    staging.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    staging.replace(out)
    return len(records)


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="sft fetch-demo-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"where to write the Alpaca-format JSON (default: {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="fetch again even if the file exists")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.is_file() and not args.force:
        print(f"{out} already exists (pass --force to fetch again)")
        return 0
    try:
        count = fetch(out)
    except subprocess.CalledProcessError:
        print(f"error: pip could not download {PACKAGE}; is the package index reachable?", file=sys.stderr)
        return 2
    print(f"wrote {count} records to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
