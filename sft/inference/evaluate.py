"""`python -m sft.sft_test` / `sft eval`: evaluate a trained adapter against its base model.

Loads the base model and the adapter of a run (sft.inference.loading), then reports on the
held-out set:
- validation loss and perplexity of the base model and of base + adapter, averaged over every
  supervised (answer) token, with the same prompts and masks as training;
- greedy answers of both to the first N held-out conversations, side by side: the prompt is the
  conversation up to its last assistant turn (built by the same code as training), that turn is
  the reference, and generation stops at the end of the turn.
Writes ``eval/report.md``, ``eval/metrics.json`` and ``eval/generations.jsonl`` under the adapter
directory evaluated (the one given, not the folder its run was trained in), holding the folder's
writer lock; a file there of those names that sft did not write is replaced only with --force.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sft.config import SFTConfig
from sft.data.collate import PaddingCollator
from sft.data.prepared import read_conversations
from sft.data.templates import end_of_turn_ids, with_system_prompt
from sft.data.tokenize import encode_records, generation_prompt
from sft.errors import DataError, run_command
from sft.inference.loading import LoadedRun, load_run
from sft.inference.run_dir import evaluation_parser, held_out, report_on_run, write_report
from sft.modeling.generate import generate_greedy
from sft.training.loss import supervised_totals
from sft.training.plots import PLOT_FILE


def build_parser() -> argparse.ArgumentParser:
    return evaluation_parser(
        prog="python -m sft.sft_test",
        description="Validation loss and side-by-side generations of the base model and a trained adapter.",
        epilog="The run's own sft_config.yaml (written by training) is the starting configuration, so "
               "prompts are built exactly as in training; flags override it. trust_remote_code is never "
               "read from a run directory: pass --trust-remote-code true to allow a model's own code.",
        adapter_help="adapter directory (default: the run's --output-dir; a checkpoint-N directory works too)")


REPORT_PREFIX = ""
"""The report files' prefix: eval/generations.jsonl, eval/metrics.json and eval/report.md."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: report_on_run(args, REPORT_PREFIX, evaluate, format_metrics))


def validation_loss(model: torch.nn.Module, examples: list[dict], batch_size: int, pad_token_id: int,
                    device: str, desc: str) -> tuple[float, int]:
    """Mean next-token loss over all supervised tokens of the examples, and their number."""
    collate = PaddingCollator(pad_token_id)
    by_length = sorted(examples, key=lambda e: len(e["input_ids"]))  # less padding per batch
    batches = ({key: value.to(device) for key, value in collate(by_length[i:i + batch_size]).items()}
               for i in tqdm(range(0, len(by_length), batch_size), desc=desc, disable=None, leave=False))
    nll, count = supervised_totals(model, ((batch, True) for batch in batches)).tolist()
    return nll / count, int(count)


def evaluate(config: SFTConfig, adapter_dir: Path) -> dict[str, Any]:
    run = load_run(adapter_dir, config)
    data = config.data
    records = held_out(config, read_conversations)
    examples, stats = encode_records(run.tokenizer, records, data.max_seq_length, data.system_prompt,
                                     train_on=data.train_on)
    if stats.supervised_tokens == 0:
        raise DataError(f"{data.val_file}: no validation token to score ({stats.read} records, "
                        f"{stats.dropped_no_supervised_tokens} with no answer token within max_seq_length="
                        f"{data.max_seq_length}); a loss over nothing would read as a perfect 0.0. Use a validation "
                        f"file with answers, or a larger --max-seq-length")
    metrics: dict[str, Any] = {"val_examples": stats.kept, "val_supervised_tokens": stats.supervised_tokens,
                               "val_dropped": stats.dropped_no_supervised_tokens}
    for name, adapter_on in (("base", False), ("adapter", True)):
        with run.adapter(adapter_on):
            loss, _ = validation_loss(run.model, examples, config.training.eval_batch_size,
                                      run.tokenizer.pad_token_id, run.policy.device, desc=f"val loss ({name})")
        metrics[f"{name}_val_loss"] = loss
        metrics[f"{name}_perplexity"] = math.exp(loss)

    generations, metrics["prompts_too_long"] = generate_side_by_side(run, records)
    for name in ("base", "adapter"):
        metrics[f"{name}_answers_finished"] = sum(row[f"{name}_finished"] for row in generations)
    metrics["answers"] = len(generations)

    return write_report(adapter_dir, REPORT_PREFIX, generations, metrics,
                        render_report(config, adapter_dir, metrics, generations))


