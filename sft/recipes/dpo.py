"""`python -m sft.train_dpo` / `sft dpo`: preference training (DPO) of a LoRA adapter, after SFT.

Reads prepared preference pairs (``prepare_dpo_data.py``), tokenizes each pair's two answers after
the same prompt, computes the reference model's log-probabilities of every answer once (cached in
the output directory), and trains a new LoRA adapter with the DPO loss, the shared training
stages doing the rest: Trainer-style output (adapter safetensors, checkpoint-N/,
trainer_state.json, the run's sft_config.yaml) that loads in plain PEFT, resume, interrupts.

With ``--sft-adapter DIR`` the run starts from an SFT run: that adapter is merged into the base in
memory, the merged model is the reference, and the new adapter is trained on top of it. The run
keeps a copy in its sft_adapter/ folder, which chat, merge, export and evaluation fold into the
base before its own adapter. Without it the base model is the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback

from sft.config import DPOConfig, StrictArgumentParser, add_config_arguments, config_from_args
from sft.data.pairs import encode_pairs, encode_unpaired
from sft.data.prepared import read_preferences, read_unpaired
from sft.errors import ConfigError, DataError, run_command
from sft.files import atomic_directory
from sft.inference.loading import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    attach_adapter,
    check_adapter_dir,
    folded_adapter,
    trained_by,
)
from sft.modeling.fingerprint import ADAPTER_ORIGIN
from sft.modeling.models import resolve_model_path
from sft.training.arguments import training_arguments
from sft.training.checkpoints import SFT_ADAPTER_DIR, checkpoints
from sft.training.dpo_trainer import PreferenceTrainer
from sft.training.preference.collate import PairCollator, with_mismatched_completions
from sft.training.preference.losses import loss_type_flag, preference_loss
from sft.training.reference import attach_reference_logps, cached_reference_logps, reference_identity
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


def build_parser() -> argparse.ArgumentParser:
    parser = StrictArgumentParser(
        prog="python -m sft.train_dpo",
        description="Train a LoRA adapter on prepared preference pairs with DPO (after SFT: --sft-adapter).",
        epilog="Example: python -m sft.train_dpo --config configs/dpo-demo.yaml --sft-adapter models/sft_demo")
    add_config_arguments(parser, DPOConfig, {"loss_type": loss_type_flag()})
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="continue from the newest intact checkpoint in --output-dir, or from the given one")
    parser.add_argument("--overwrite-output-dir", action="store_true",
                        help="delete a previous run's files in --output-dir (only those) instead of refusing to start")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: train(config_from_args(args, DPOConfig), resume=args.resume,
                                     overwrite_output_dir=args.overwrite_output_dir))


@dataclass
class TrainingRun:
    trainer: PreferenceTrainer
    """The trainer, holding the trained PEFT model in memory."""
    metrics: dict[str, Any]
    """Final training metrics and the last validation metrics."""


def check_dpo_config(config: DPOConfig) -> None:
    """What this recipe cannot run, refused before anything is read or loaded."""
    if config.training.group_by_length:
        raise ConfigError("training.group_by_length: not used by DPO, whose pairs are packed per micro-batch; "
                          "set it to false")
    try:
        preference_loss(config.dpo.loss_type).check(config.dpo)
    except ConfigError as exc:
        raise ConfigError(f"dpo.{exc}") from None
    if config.dpo.sft_adapter is not None:
        check_sft_adapter(Path(config.dpo.sft_adapter), "dpo", "DPO")


def check_sft_adapter(sft_adapter: Path, section: str, method: str) -> None:
    """``sft_adapter`` must be an SFT run's adapter (a recipe's ``section.sft_adapter``)."""
    check_adapter_dir(sft_adapter)
    if (trained := trained_by(sft_adapter)) != "sft":
        folded = folded_adapter(sft_adapter)
        raise ConfigError(
            f"{section}.sft_adapter: {sft_adapter} holds a {trained.upper()} adapter, not an SFT run's; {method} "
            f"starts from an SFT run (sft train's output directory or its checkpoint-N)"
            + (f", such as the one this {trained.upper()} run was trained on, kept in {folded}" if folded else ""))


def sft_adapter_source(sft_adapter: str | None, output_dir: str, resumed: bool) -> Path | None:
    """The SFT adapter to fold into the base: the run's own copy when resuming (the one it started
    with), the given one for a new run; None when the base model is the reference."""
    if sft_adapter is None:
        return None
    copy = Path(output_dir) / SFT_ADAPTER_DIR
    return copy if resumed and (copy / ADAPTER_CONFIG).is_file() else Path(sft_adapter)


def stage_sft_adapter(output_dir: str, runtime: Runtime, source: Path | None) -> Path | None:
    """The run's own copy of the SFT adapter it started from (made now, once the model with that
    adapter loaded, so a refused adapter leaves no copy behind), or None."""
    if source is None:
        return None
    copy = Path(output_dir) / SFT_ADAPTER_DIR
    with runtime.state.main_process_first():
        if runtime.main_process and source != copy:
            shutil.rmtree(copy, ignore_errors=True)
            with atomic_directory(copy) as staging:
                for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_ORIGIN):
                    if name != ADAPTER_ORIGIN or (source / name).is_file():
                        shutil.copy2(source / name, staging / name)
    return copy


def drop_unused_sft_adapter(output_dir: str, runtime: Runtime, sft_adapter: Path | None, source: Path | None) -> None:
    """Remove the copy of the SFT adapter a new run made, when it failed before its first checkpoint."""
    if sft_adapter is not None and sft_adapter != source and runtime.main_process and not checkpoints(Path(output_dir)):
        shutil.rmtree(sft_adapter, ignore_errors=True)


def encode_data(config: DPOConfig, tokenizer: PreTrainedTokenizerBase,
                runtime: Runtime) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Token ids of the training and validation pairs, and what happened to each pair."""
    if not preference_loss(config.dpo.loss_type).paired:
        return encode_unpaired_data(config, tokenizer, runtime)
    data = config.data
    encoded, report = {}, {}
    for split, path in (("train", data.train_file), ("val", data.val_file)):
        encoded[split], stats = encode_pairs(tokenizer, read_preferences(path), data.max_seq_length,
                                             data.system_prompt, desc=f"tokenizing {split} pairs",
                                             progress=runtime.main_process)
        report[split] = stats.as_dict()
    if not encoded["train"]:
        raise DataError(f"{data.train_file}: no pair has an answer token within max_seq_length={data.max_seq_length} "
                        f"that tells its two answers apart")
    train = report["train"]
    runtime.say(f"train: {train['kept']} pairs ({train['chosen_tokens']} chosen and {train['rejected_tokens']} "
                f"rejected answer tokens, {train['truncated']} truncated, {train['dropped_no_answer_tokens']} dropped "
                f"with no answer token left, {train['dropped_identical_after_truncation']} dropped with answers "
                f"identical after truncation); val: {report['val']['kept']} pairs")
    return encoded["train"], encoded["val"], report


