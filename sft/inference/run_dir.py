"""Which run an evaluation command scores, and where its report goes (`sft eval`, `sft eval-dpo`).

The run is ``--adapter DIR`` (a checkpoint-N works too), else the run's output directory, from
``--output-dir`` or the ``--config`` preset. Its own sft_config.yaml is the starting
configuration, the command's flags on top. The report's files are written under that adapter
directory (not the folder its run was trained in), holding the folder's writer lock; a file there
of those names that sft did not write is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft.config import SFTConfig, StrictArgumentParser, add_config_arguments
from sft.files import atomic_write_text
from sft.inference.loading import check_adapter_dir, run_config
from sft.outputs import writing_into

Evaluation = Callable[[SFTConfig, Path], dict[str, Any]]
"""Scores a run's adapter directory with its configuration: ``{"metrics", "report_path", ...}``."""


def evaluation_parser(prog: str, description: str, epilog: str, adapter_help: str,
                      config_class: type[SFTConfig] = SFTConfig) -> argparse.ArgumentParser:
    """An evaluation command's flags: ``--adapter``, ``--force`` and the configuration's."""
    parser = StrictArgumentParser(prog=prog, description=description, epilog=epilog)
    parser.add_argument("--adapter", metavar="DIR", help=adapter_help)
    parser.add_argument("--force", action="store_true",
                        help="replace eval/ files of those names that sft did not write (default: refuse)")
    add_config_arguments(parser, config_class)
    return parser


def evaluated_run(args: argparse.Namespace) -> tuple[Path, SFTConfig]:
    """The adapter directory the flags name (checked to hold an adapter), and its run's
    configuration with the flags on top."""
    overrides = {name: value for name, value in vars(args).items() if name not in {"config", "adapter", "force"}}
    output_dir = overrides.get("output_dir") or run_config(None, args.config).training.output_dir
    adapter_dir = Path(args.adapter or output_dir)
    check_adapter_dir(adapter_dir)
    return adapter_dir, run_config(adapter_dir, args.config, overrides)


def held_out(config: SFTConfig, read: Callable[[str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The records of the run's validation file an evaluation scores, read by ``read``: the first
    ``eval.max_eval_examples`` (all of them with 0)."""
    records = read(config.data.val_file)
    return records[:config.eval.max_eval_examples] if config.eval.max_eval_examples else records


def report_files(prefix: str) -> tuple[str, ...]:
    """The files an evaluation writes under the adapter directory, their names starting with ``prefix``."""
    return tuple(f"eval/{prefix}{name}" for name in ("generations.jsonl", "metrics.json", "report.md"))


def write_report(adapter_dir: Path, prefix: str, generations: list[dict[str, Any]], metrics: dict[str, Any],
                 report: str) -> dict[str, Any]:
    """Write the ``report_files(prefix)``: the answers as JSON lines, the metrics as JSON and the
    markdown report; returns ``{"metrics", "generations", "report_path"}``."""
    eval_dir = adapter_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(eval_dir / f"{prefix}generations.jsonl",
                      "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in generations))
    atomic_write_text(eval_dir / f"{prefix}metrics.json", json.dumps(metrics, indent=2) + "\n")
    report_path = eval_dir / f"{prefix}report.md"
    atomic_write_text(report_path, report)
    return {"metrics": metrics, "generations": generations, "report_path": report_path}


def report_on_run(args: argparse.Namespace, prefix: str, evaluate: Evaluation,
                  format_metrics: Callable[[dict[str, Any]], str],
                  accept: Callable[[SFTConfig, Path], None] = lambda config, adapter_dir: None) -> None:
    """Evaluate the run the flags name (``accept`` may refuse it first) into ``report_files(prefix)``
    under its adapter directory, then print the metrics table and where the report is."""
    adapter_dir, config = evaluated_run(args)
    accept(config, adapter_dir)
    with writing_into(adapter_dir, report_files(prefix), inputs=[config.data.val_file], force=args.force):
        report = evaluate(config, adapter_dir)
    print(format_metrics(report["metrics"]))
    print(f"Report: {report['report_path']}")
