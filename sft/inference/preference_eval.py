"""`sft eval-dpo`: the base model, the SFT model and the DPO model side by side on held-out pairs.

For each model, over the pairs of the run's validation file (tokenized as in training):
- preference accuracy: how often it gives the chosen answer a higher log-probability than the
  rejected one; and length-normalized, per answer token, so that a short answer does not win by
  being short;
- reward accuracy and mean reward margin: DPO's implicit reward of an answer is beta times its
  log-probability ratio to the run's reference (the SFT model, or the base without one); the
  margin is chosen minus rejected. The reference scores 0 against itself by definition;
- greedy answers to the first held-out prompts, beside the chosen answer.

One model is in memory at a time: the DPO run loads as its reference (base + SFT adapter merged)
with its own adapter on top, scored with that adapter on and off; the base model is loaded after.
Writes ``eval/preference_report.md``, ``eval/preference_metrics.json`` and
``eval/preference_generations.jsonl`` under the adapter directory given (not the folder its run was
trained in), holding that folder's writer lock.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from sft.config import DPOConfig, StrictArgumentParser, add_config_arguments
from sft.data.pairs import encode_pairs
from sft.data.prepared import read_preferences
from sft.data.templates import end_of_turn_ids
from sft.errors import ConfigError, DataError, run_command
from sft.files import atomic_write_text
from sft.inference.generate import generate_greedy
from sft.inference.loading import LoadedRun, check_adapter_dir, folded_adapter, load_run, run_config
from sft.outputs import writing_into
from sft.training.preference.collate import PairCollator
from sft.training.preference.logps import pairs_answer_logps
from sft.training.preference.metrics import METRICS, metric_sums

MODELS = ("base", "sft", "dpo")
TITLES = {"base": "base", "sft": "SFT", "dpo": "DPO"}


def build_parser() -> argparse.ArgumentParser:
    parser = StrictArgumentParser(
        prog="sft eval-dpo",
        description="Preference accuracy, reward margins and greedy answers of base, SFT and DPO on held-out pairs.",
        epilog="The run's own sft_config.yaml is the starting configuration, so pairs are tokenized exactly as in "
               "training; flags override it.")
    parser.add_argument("--adapter", metavar="DIR",
                        help="the DPO run's adapter (default: its --output-dir; a checkpoint-N directory works too)")
    parser.add_argument("--force", action="store_true",
                        help="replace eval/ files of those names that sft did not write (default: refuse)")
    add_config_arguments(parser, DPOConfig)
    return parser


EVAL_FILES = ("eval/preference_generations.jsonl", "eval/preference_metrics.json", "eval/preference_report.md")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> None:
        overrides = {name: value for name, value in vars(args).items() if name not in {"config", "adapter", "force"}}
        output_dir = overrides.get("output_dir") or run_config(None, args.config).training.output_dir
        adapter_dir = Path(args.adapter or output_dir)
        check_adapter_dir(adapter_dir)
        config = run_config(adapter_dir, args.config, overrides)
        if not isinstance(config, DPOConfig):  # scoring base and SFT first would end in a traceback
            raise ConfigError(f"{adapter_dir}: not a DPO run (its configuration has no dpo section); sft eval-dpo "
                              f"compares base, SFT and DPO models: pass a run of `sft dpo`, or use `sft eval` for an "
                              f"SFT run")
        with writing_into(adapter_dir, EVAL_FILES, inputs=[config.data.val_file], force=args.force):
            report = evaluate_preferences(config, adapter_dir)
        print(format_metrics(report["metrics"]))
        print(f"Report: {report['report_path']}")

    return run_command(run)


def preference_metrics(logps: torch.Tensor, reference: torch.Tensor, answer_tokens: torch.Tensor,
                       beta: float) -> dict[str, float]:
    """The metrics of one model from its [pairs, 2] log-probabilities of (chosen, rejected), the
    reference's, and the answers' token counts: the two accuracies, then METRICS (means over pairs)."""
    per_token = logps / answer_tokens
    means = (metric_sums(logps, beta * (logps - reference)) / len(logps)).tolist()
    return {"preference_accuracy": float((logps[:, 0] > logps[:, 1]).float().mean()),
            "length_normalized_accuracy": float((per_token[:, 0] > per_token[:, 1]).float().mean()),
            **dict(zip(METRICS, means, strict=True))}


def _score_and_answer(run: LoadedRun, name: str, pairs: list[dict], prompts: list[list[int]],
                      scores: dict[str, torch.Tensor], answers: dict[str, list]) -> None:
    scores[name] = pairs_answer_logps(run.model, pairs, run.config.training.eval_batch_size,
                                      PairCollator(run.config.data.packing, run.tokenizer.pad_token_id),
                                      run.policy.device, desc=f"scoring pairs ({name})")
    answers[name] = generate_greedy(run.model, run.tokenizer, prompts, run.config.eval.max_new_tokens,
                                    end_of_turn_ids(run.tokenizer), batch_size=run.config.training.eval_batch_size)


def evaluate_preferences(config: DPOConfig, adapter_dir: Path) -> dict[str, Any]:
    run = load_run(adapter_dir, config)
    data = config.data
    raw = read_preferences(data.val_file)
    if config.eval.max_eval_examples:
        raw = raw[:config.eval.max_eval_examples]
    pairs, stats = encode_pairs(run.tokenizer, raw, data.max_seq_length, data.system_prompt)
    if not pairs:
        raise DataError(f"{data.val_file}: no held-out pair to score ({stats.read} pairs, "
                        f"{stats.dropped_no_answer_tokens} with no answer token within max_seq_length="
                        f"{data.max_seq_length}); use a validation file with pairs, or a larger --max-seq-length")
    limit, budget = run.max_positions, config.eval.max_new_tokens
    # Each kept pair with the record it came from: by position, as ids may repeat in a file.
    shown = [(pair, raw[row]) for pair, row in zip(pairs, stats.kept_rows, strict=True)
             if limit is None or len(pair["prompt_ids"]) + budget <= limit]
    shown = shown[:config.eval.num_generations]
    prompts = [pair["prompt_ids"] for pair, _ in shown]

    reference = "sft" if folded_adapter(adapter_dir) is not None else "base"
    scores: dict[str, torch.Tensor] = {}
    answers: dict[str, list] = {}
    with run.adapter(True):
        _score_and_answer(run, "dpo", pairs, prompts, scores, answers)
    with run.adapter(False):
        _score_and_answer(run, reference, pairs, prompts, scores, answers)
    if reference == "sft":
        del run  # one model in memory at a time
        _score_and_answer(load_run(None, config), "base", pairs, prompts, scores, answers)

    answer_tokens = torch.tensor([[len(pair["chosen_ids"]), len(pair["rejected_ids"])] for pair in pairs],
                                 dtype=torch.float32)
    models = [name for name in MODELS if name in scores]
    metrics: dict[str, Any] = {
        "pairs": stats.kept, "dropped": stats.dropped_no_answer_tokens + stats.dropped_identical_after_truncation,
        "reference": reference,
        "beta": config.dpo.beta,
        "models": {name: preference_metrics(scores[name], scores[reference], answer_tokens, config.dpo.beta)
                   for name in models}}
    generations = [{"id": record["id"], "prompt": record["prompt"], "chosen": record["chosen"]}
                   | {name: answers[name][row].text for name in models}
                   | {f"{name}_finished": answers[name][row].finished for name in models}
                   for row, (_, record) in enumerate(shown)]

    eval_dir = adapter_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(eval_dir / "preference_generations.jsonl",
                      "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in generations))
    atomic_write_text(eval_dir / "preference_metrics.json", json.dumps(metrics, indent=2) + "\n")
    report_path = eval_dir / "preference_report.md"
    atomic_write_text(report_path, render_report(config, adapter_dir, metrics, generations))
    return {"metrics": metrics, "generations": generations, "report_path": report_path}


def format_metrics(metrics: dict[str, Any]) -> str:
    rows = ["| model | preference accuracy | length-normalized | reward accuracy | mean reward margin | "
            "mean log p chosen | mean log p rejected |",
            "|---|---|---|---|---|---|---|"]
    for name, m in metrics["models"].items():
        reference = " (reference)" if name == metrics["reference"] else ""
        rows.append(f"| {TITLES[name]}{reference} | "
                    f"{m['preference_accuracy']:.3f} | {m['length_normalized_accuracy']:.3f} | "
                    f"{m['rewards/accuracies']:.3f} | {m['rewards/margins']:+.4f} | {m['logps/chosen']:.2f} | "
                    f"{m['logps/rejected']:.2f} |")
    return "\n".join([
        *rows, "",
        f"{metrics['pairs']} held-out pairs ({metrics['dropped']} dropped: no answer token within max_seq_length, "
        f"or the two answers identical within it). Rewards are beta = {metrics['beta']} times the log-probability ratio to the reference "
        f"({TITLES[metrics['reference']]}); reward accuracy counts pairs with a positive margin.",
    ])


def render_report(config: DPOConfig, adapter_dir: Path, metrics: dict[str, Any], generations: list[dict]) -> str:
    models = list(metrics["models"])
    lines = [f"# Preference evaluation of {adapter_dir}", "",
             f"Base model `{config.model.model}`, held-out pairs `{config.data.val_file}`, max_seq_length "
             f"{config.data.max_seq_length}.", "", format_metrics(metrics), "",
             f"## Greedy answers to {len(generations)} held-out prompts (max {config.eval.max_new_tokens} new tokens)"]
    for number, row in enumerate(generations, 1):
        question = row["prompt"][-1]["content"]
        lines += ["", f"### {number}. {question.splitlines()[0][:80] if question else ''}", ""]
        for title, key in (("Prompt", None), ("Chosen answer", "chosen"), *((TITLES[m], m) for m in models)):
            text = question if key is None else row[key]
            cut = key in models and not row[f"{key}_finished"]
            lines += [f"**{title}**{' (cut at max_new_tokens)' if cut else ''}:", "",
                      *(f"> {line}" for line in text.splitlines() or [""]), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
