"""`python -m sft.sft_test`: evaluate a trained adapter against its base model.

Loads the base model and the adapter of a run, then reports on the held-out set:
- validation loss and perplexity of the base model and of base + adapter, averaged over every
  supervised (response) token, with the same prompts and masks as training;
- greedy answers of both to the first N held-out prompts, side by side, built with the same
  prompt code as training, decoding only the new tokens and stopping at the end of the turn.
Writes ``eval/report.md`` and ``eval/generations.jsonl`` under the run's output directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from tqdm.auto import tqdm

from sft.config import (
    RUN_CONFIG_FILE,
    ConfigError,
    SFTConfig,
    StrictArgumentParser,
    add_config_arguments,
    build_config,
)
from sft.data.collate import PaddingCollator
from sft.data.prepared import read_conversations
from sft.data.templates import encode_prompt, end_of_turn_ids, render_prompt, with_system_prompt
from sft.data.tokenize import encode_records
from sft.errors import run_command
from sft.modeling.attention import resolve_attention
from sft.modeling.devices import device_policy
from sft.modeling.models import check_4bit_supported, load_adapter, load_model, load_tokenizer, resolve_model_path
from sft.training.loss import supervised_nll_sum
from sft.training.plots import PLOT_FILE


def build_parser() -> argparse.ArgumentParser:
    parser = StrictArgumentParser(
        prog="python -m sft.sft_test",
        description="Validation loss and side-by-side generations of the base model and a trained adapter.",
        epilog="The run's own sft_config.yaml (written by training) is the starting configuration, so "
               "prompts are built exactly as in training; flags override it.")
    parser.add_argument("--adapter", metavar="DIR",
                        help="adapter directory (default: the run's --output-dir; a checkpoint-N directory works too)")
    add_config_arguments(parser)
    return parser


def run_config(args: argparse.Namespace) -> SFTConfig:
    """The configuration the run was trained with, with this command's flags on top."""
    overrides = {name: value for name, value in vars(args).items() if name not in {"config", "adapter"}}
    output_dir = overrides.get("output_dir") or build_config(args.config).training.output_dir
    saved = Path(output_dir, RUN_CONFIG_FILE)
    return build_config(saved if saved.is_file() else args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> None:
        config = run_config(args)
        adapter_dir = Path(args.adapter or config.training.output_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ConfigError(f"{adapter_dir}: no adapter_config.json here; train first "
                              f"(python -m sft.train_sft) or pass --adapter DIR")
        report = evaluate(config, adapter_dir)
        print(format_metrics(report["metrics"]))
        print(f"Report: {report['report_path']}")

    return run_command(run)


def mean_supervised_loss(model: torch.nn.Module, examples: list[dict], batch_size: int, pad_token_id: int,
                         device: str, desc: str) -> tuple[float, int]:
    """Mean next-token loss over all supervised tokens of the examples, and their number."""
    collate = PaddingCollator(pad_token_id)
    by_length = sorted(examples, key=lambda e: len(e["input_ids"]))  # less padding per batch
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in tqdm(range(0, len(by_length), batch_size), desc=desc, disable=None, leave=False):
            batch = {k: v.to(device) for k, v in collate(by_length[start:start + batch_size]).items()}
            nll, n = supervised_nll_sum(model, batch)
            total += float(nll)
            count += n
    return total / max(count, 1), count


def generate_answer(model: torch.nn.Module, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int,
                    device: str) -> tuple[str, bool]:
    """Greedy answer to a prompt: new tokens only, and whether it ended its turn by itself."""
    stop_ids = end_of_turn_ids(tokenizer)
    input_ids = torch.tensor([prompt_ids], device=device)
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                pad_token_id=tokenizer.pad_token_id)
    new_tokens = output[0, len(prompt_ids):].tolist()
    finished = bool(new_tokens) and new_tokens[-1] in stop_ids
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip(), finished


def evaluate(config: SFTConfig, adapter_dir: Path) -> dict[str, Any]:
    policy = device_policy(config.training.device, config.model.dtype)
    tokenizer = load_tokenizer(str(adapter_dir), config.model.trust_remote_code)
    quantized = config.model.load_in_4bit and policy.device.startswith("cuda")  # as trained, where it can be
    if quantized:
        check_4bit_supported(policy.device)
    base = load_model(resolve_model_path(config.model.model), policy.load_dtype,
                      resolve_attention(config.model.attn_implementation, policy.device),
                      config.model.trust_remote_code, load_in_4bit_compute=policy.compute_dtype if quantized else None,
                      device=policy.device)
    model = load_adapter(base, str(adapter_dir))
    model = (model if quantized else model.to(policy.device)).eval()  # a 4-bit model is placed when loaded

    records = read_conversations(config.data.val_file)
    if config.eval.max_eval_examples:
        records = records[:config.eval.max_eval_examples]
    examples, stats = encode_records(tokenizer, records, config.data.max_seq_length, config.data.system_prompt,
                                     train_on=config.data.train_on)
    metrics: dict[str, Any] = {"val_examples": stats.kept, "val_supervised_tokens": stats.supervised_tokens,
                               "val_dropped": stats.dropped_no_supervised_tokens}
    for name, adapter_on in (("base", False), ("adapter", True)):
        with _adapter(model, adapter_on):
            loss, _ = mean_supervised_loss(model, examples, config.training.eval_batch_size,
                                           tokenizer.pad_token_id, policy.device, desc=f"val loss ({name})")
        metrics[f"{name}_val_loss"] = loss
        metrics[f"{name}_perplexity"] = math.exp(loss)

    generations = []
    for record in tqdm(records[:config.eval.num_generations], desc="generating", disable=None):
        prompt_ids = encode_prompt(tokenizer, render_prompt(
            tokenizer, with_system_prompt(record["messages"][:-1], config.data.system_prompt)))
        row = {"id": record["id"], "prompt": record["messages"][-2]["content"],
               "reference": record["messages"][-1]["content"]}
        for name, adapter_on in (("base", False), ("adapter", True)):
            with _adapter(model, adapter_on):
                row[name], row[f"{name}_finished"] = generate_answer(
                    model, tokenizer, prompt_ids, config.eval.max_new_tokens, policy.device)
        generations.append(row)
    for name in ("base", "adapter"):
        metrics[f"{name}_answers_finished"] = sum(row[f"{name}_finished"] for row in generations)
    metrics["answers"] = len(generations)

    eval_dir = Path(config.training.output_dir) / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    with (eval_dir / "generations.jsonl").open("w", encoding="utf-8") as handle:
        for row in generations:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (eval_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    report_path = eval_dir / "report.md"
    report_path.write_text(render_report(config, adapter_dir, metrics, generations), encoding="utf-8")
    return {"metrics": metrics, "generations": generations, "report_path": report_path}


def _adapter(model: PeftModel, enabled: bool) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if enabled else model.disable_adapter()


def format_metrics(metrics: dict[str, Any]) -> str:
    change = metrics["adapter_val_loss"] - metrics["base_val_loss"]
    return "\n".join([
        "| model | val loss | perplexity |",
        "|---|---|---|",
        f"| base | {metrics['base_val_loss']:.4f} | {metrics['base_perplexity']:.2f} |",
        f"| base + adapter | {metrics['adapter_val_loss']:.4f} | {metrics['adapter_perplexity']:.2f} |",
        "",
        f"Change in validation loss: {change:+.4f} over {metrics['val_supervised_tokens']} supervised tokens "
        f"of {metrics['val_examples']} held-out examples ({metrics['val_dropped']} dropped: no response token "
        f"within max_seq_length).",
        f"Greedy answers that ended their turn within max_new_tokens: base {metrics['base_answers_finished']}"
        f"/{metrics['answers']}, base + adapter {metrics['adapter_answers_finished']}/{metrics['answers']}.",
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
          if (Path(config.training.output_dir) / PLOT_FILE).is_file() else []),
        f"## Greedy answers to {len(generations)} held-out prompts (max {config.eval.max_new_tokens} new tokens)",
    ]
    for number, row in enumerate(generations, 1):
        prompt = row["prompt"]
        lines += ["", f"### {number}. {_quote_line(prompt.splitlines()[0])}", ""]
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
