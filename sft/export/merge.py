"""`sft merge`: fold a LoRA adapter into its base model and save a standalone model directory.

The result loads with plain ``AutoModelForCausalLM.from_pretrained(DIR)``: safetensors weights,
config, the tokenizer saved with the adapter (including its chat template) and a generation
config that stops at the end of the assistant's turn. It is written into a fresh temporary
folder beside ``--out`` and renamed into place only when complete, so a failed merge leaves
nothing behind and never touches anything but that folder. The adapter is read holding its
folder's writer lock: a run still writing there is refused, not merged half-written.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors import SafetensorError

from sft.config import StrictArgumentParser
from sft.data.templates import end_of_turn_ids
from sft.errors import ConfigError, ResourceError, run_command
from sft.files import atomic_directory
from sft.inference.loading import load_run, run_config
from sft.outputs import writer_lock


def merge(adapter_dir: str | Path, out_dir: str | Path, model: str | None = None,
          trust_remote_code: bool = False) -> Path:
    """Merge the adapter in ``adapter_dir`` into its base (from the run's config, or ``model``)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out: {out_dir} is a file; name a new directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ConfigError(f"--out: {out_dir} exists and is not empty; choose a new directory")
    if not out_dir.parent.is_dir():
        raise ConfigError(f"--out: the folder {out_dir.parent} does not exist; create it first")
    # Merged weights in float32 on the CPU: exact, and a 1B model fits in any machine's memory.
    config = run_config(adapter_dir, overrides={"trust_remote_code": trust_remote_code, "dtype": "float32",
                                                "load_in_4bit": False})
    with writer_lock(adapter_dir):  # a run still writing its adapter there is not merged half-written
        run = load_run(adapter_dir, config, model_name=model, device="cpu")
    merged = run.model.merge_and_unload()
    merged.generation_config.eos_token_id = end_of_turn_ids(run.tokenizer)
    merged.generation_config.pad_token_id = run.tokenizer.pad_token_id
    try:
        with atomic_directory(out_dir) as staging:  # removed again if a write fails
            merged.save_pretrained(staging)
            run.tokenizer.save_pretrained(staging)
    except SafetensorError as exc:  # the weights are written by safetensors, whose I/O errors are its own type
        free_mb = shutil.disk_usage(out_dir.parent).free // 2**20
        raise ResourceError(f"--out: could not write the merged model into {out_dir.parent} ({exc}); if the disk is "
                            f"full ({free_mb} MB free there), free space or pass --out on another disk. Nothing was "
                            f"left behind") from None
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="sft merge", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="models/sft_output",
                        help="training output directory or checkpoint-N holding the adapter (default: %(default)s)")
    parser.add_argument("--out", required=True, help="new directory for the merged model")
    parser.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a Hub model's own code to run (never taken from a run directory)")
    args = parser.parse_args(argv)
    return run_command(lambda: print(f"merged model written to "
                                     f"{merge(args.adapter, args.out, args.model, args.trust_remote_code)}"))


if __name__ == "__main__":
    raise SystemExit(main())
