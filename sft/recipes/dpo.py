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

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback

from sft.config import DPOConfig
from sft.data.pairs import encode_pairs, encode_unpaired
from sft.data.prepared import read_preferences, read_unpaired
from sft.errors import ConfigError, DataError
from sft.modeling.attention import shares_prompts_by_default
from sft.modeling.models import resolve_model_path
from sft.recipes.skeleton import Encoded, Recipe
from sft.training.arguments import training_arguments
from sft.training.dpo_trainer import PreferenceTrainer
from sft.training.preference.collate import PairCollator, with_mismatched_completions
from sft.training.preference.losses import loss_type_flag, preference_loss
from sft.training.reference import attach_reference_logps, cached_reference_logps, reference_identity
from sft.training.stages import Runtime


class DPO(Recipe):
    """Preference training with the DPO loss, against a reference: the base, or the SFT model."""

    command = "python -m sft.train_dpo"
    description = "Train a LoRA adapter on prepared preference pairs with DPO (after SFT: --sft-adapter)."
    epilog = "Example: python -m sft.train_dpo --config configs/dpo-demo.yaml --sft-adapter models/sft_demo"
    next_step = "Compare base, SFT and DPO on held-out pairs with: sft eval-dpo --output-dir {output_dir}"
    config_class = DPOConfig
    starts_from = "dpo"

    def check(self) -> None:
        if self.config.training.group_by_length:
            raise ConfigError("training.group_by_length: not used by DPO, whose pairs are packed per micro-batch; "
                              "set it to false")
        try:
            preference_loss(self.config.dpo.loss_type).check(self.config.dpo)
        except ConfigError as exc:
            raise ConfigError(f"dpo.{exc}") from None

    @classmethod
    def flag_options(cls) -> dict[str, dict[str, Any]]:
        """``--loss-type``'s choices and help, from the loss registry."""
        return {"loss_type": loss_type_flag()}

    def encode(self, tokenizer: PreTrainedTokenizerBase, runtime: Runtime) -> Encoded:
        """Token ids of the training and validation pairs, and what happened to each pair."""
        if not preference_loss(self.config.dpo.loss_type).paired:
            return encode_unpaired_data(self.config, tokenizer, runtime)
        data = self.config.data
        encoded, report = encode_splits(self.config, runtime, lambda path, split: encode_pairs(
            tokenizer, read_preferences(path), data.max_seq_length, data.system_prompt,
            desc=f"tokenizing {split} pairs", progress=runtime.main_process))
        if not encoded["train"]:
            raise DataError(f"{data.train_file}: no pair has an answer token within max_seq_length="
                            f"{data.max_seq_length} that tells its two answers apart")
        train = report["train"]
        runtime.say(f"train: {train['kept']} pairs ({train['chosen_tokens']} chosen and {train['rejected_tokens']} "
                    f"rejected answer tokens, {train['truncated']} truncated, {train['dropped_no_answer_tokens']} "
                    f"dropped with no answer token left, {train['dropped_identical_after_truncation']} dropped with "
                    f"answers identical after truncation); val: {report['val']['kept']} pairs")
        return Encoded(encoded["train"], encoded["val"], report)

    def with_reference(self, runtime: Runtime, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                       sft_adapter: Path | None, data: Encoded) -> Encoded:
        """The pairs with the reference's log-probabilities of their answers (none for a loss without a reference)."""
        if not preference_loss(self.config.dpo.loss_type).needs_reference:
            return data
        collator = pair_collator(self.config, tokenizer, runtime)
        scored = with_reference_logps(self.config, runtime, model, sft_adapter, collator, train=data.train,
                                      val=data.val)
        return Encoded(scored["train"], scored["val"], data.report)

    def build_trainer(self, runtime: Runtime, model: Any, tokenizer: PreTrainedTokenizerBase, data: Encoded,
                      resumed: bool, callbacks: list[TrainerCallback] | None) -> PreferenceTrainer:
        return build_trainer(self.config, runtime, model, tokenizer, data.train, data.val, resumed=resumed,
                             callbacks=callbacks)




def encode_splits(config: DPOConfig, runtime: Runtime, encode: Callable[[str, str], tuple[list[dict], Any]]
                  ) -> tuple[dict[str, list[dict]], dict[str, dict[str, Any]]]:
    """``encode(path, split)`` of the training and validation files: the encoded examples and each
    split's statistics as a dict, by split."""
    encoded, report = {}, {}
    for split, path in (("train", config.data.train_file), ("val", config.data.val_file)):
        encoded[split], stats = encode(path, split)
        report[split] = stats.as_dict()
    return encoded, report

def encode_unpaired_data(config: DPOConfig, tokenizer: PreTrainedTokenizerBase, runtime: Runtime) -> Encoded:
    """Token ids of the training and validation examples of a loss on unpaired examples (KTO),
    each with the mismatched completion its KL term scores, and what happened to each example."""
    data = config.data

    def encode(path: str, split: str) -> tuple[list[dict], Any]:
        examples, stats = encode_unpaired(tokenizer, read_unpaired(path), data.max_seq_length, data.system_prompt,
                                          desc=f"tokenizing {split} examples", progress=runtime.main_process)
        return with_mismatched_completions(examples, data.max_seq_length), stats

    encoded, report = encode_splits(config, runtime, encode)
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
    return Encoded(encoded["train"], encoded["val"], report)

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
                             data_collator=pair_collator(config, tokenizer, runtime), processing_class=tokenizer,
                             callbacks=callbacks, dpo=config.dpo)


def pair_collator(config: DPOConfig, tokenizer: PreTrainedTokenizerBase, runtime: Runtime) -> PairCollator:
    """Records packed (or padded) as the configuration says; packed with each prompt once where
    that is the default (sft.modeling.attention.shares_prompts_by_default: the CPU)."""
    share = shares_prompts_by_default(config.data.packing, runtime.attention, runtime.policy.device)
    return PairCollator(config.data.packing, tokenizer.pad_token_id, share_prompts=share)


main, train = DPO.main, DPO.run  # the command; one run from a configuration, in code

if __name__ == "__main__":
    raise SystemExit(main())