def encode_unpaired_data(config: DPOConfig, tokenizer: PreTrainedTokenizerBase,
                         runtime: Runtime) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Token ids of the training and validation examples of a loss on unpaired examples (KTO),
    each with the mismatched completion its KL term scores, and what happened to each example."""
    data = config.data
    encoded, report = {}, {}
    for split, path in (("train", data.train_file), ("val", data.val_file)):
        examples, stats = encode_unpaired(tokenizer, read_unpaired(path), data.max_seq_length, data.system_prompt,
                                          desc=f"tokenizing {split} examples", progress=runtime.main_process)
        encoded[split], report[split] = with_mismatched_completions(examples, data.max_seq_length), stats.as_dict()
    if not encoded["train"]:
        raise DataError(f"{data.train_file}: no example has a completion token within max_seq_length="
                        f"{data.max_seq_length}")
    train = report["train"]
    runtime.say(f"train: {train['kept']} examples ({train['desirable']} desirable, {train['undesirable']} "
                f"undesirable; {train['truncated']} truncated, {train['dropped_no_answer_tokens']} dropped with no "
                f"completion token left); val: {report['val']['kept']} examples")
    dpo = config.dpo
    balance = dpo.desirable_weight * train["desirable"] / max(dpo.undesirable_weight * train["undesirable"], 1e-12)
    if not 1 <= balance <= 4 / 3:
        runtime.say(f"note: desirable_weight x desirable examples / (undesirable_weight x undesirable examples) is "
                    f"{balance:.3g}; the KTO paper keeps it in [1, 4/3]")
    return encoded["train"], encoded["val"], report


def fold_in(adapter_dir: Path, model_name: str) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """A base-model step that merges the adapter of ``adapter_dir`` into the base."""
    return lambda base: attach_adapter(base, adapter_dir, model_name).merge_and_unload()


def with_reference_logps(config: DPOConfig, runtime: Runtime, model: torch.nn.Module, sft_adapter: Path | None,
                         collator: PairCollator, **splits: list[dict]) -> dict[str, list[dict]]:
    """Each split's pairs with their reference log-probabilities, from the run's cache or computed
    now (by the main process; the others then read its file) with the new adapter disabled, in
    the precision training computes in."""
    policy = runtime.policy
    identity = reference_identity(resolve_model_path(config.model.model),
                                  str(sft_adapter) if sft_adapter else None, policy.compute_dtype)
    device = runtime.state.device
    if not config.model.load_in_4bit:  # a 4-bit model was placed on its GPU when loaded
        model.to(device)
    autocast = torch.autocast(device.type, dtype=policy.compute_dtype) if policy.bf16 or policy.fp16 \
        else contextlib.nullcontext()
    with runtime.state.main_process_first(), autocast:
        logps, computed = cached_reference_logps(model, splits, config.training.output_dir, identity,
                                                 config.training.eval_batch_size, collator, device, runtime.say)
    runtime.say(f"reference log-probabilities: {'computed' if computed else 'read from the cache'} "
                f"({', '.join(f'{split}: {len(pairs)} pairs' for split, pairs in splits.items())})")
    return {split: attach_reference_logps(pairs, logps[split]) for split, pairs in splits.items()}


def build_trainer(config: DPOConfig, runtime: Runtime, model: Any, tokenizer: PreTrainedTokenizerBase,
                  train_set: list[dict], val_set: list[dict], resumed: bool = False,
                  callbacks: list[TrainerCallback] | None = None, **argument_overrides: Any) -> PreferenceTrainer:
    """The trainer of a DPO run (the DPO throughput benchmark builds its contender here too)."""
    args = training_arguments(config, runtime.policy, evaluate=bool(val_set), resumed=resumed, **argument_overrides)
    return PreferenceTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set or None,
                             data_collator=pair_collator(config, tokenizer), processing_class=tokenizer,
                             callbacks=callbacks, dpo=config.dpo)


def pair_collator(config: DPOConfig, tokenizer: PreTrainedTokenizerBase) -> PairCollator:
    return PairCollator(config.data.packing, tokenizer.pad_token_id)


def train(config: DPOConfig, resume: str | None = None, overwrite_output_dir: bool = False,
          callbacks: list[TrainerCallback] | None = None) -> TrainingRun:
    """Run one DPO job and save its output."""
    check_dpo_config(config)
    with setup_runtime(config) as runtime:  # holds the output directory's lock until the run ends
        checkpoint = prepare_output_dir(config, runtime, resume, overwrite_output_dir)
        source = sft_adapter_source(config.dpo.sft_adapter, config.training.output_dir,
                                    resumed=checkpoint is not None)
        tokenizer = load_run_tokenizer(config, runtime)
        train_set, val_set, data_report = encode_data(config, tokenizer, runtime)
        runtime.say(describe_layout(config, runtime))
        model = load_lora_model(config, runtime, fold_in(source, config.model.model) if source else None)
        sft_adapter = stage_sft_adapter(config.training.output_dir, runtime, source)
        try:
            scored = {"train": train_set, "val": val_set}
            if preference_loss(config.dpo.loss_type).needs_reference:
                scored = with_reference_logps(config, runtime, model, sft_adapter, pair_collator(config, tokenizer),
                                              **scored)
            trainer = build_trainer(config, runtime, model, tokenizer, scored["train"], scored["val"],
                                    resumed=checkpoint is not None, callbacks=callbacks)
            save_run_files(config, runtime, data_report)
            metrics = final_metrics(trainer, run_guarded(trainer, checkpoint, config, runtime))
        except BaseException:
            drop_unused_sft_adapter(config.training.output_dir, runtime, sft_adapter, source)
            raise
        finish(trainer, metrics, runtime)
        runtime.say(f"Adapter saved to {config.training.output_dir}. Compare base, SFT and DPO on held-out pairs "
                    f"with: sft eval-dpo --output-dir {config.training.output_dir}")
        return TrainingRun(trainer, metrics)


if __name__ == "__main__":
    raise SystemExit(main())
