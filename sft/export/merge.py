"""`sft merge`: fold a LoRA adapter into its base model and save a standalone model directory.

The result loads with plain ``AutoModelForCausalLM.from_pretrained(DIR)``: safetensors weights,
config, the tokenizer saved with the adapter (including its chat template) and a generation
config that stops at the end of the assistant's turn.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from sft.config import ConfigError, StrictArgumentParser, build_config, saved_run_config
from sft.data.templates import end_of_turn_ids
from sft.errors import run_command
from sft.modeling.models import load_adapter, load_model, load_tokenizer, resolve_model_path


def merge(adapter_dir: str | Path, out_dir: str | Path, model: str | None = None) -> Path:
    """Merge the adapter in ``adapter_dir`` into its base (from the run's config, or ``model``)."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter_dir}: no adapter_config.json here; pass the training output directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir}: exists and is not empty; choose a new --out directory")
    if model is None:
        model = build_config(saved_run_config(adapter_dir)).model.model
    base = load_model(resolve_model_path(model), torch.float32, "sdpa")
    merged = load_adapter(base, str(adapter_dir)).merge_and_unload()
    tokenizer = load_tokenizer(str(adapter_dir))
    merged.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if out_dir.exists():
        out_dir.rmdir()
    staging.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="sft merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="models/sft_output",
                        help="training output directory or checkpoint-N holding the adapter (default: %(default)s)")
    parser.add_argument("--out", required=True, help="new directory for the merged model")
    parser.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    args = parser.parse_args(argv)
    return run_command(lambda: print(f"merged model written to {merge(args.adapter, args.out, args.model)}"))


if __name__ == "__main__":
    raise SystemExit(main())