def generate_side_by_side(run: LoadedRun, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Greedy answers of base and base + adapter to the first held-out conversations whose prompt
    (all turns before the last answer) fits the model with max_new_tokens to spare, and how many
    were passed over because theirs did not."""
    limit = run.max_positions
    budget = run.config.eval.max_new_tokens
    rows, prompts, too_long = [], [], 0
    for record in records:
        if len(rows) == run.config.eval.num_generations:
            break
        messages = with_system_prompt(record["messages"], run.config.data.system_prompt)
        prompt_ids = generation_prompt(run.tokenizer, messages[:-1], limit, record.get("tools"))
        if limit is not None and len(prompt_ids) + budget > limit:
            too_long += 1
            continue
        prompts.append(prompt_ids)
        rows.append({"id": record["id"], "prompt": record["messages"][-2]["content"],
                     "messages": record["messages"][:-1], "reference": record["messages"][-1]["content"]})
    stop_ids = end_of_turn_ids(run.tokenizer)
    for name, adapter_on in (("base", False), ("adapter", True)):
        with run.adapter(adapter_on):
            answers = generate_greedy(run.model, run.tokenizer, prompts, budget, stop_ids,
                                      batch_size=run.config.training.eval_batch_size)
        for row, answer in zip(rows, answers):
            row[name], row[f"{name}_finished"] = answer.text, answer.finished
    return rows, too_long


def format_metrics(metrics: dict[str, Any]) -> str:
    change = metrics["adapter_val_loss"] - metrics["base_val_loss"]
    return "\n".join([
        "| model | val loss | perplexity |",
        "|---|---|---|",
        f"| base | {metrics['base_val_loss']:.4f} | {metrics['base_perplexity']:.2f} |",
        f"| base + adapter | {metrics['adapter_val_loss']:.4f} | {metrics['adapter_perplexity']:.2f} |",
        "",
        f"Change in validation loss: {change:+.4f} over {metrics['val_supervised_tokens']} supervised tokens "
        f"of {metrics['val_examples']} held-out examples ({metrics['val_dropped']} dropped: no answer token "
        f"within max_seq_length).",
        f"Greedy answers that ended their turn within max_new_tokens: base {metrics['base_answers_finished']}"
        f"/{metrics['answers']}, base + adapter {metrics['adapter_answers_finished']}/{metrics['answers']}"
        + (f" ({metrics['prompts_too_long']} held-out prompts passed over: longer than the model's positions "
           f"allow with max_new_tokens to spare)." if metrics["prompts_too_long"] else "."),
    ])


def render_report(config: SFTConfig, adapter_dir: Path, metrics: dict[str, Any], generations: list[dict]) -> str:
    lines = [
        f"# Evaluation of {adapter_dir}",
        "",
        f"Base model `{config.model.model}`, validation file `{config.data.val_file}`, "
        f"max_seq_length {config.data.max_seq_length}, system prompt "
        f"{'(template default)' if config.data.system_prompt is None else repr(config.data.system_prompt)}.",
        "",
        format_metrics(metrics),
        "",
        *([f"![training and validation loss](../{PLOT_FILE})", ""]
          if (adapter_dir / PLOT_FILE).is_file() else []),
        f"## Greedy answers to {len(generations)} held-out prompts (max {config.eval.max_new_tokens} new tokens)",
    ]
    for number, row in enumerate(generations, 1):
        prompt = row["prompt"]
        earlier = sum(message["role"] != "system" for message in row["messages"]) - 1
        lines += ["", f"### {number}. {_quote_line(prompt.splitlines()[0] if prompt else '')}", ""]
        if earlier:
            lines += [f"(after {earlier} earlier turns)", ""]
        for title, key in (("Prompt", None), ("Reference", "reference"), ("Base", "base"),
                           ("Base + adapter", "adapter")):
            text = prompt if key is None else row[key]
            suffix = "" if key in (None, "reference") or row[f"{key}_finished"] else " (cut at max_new_tokens)"
            lines += [f"**{title}**{suffix}:", "", *(f"> {line}" for line in text.splitlines() or [""]), ""]
    return "\n".join(lines) + "\n"


def _quote_line(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


if __name__ == "__main__":
    raise SystemExit(main())
