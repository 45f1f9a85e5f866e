"""`python -m sft.train_sft`: LoRA supervised fine-tuning with transformers.Trainer.

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
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sft.config import (
    RUN_CONFIG_FILE,
    ConfigError,
    SFTConfig,
    StrictArgumentParser,
    add_config_arguments,
    config_from_args,
)
from sft.data.sources import DataError
from sft.data.templates import ensure_chat_template
from sft.data.tokenize import PackingCollator, PaddingCollator, encode_records, read_jsonl
from sft.errors import ResourceError, TrainingInterrupted, run_command
from sft.modeling.attention import resolve_attention
from sft.modeling.devices import device_policy
from sft.modeling.lora import add_lora
from sft.modeling.models import check_4bit_supported, load_config, load_model, load_tokenizer, resolve_model_path
from sft.training.interrupt import GracefulInterrupt
from sft.training.plots import plot_losses
from sft.training.trainer import SupervisedTrainer

DATA_REPORT_FILE = "data_report.json"


def build_parser() -> argparse.ArgumentParser:
    parser = StrictArgumentParser(
        prog="python -m sft.train_sft",
        description="Train LoRA adapters on prepared instruction data (prompt tokens masked out of the loss).",
        epilog="Example: python -m sft.train_sft --config configs/demo.yaml --max-steps 2")
    add_config_arguments(parser)
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="continue from the latest checkpoint in --output-dir, or from the given checkpoint dir")
    parser.add_argument("--overwrite-output-dir", action="store_true",
                        help="delete a previous run in --output-dir instead of refusing to start")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: train(config_from_args(args), resume=args.resume,
                                            overwrite_output_dir=args.overwrite_output_dir))


def _holds_run(output_dir: Path) -> bool:
    if not output_dir.is_dir():
        return False
    return any((output_dir / name).exists() for name in ("trainer_state.json", "adapter_config.json")) \
        or any(output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"))


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The highest checkpoint-N that holds trainer_state.json (written last), or None."""
    complete = [path for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").is_file()]
    return max(complete, key=lambda path: int(path.name.split("-")[-1]), default=None)


def _resume_checkpoint(output_dir: Path, resume: str | None, overwrite: bool) -> str | None:
    """The checkpoint to resume from; refuse to mix a new run into an old one's directory."""
    if resume is None:
        previous_run = _holds_run(output_dir)
        if previous_run and not overwrite:
            raise ConfigError(f"output_dir: {output_dir} holds another run; pass --resume to continue it, "
                              f"--overwrite-output-dir to replace it, or choose another --output-dir")
        if previous_run:
            shutil.rmtree(output_dir)
        return None
    if resume != "latest":
        if not Path(resume, "trainer_state.json").is_file():
            raise ConfigError(f"--resume: {resume} is not a checkpoint directory (no trainer_state.json)")
        return resume
    last = latest_complete_checkpoint(output_dir) if output_dir.is_dir() else None
    if last is None:
        raise ConfigError(f"--resume: no checkpoint-N directory in {output_dir} to resume from")
    return str(last)


def _out_of_memory_advice(config: SFTConfig, device: str, exc: BaseException) -> str:
    t = config.training
    return (f"out of memory on {device} ({str(exc).splitlines()[0][:200]}). Lower --batch-size (now {t.batch_size}) "
            f"and raise --gradient-accumulation-steps (now {t.gradient_accumulation_steps}) to keep the same "
            f"effective batch, lower --max-seq-length (now {config.data.max_seq_length}), or turn on "
            f"--gradient-checkpointing true (now {str(t.gradient_checkpointing).lower()}).")


@dataclass
class TrainingRun:
    trainer: SupervisedTrainer
    """The trainer, holding the trained PEFT model in memory."""
    metrics: dict[str, Any]
    """Final training metrics and the last validation loss."""


def train(config: SFTConfig, resume: str | None = None, overwrite_output_dir: bool = False,
          callbacks: list[TrainerCallback] | None = None) -> TrainingRun:
    """Run one fine-tuning job and save its output."""
    t = config.training
    output_dir = Path(t.output_dir)
    policy = device_policy(t.device, config.model.dtype)
    if config.model.load_in_4bit:
        check_4bit_supported(policy.device)
    # Under torchrun / accelerate launch this joins the process group (gloo on CPU, nccl on CUDA).
    state = PartialState(cpu=policy.device == "cpu")
    main_process = state.is_main_process
    say = print if main_process else (lambda *args, **kwargs: None)
    with state.main_process_first():  # the main process deletes a run being replaced before the others look
        checkpoint = _resume_checkpoint(output_dir, resume, overwrite_output_dir)
    if policy.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for float32 matmuls (Ampere+)
        torch.backends.cudnn.allow_tf32 = True
    set_seed(t.seed)
    if t.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("report_to: tensorboard is not installed; run `pip install tensorboard`")

    model_path = resolve_model_path(config.model.model)
    max_positions = getattr(load_config(model_path, config.model.trust_remote_code), "max_position_embeddings", None)
    if max_positions is not None and config.data.max_seq_length > max_positions:
        raise ConfigError(f"data.max_seq_length: {config.data.max_seq_length} exceeds what {config.model.model} "
                          f"takes ({max_positions} positions)")
    tokenizer = load_tokenizer(model_path, config.model.trust_remote_code)
    if ensure_chat_template(tokenizer):
        say("The tokenizer has no chat template; using the Alpaca-style fallback (see sft/templates.py).")
    if tokenizer.pad_token_id is None:
        # Safe because labels are masked by position, never by pad id.
        tokenizer.pad_token = tokenizer.eos_token

    train_examples, train_stats = encode_records(
        tokenizer, read_jsonl(config.data.train_file), config.data.max_seq_length, config.data.system_prompt,
        desc="tokenizing train", progress=main_process)
    val_examples, val_stats = encode_records(
        tokenizer, read_jsonl(config.data.val_file), config.data.max_seq_length, config.data.system_prompt,
        desc="tokenizing val", progress=main_process)
    if not train_examples:
        raise DataError(f"{config.data.train_file}: no example has a supervised token within "
                        f"max_seq_length={config.data.max_seq_length}")
    say(f"train: {train_stats.kept} examples ({train_stats.supervised_tokens} supervised tokens, "
          f"{train_stats.truncated} truncated, {train_stats.dropped_no_supervised_tokens} dropped with no "
          f"response token left); val: {val_stats.kept} examples")
    n = state.num_processes
    say(f"{n} process{'es' if n > 1 else ''} on {policy.device} in {str(policy.compute_dtype).removeprefix('torch.')}"
        f"{' (4-bit base)' if config.model.load_in_4bit else ''}; global batch = {t.batch_size} per process x "
        f"{t.gradient_accumulation_steps} accumulation steps x {n} = "
        f"{t.batch_size * t.gradient_accumulation_steps * n} examples per optimizer step")

    attention = resolve_attention(config.model.attn_implementation, policy.device)
    model = load_model(model_path, policy.load_dtype, attention, config.model.trust_remote_code,
                       load_in_4bit_compute=policy.compute_dtype if config.model.load_in_4bit else None,
                       device=policy.device)
    model.config.use_cache = False
    if config.model.load_in_4bit:
        # QLoRA's preparation: norms and head in float32, and gradient checkpointing if asked.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Frozen embeddings give checkpointed blocks inputs that need no grad; LoRA then gets none.
        model.enable_input_require_grads()
    lora = config.lora
    model = add_lora(model, LoraConfig(
        r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
        target_modules=lora.lora_target_modules, task_type="CAUSAL_LM"), policy.device)
    if main_process:
        model.print_trainable_parameters()

    has_val = bool(val_examples)
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_val else "no",
        eval_steps=t.eval_steps,
        eval_on_start=has_val and checkpoint is None,  # a resumed run was evaluated at that step already
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        bf16=policy.bf16,
        fp16=policy.fp16,
        use_cpu=policy.device == "cpu",
        dataloader_pin_memory=policy.device.startswith("cuda"),
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in every step
        prediction_loss_only=True,
        report_to=t.report_to,
    )
    collator = PackingCollator() if config.data.packing else PaddingCollator(tokenizer.pad_token_id)
    trainer = SupervisedTrainer(model=model, args=args, train_dataset=train_examples,
                                eval_dataset=val_examples if has_val else None,
                                data_collator=collator, processing_class=tokenizer, callbacks=callbacks)
    interrupt = GracefulInterrupt()
    trainer.add_callback(interrupt)

    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        config.save(output_dir / RUN_CONFIG_FILE)
        (output_dir / DATA_REPORT_FILE).write_text(json.dumps(
            {"train": train_stats.as_dict(), "val": val_stats.as_dict()}, indent=2) + "\n", encoding="utf-8")

    interrupt.install()
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    except torch.OutOfMemoryError as exc:
        raise ResourceError(_out_of_memory_advice(config, policy.device, exc)) from None
    except RuntimeError as exc:
        if "out of memory" not in str(exc).lower():
            raise
        raise ResourceError(_out_of_memory_advice(config, policy.device, exc)) from None
    finally:
        interrupt.uninstall()
    if interrupt.signal_name is not None:
        checkpoint_dir = output_dir / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
        raise TrainingInterrupted(
            f"stopped by {interrupt.signal_name} at step {trainer.state.global_step}; the checkpoint is in "
            f"{checkpoint_dir}. Continue with the same command plus --resume.")
    metrics = dict(result.metrics)
    if has_val:
        evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
        last_eval_is_final = evals and evals[-1]["step"] == trainer.state.global_step
        metrics.update(evals[-1] if last_eval_is_final else trainer.evaluate())
    trainer.save_model()
    trainer.save_state()
    trainer.log_metrics("final", metrics)
    if main_process:
        print(f"Loss plot: {plot_losses(output_dir)}")
    say(f"Adapter saved to {output_dir}. Evaluate it with: python -m sft.sft_test --output-dir {output_dir}")
    return TrainingRun(trainer, metrics)


if __name__ == "__main__":
    raise SystemExit(main())
