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
from pathlib import Path
from typing import Any

import torch

from sft.config import DPOConfig, SFTConfig
from sft.data.pairs import encode_pairs
from sft.data.prepared import read_preferences
from sft.data.templates import end_of_turn_ids
from sft.errors import ConfigError, DataError, run_command
from sft.inference.loading import LoadedRun, folded_adapter, load_run
from sft.inference.run_dir import evaluation_parser, held_out, report_on_run, write_report
from sft.modeling.attention import shares_prompts_by_default
from sft.modeling.generate import generate_greedy
from sft.training.preference.collate import PairCollator
from sft.training.preference.logps import pairs_answer_logps
from sft.training.preference.metrics import METRICS, metric_sums

MODELS = ("base", "sft", "dpo")
TITLES = {"base": "base", "sft": "SFT", "dpo": "DPO"}


def build_parser() -> argparse.ArgumentParser:
    return evaluation_parser(
        prog="sft eval-dpo",
        description="Preference accuracy, reward margins and greedy answers of base, SFT and DPO on held-out pairs.",
        epilog="The run's own sft_config.yaml is the starting configuration, so pairs are tokenized exactly as in "
               "training; flags override it.",
        adapter_help="the DPO run's adapter (default: its --output-dir; a checkpoint-N directory works too)",
        config_class=DPOConfig)


REPORT_PREFIX = "preference_"
"""The report files' prefix: eval/preference_generations.jsonl, eval/preference_metrics.json and
eval/preference_report.md."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: report_on_run(args, REPORT_PREFIX, evaluate_preferences, format_metrics,
                                             accept=check_dpo_run))


def check_dpo_run(config: SFTConfig, adapter_dir: Path) -> None:
    """Only a DPO run is compared with its base and SFT models."""
    if not isinstance(config, DPOConfig):  # scoring base and SFT first would end in a traceback
        raise ConfigError(f"{adapter_dir}: not a DPO run (its configuration has no dpo section); sft eval-dpo "
                          f"compares base, SFT and DPO models: pass a run of `sft dpo`, or use `sft eval` for an "
                          f"SFT run")


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
    packing = run.config.data.packing
    share = shares_prompts_by_default(packing, getattr(run.model.config, "_attn_implementation", None),
                                      run.policy.device)
    scores[name] = pairs_answer_logps(run.model, pairs, run.config.training.eval_batch_size,
                                      PairCollator(packing, run.tokenizer.pad_token_id, share_prompts=share),
                                      run.policy.device, desc=f"scoring pairs ({name})")
    answers[name] = generate_greedy(run.model, run.tokenizer, prompts, run.config.eval.max_new_tokens,
                                    end_of_turn_ids(run.tokenizer), batch_size=run.config.training.eval_batch_size)


def evaluate_preferences(config: DPOConfig, adapter_dir: Path) -> dict[str, Any]:
    run = load_run(adapter_dir, config)
    data = config.data
    raw = held_out(config, read_preferences)
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

    return write_report(adapter_dir, REPORT_PREFIX, generations, metrics,
                        render_report(config, adapter_dir, metrics, generations))


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
