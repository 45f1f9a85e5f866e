"""`python -m sft.train_sft` / `sft train`: LoRA supervised fine-tuning with transformers.Trainer.

Reads the prepared JSONL files, masks every prompt token out of the loss, trains LoRA adapters
and writes Trainer-style output to the output directory: adapter_model.safetensors,
adapter_config.json, tokenizer files, checkpoint-N/, trainer_state.json, training_args.bin, plus
sft_config.yaml (the full configuration, so evaluation and chat rebuild prompts the same way)
and data_report.json (what tokenization kept, truncated and dropped).

Launched by ``torchrun`` or ``accelerate launch`` it trains data-parallel: every process loads the
model and tokenizes the data, the Trainer gives each process its own slice of every global batch,
the loss is normalized by the supervised tokens of all processes, and only the main process
writes files and prints.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase, TrainerCallback

from sft.config import SFTConfig, StrictArgumentParser, add_config_arguments, config_from_args
from sft.data.collate import PackingCollator, PaddingCollator
from sft.data.prepared import read_conversations
from sft.data.tokenize import encode_records
from sft.errors import DataError, run_command
from sft.training.arguments import training_arguments
from sft.training.stages import (
    Runtime,
    describe_layout,
    final_metrics,
    finish,
    load_lora_model,
    load_run_tokenizer,
    prepare_output_dir,
    run_guarded,
    save_run_files,
    setup_runtime,
)
from sft.training.trainer import SupervisedTrainer


def build_parser() -> argparse.ArgumentParser:
    parser = StrictArgumentParser(
        prog="python -m sft.train_sft",
        description="Train LoRA adapters on prepared instruction data (prompt tokens masked out of the loss).",
        epilog="Example: python -m sft.train_sft --config configs/demo.yaml --max-steps 2")
    add_config_arguments(parser)
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="continue from the newest intact checkpoint in --output-dir, or from the given one")
    parser.add_argument("--overwrite-output-dir", action="store_true",
                        help="delete a previous run's files in --output-dir (only those) instead of refusing to start")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: train(config_from_args(args), resume=args.resume,
                                     overwrite_output_dir=args.overwrite_output_dir))


@dataclass
class TrainingRun:
    trainer: SupervisedTrainer
    """The trainer, holding the trained PEFT model in memory."""
    metrics: dict[str, Any]
    """Final training metrics and the last validation loss."""


def encode_data(config: SFTConfig, tokenizer: PreTrainedTokenizerBase,
                runtime: Runtime) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Token ids and label masks of the training and validation sets, and what happened to each record."""
    data = config.data
    progress = runtime.main_process
    train_set, train_stats = encode_records(tokenizer, read_conversations(data.train_file), data.max_seq_length,
                                            data.system_prompt, train_on=data.train_on, desc="tokenizing train",
                                            progress=progress)
    val_set, val_stats = encode_records(tokenizer, read_conversations(data.val_file), data.max_seq_length,
                                        data.system_prompt, train_on=data.train_on, desc="tokenizing val",
                                        progress=progress)
    if not train_set:
        raise DataError(f"{data.train_file}: no example has a supervised token within "
                        f"max_seq_length={data.max_seq_length}")
    runtime.say(f"train: {train_stats.kept} examples ({train_stats.supervised_tokens} supervised tokens, "
                f"{train_stats.truncated} truncated, {train_stats.dropped_no_supervised_tokens} dropped with no "
                f"response token left); val: {val_stats.kept} examples")
    return train_set, val_set, {"train": train_stats.as_dict(), "val": val_stats.as_dict()}


def build_trainer(config: SFTConfig, runtime: Runtime, model: Any, tokenizer: PreTrainedTokenizerBase,
                  train_set: list[dict], val_set: list[dict], resumed: bool = False,
                  callbacks: list[TrainerCallback] | None = None, **argument_overrides: Any) -> SupervisedTrainer:
    """The trainer of an SFT run (the throughput benchmark builds its contender here too)."""
    args = training_arguments(config, runtime.policy, evaluate=bool(val_set), resumed=resumed,
                              **argument_overrides)
    collator = PackingCollator() if config.data.packing else PaddingCollator(tokenizer.pad_token_id)
    return SupervisedTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set or None,
                             data_collator=collator, processing_class=tokenizer, callbacks=callbacks)


def train(config: SFTConfig, resume: str | None = None, overwrite_output_dir: bool = False,
          callbacks: list[TrainerCallback] | None = None) -> TrainingRun:
    """Run one fine-tuning job and save its output."""
    with setup_runtime(config) as runtime:  # holds the output directory's lock until the run ends
        checkpoint = prepare_output_dir(config, runtime, resume, overwrite_output_dir)
        tokenizer = load_run_tokenizer(config, runtime)
        train_set, val_set, data_report = encode_data(config, tokenizer, runtime)
        runtime.say(describe_layout(config, runtime))
        model = load_lora_model(config, runtime)
        trainer = build_trainer(config, runtime, model, tokenizer, train_set, val_set, resumed=checkpoint is not None,
                                callbacks=callbacks)
        save_run_files(config, runtime, data_report)
        metrics = final_metrics(trainer, run_guarded(trainer, checkpoint, config, runtime))
        finish(trainer, metrics, runtime)
        runtime.say(f"Adapter saved to {config.training.output_dir}. Evaluate it with: "
                    f"python -m sft.sft_test --output-dir {config.training.output_dir}")
        return TrainingRun(trainer, metrics)


if __name__ == "__main__":
    raise SystemExit(main())
