"""The `sft` command: one entry point for every step of the pipeline (`sft --help` lists them).

Each subcommand is a module's ``main``, so it takes the same flags as the module it runs
(`python -m sft.train_sft` is `sft train`); `sft SUBCOMMAND --help` lists them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module

COMMANDS: dict[str, tuple[str, str]] = {
    "fetch-demo-data": ("sft.data.demo", "download the demo instruction set into data/raw/"),
    "prepare": ("sft.data.prepare", "merge, clean and split chat data of any common shape into JSONL"),
    "prepare-preferences": ("sft.data.prepare_dpo", "merge, clean and split preference pairs for DPO into JSONL"),
    "inspect": ("sft.data.inspect", "show one training example as the model sees it, trained tokens marked"),
    "train": ("sft.recipes.sft", "train LoRA adapters on the prepared data"),
    "dpo": ("sft.recipes.dpo", "train a LoRA adapter on preference pairs with DPO (after SFT: --sft-adapter)"),
    "grpo": ("sft.recipes.grpo", "train a LoRA adapter online with GRPO from verifiable rewards (sampled answers)"),
    "eval": ("sft.inference.evaluate", "compare base model and adapter: validation loss, generations"),
    "eval-dpo": ("sft.inference.preference_eval", "compare base, SFT and DPO on held-out preference pairs"),
    "onpolicy-pairs": ("sft.inference.onpolicy", "preference pairs from an SFT run's own answers (rejected) and "
                                                 "the references (chosen)"),
    "plot": ("sft.training.plots", "draw a run's training and validation loss (loss.png)"),
    "merge": ("sft.export.merge", "fold the adapter into the base model: a standalone model directory"),
    "chat": ("sft.inference.chat", "talk to base + adapter in the terminal (or --prompt for one answer)"),
    "export": ("sft.export.gguf", "write a merged model or an adapter as GGUF (llama.cpp, Ollama, LM Studio)"),
    "ifeval": ("sft.inference.ifeval.command", "instruction-following scores (IFEval), base vs adapter"),
    "fetch-eval-data": ("sft.inference.ifeval.data", "download IFEval's prompts into data/ifeval/"),
    "constraints": ("sft.rewards.constraints", "prompts with checkable instructions (IFEval types), decontaminated"),
    "sample": ("sft.rewards.sample", "k sampled answers per constraint prompt (seeded, resumable)"),
    "verify": ("sft.rewards.datasets", "score sampled answers: rejection-sampling SFT data, verified pairs"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS)) + 2
    rows = "\n".join(f"  {name:<{width}} {summary}" for name, (_, summary) in COMMANDS.items())
    return f"usage: sft COMMAND [--help] [options]\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    run: Callable[[list[str]], int] = import_module(COMMANDS[command][0]).main
    return run(rest)


if __name__ == "__main__":
    raise SystemExit(main())
