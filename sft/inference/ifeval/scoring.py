"""Strict and loose IFEval judgments, the reference's result files, and the four accuracies.

Strict judges the response as it is. Loose also accepts an instruction when it is followed by
the response with its first line, its last line or both removed, or with every Markdown ``*``
removed, or both: the reference's eight variants, which forgive a preamble ("Sure, here is...")
or a closing remark, and bold markup around a phrase. An empty response follows nothing.

Prompt-level accuracy is the share of prompts whose instructions are all followed;
instruction-level accuracy is the share of all instructions followed.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from sft.files import atomic_files
from sft.inference.ifeval.data import IFEvalPrompt
from sft.verifiers.instructions import followed

LEVELS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
"""The four accuracies, by lm-evaluation-harness's names."""


def judge(prompt: IFEvalPrompt, response: str, loose: bool) -> list[bool]:
    """Whether the response follows each instruction of the prompt."""
    return followed(prompt.checks, response, loose)


def result_records(prompts: list[IFEvalPrompt], responses: dict[str, str], loose: bool) -> list[dict[str, Any]]:
    """One record per prompt, with the reference's fields in its order."""
    records = []
    for prompt in prompts:
        followed = judge(prompt, responses[prompt.prompt], loose)
        records.append({"instruction_id_list": prompt.instruction_id_list, "prompt": prompt.prompt,
                        "response": responses[prompt.prompt], "follow_all_instructions": all(followed),
                        "follow_instruction_list": followed})
    return records


def accuracies(strict: list[dict[str, Any]], loose: list[dict[str, Any]]) -> dict[str, Any]:
    """The four accuracies, their strict and loose means of prompt and instruction level (as
    leaderboards report one IFEval number), and the accuracy per instruction type."""
    scores: dict[str, Any] = {"prompts": len(strict),
                              "instructions": sum(len(r["instruction_id_list"]) for r in strict)}
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: {"instructions": 0, "strict": 0, "loose": 0})
    for mode, records in (("strict", strict), ("loose", loose)):
        scores[f"prompt_level_{mode}_acc"] = sum(r["follow_all_instructions"] for r in records) / len(records)
        followed = [f for r in records for f in r["follow_instruction_list"]]
        scores[f"inst_level_{mode}_acc"] = sum(followed) / len(followed)
        for record in records:
            for instruction_id, ok in zip(record["instruction_id_list"], record["follow_instruction_list"]):
                by_type[instruction_id][mode] += ok
                by_type[instruction_id]["instructions"] += mode == "strict"
    for mode in ("strict", "loose"):
        scores[f"mean_{mode}_acc"] = (scores[f"prompt_level_{mode}_acc"] + scores[f"inst_level_{mode}_acc"]) / 2
    scores["by_instruction"] = {
        instruction_id: {"instructions": counts["instructions"],
                         "strict_acc": counts["strict"] / counts["instructions"],
                         "loose_acc": counts["loose"] / counts["instructions"]}
        for instruction_id, counts in sorted(by_type.items())}
    return scores


def score_responses(prompts: list[IFEvalPrompt], responses: dict[str, str], out_dir: Path) -> dict[str, Any]:
    """Judge the prompts' responses; write ``eval_results_strict.jsonl``,
    ``eval_results_loose.jsonl`` (the reference's format) and ``scores.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {mode: result_records(prompts, responses, loose=mode == "loose") for mode in ("strict", "loose")}
    scores = accuracies(results["strict"], results["loose"])
    paths = [out_dir / "eval_results_strict.jsonl", out_dir / "eval_results_loose.jsonl", out_dir / "scores.json"]
    with atomic_files(paths) as (strict, loose, scores_file):  # the three replace the old ones together
        for handle, mode in ((strict, "strict"), (loose, "loose")):
            handle.writelines(json.dumps(record) + "\n" for record in results[mode])
        scores_file.write(json.dumps(scores, indent=2) + "\n")
    return scores


def format_scores(named_scores: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of the four accuracies (in %) of one or more models, side by side."""
    names = list(named_scores)
    rows = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    labels = {"prompt_level_strict_acc": "prompt-level strict", "inst_level_strict_acc": "instruction-level strict",
              "prompt_level_loose_acc": "prompt-level loose", "inst_level_loose_acc": "instruction-level loose",
              "mean_strict_acc": "mean of prompt and instruction level, strict"}
    for key, label in labels.items():
        rows.append(f"| {label} | " + " | ".join(f"{100 * named_scores[n][key]:.2f}" for n in names) + " |")
    return "\n".join(rows)


def format_by_instruction(named_scores: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of strict / loose accuracy (in %) per instruction type, models side by side."""
    names = list(named_scores)
    first = named_scores[names[0]]["by_instruction"]
    rows = ["| instruction | n | " + " | ".join(f"{n} strict / loose" for n in names) + " |",
            "|---|---|" + "---|" * len(names)]
    for instruction_id, counts in first.items():
        cells = [f"{100 * s['by_instruction'][instruction_id]['strict_acc']:.0f} / "
                 f"{100 * s['by_instruction'][instruction_id]['loose_acc']:.0f}" for s in named_scores.values()]
        rows.append(f"| `{instruction_id}` | {counts['instructions']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
