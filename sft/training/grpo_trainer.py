"""The SFT trainer turned online: each optimizer step samples its own answers and learns from their rewards.

Everything but the data and the loss is SupervisedTrainer's (and so the stock Trainer's):
optimizer, schedule, staged checkpoints, resume, the non-finite-loss stop. The dataset is a list
of prompts in the order the steps take them (sft.recipes.grpo builds it: each step's prompts
repeated for its num_iterations steps); when the Trainer fetches a step's micro-batches
(``get_batch_samples``), the policy answers each prompt G times (sft.training.grpo_sampling,
seeded by step), the rewards are scored and normalized per group, and the answers become packed
prompt + answer sequences with the prompt masked (on the CPU, each group's prompt packed once
before its answers: sft.data.collate.pack_shared_prompts). For num_iterations > 1, the sampling policy's
log-probabilities are taken then (the ratio's denominator), and with beta > 0 the reference's
(adapters disabled), once per sample. The loss is the clipped token objective of
sft.training.grpo over all answer tokens of the step (the Trainer's ``num_items_in_batch``).

A checkpoint written inside a cycle of num_iterations steps holds the cycle's samples
(``grpo_samples.json``), so a resumed run trains on exactly what the uninterrupted run would.
Logged besides the loss, each a mean over the steps since the last log: ``reward``,
``reward_std``, ``pass_rate`` (answers following all their instructions, with the verifier),
``answer_tokens`` (mean answer length), ``sampling_tokens_per_s``, ``clip_fraction`` and ``kl``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import SequentialSampler
from transformers import PreTrainedTokenizerBase

from sft.config.grpo import GRPOSettings
from sft.data.collate import IGNORE_INDEX, PackingCollator, PaddingCollator, pack_shared_prompts
from sft.errors import ConfigError
from sft.files import atomic_write_text
from sft.modeling.attention import VARLEN_KEYS, VARLEN_SDPA, shares_prompts_by_default
from sft.modeling.lora import merged_weights
from sft.training.grpo import dapo_loss, group_advantages, per_token, token_terms
from sft.training.grpo_rewards import Rewards
from sft.training.grpo_sampling import answer_seed, sample_answers
from sft.training.loss import NOT_MODEL_INPUTS
from sft.training.token_logps import answer_token_logps
from sft.training.trainer import SupervisedTrainer

ADVANTAGES, OLD_LOGPS, REFERENCE_LOGPS = "advantages", "old_logps", "reference_logps"
GRPO_NOT_MODEL_INPUTS = (*NOT_MODEL_INPUTS, ADVANTAGES, OLD_LOGPS, REFERENCE_LOGPS)
SAMPLES_FILE = "grpo_samples.json"
"""A checkpoint's samples of the current cycle (only with num_iterations > 1)."""


def keep_prompts(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The data collator: a micro-batch of prompts stays a list until its answers are sampled."""
    return items


class GRPOTrainer(SupervisedTrainer):
    METHOD = "grpo"

    def __init__(self, *args: Any, grpo: GRPOSettings, rewards: Rewards, stop_ids: list[int], packing: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(*args, data_collator=keep_prompts, **kwargs)
        self.grpo, self.rewards, self.stop_ids = grpo, rewards, stop_ids
        tokenizer: PreTrainedTokenizerBase = self.processing_class
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        self.collate = PackingCollator() if packing else PaddingCollator(self.pad_id)
        self.share_prompts = self._shares_prompts(packing)
        self._samples: dict[str, Any] | None = None
        """The current cycle's samples: step, prompt keys, per micro-batch sequences and log-probs, metrics."""
        self._loss_sums: torch.Tensor | None = None
        """[answer tokens, clipped tokens, summed KL] over the micro-batches since the last log."""
        self._sample_metrics: list[dict[str, float]] = []

    def _shares_prompts(self, packing: bool) -> bool:
        """Whether a group's answers are packed after one copy of their prompt (GRPOSettings.share_prompts)."""
        attention = getattr(self.model.config, "_attn_implementation", None)
        if self.grpo.share_prompts is None:
            return shares_prompts_by_default(packing, attention, self.args.device.type)
        if self.grpo.share_prompts and not (packing and attention in VARLEN_KEYS):
            raise ConfigError(f"grpo.share_prompts: true needs data.packing: true and attn_implementation "
                              f"{VARLEN_SDPA} (this run: packing {packing}, attention {attention}); "
                              f"leave it out to share prompts wherever they can be shared")
        return self.grpo.share_prompts

    def _get_train_sampler(self, train_dataset: Any = None) -> SequentialSampler:
        # the order is the recipe's: each step's prompts, repeated for its num_iterations steps
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int,
                          device: torch.device) -> tuple[list[dict[str, Any]], torch.Tensor | None]:
        """The step's micro-batches of sampled answers, and the step's answer-token count."""
        prompt_batches = []
        for _ in range(num_batches):
            try:
                prompt_batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not prompt_batches:
            return [], None
        step = self.state.global_step
        cycle_step = step - step % self.grpo.num_iterations
        keys = [[item["index"] for item in batch] for batch in prompt_batches]
        if self._samples is None or self._samples["step"] != cycle_step or self._samples["keys"] != keys:
            self._samples = self.sample_and_score(prompt_batches, cycle_step, keys)
        batches = [self.sample_batch(micro) for micro in self._samples["micro"]]
        tokens = torch.tensor(sum(len(s["answer_ids"]) for micro in self._samples["micro"] for s in micro["sequences"]),
                              device=device)
        if self.accelerator.num_processes > 1:
            tokens = self.accelerator.gather(tokens).sum()
        self._sample_metrics.append(self._samples["metrics"])
        return batches, tokens

    def sample_and_score(self, prompt_batches: list[list[dict[str, Any]]], step: int,
                         keys: list[list[int]]) -> dict[str, Any]:
        """Answer every prompt G times, score and normalize the rewards per group; with
        num_iterations > 1 or beta > 0, the sampling policy's and the reference's log-probs."""
        grpo, group = self.grpo, self.grpo.group_size
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        items = [item for batch in prompt_batches for item in batch]
        prompts = [item["prompt_ids"] for item in items for _ in range(group)]
        first = self.args.process_index * len(items)
        seeds = [answer_seed(self.args.seed, step, first + position, sample)
                 for position in range(len(items)) for sample in range(group)]
        start = time.perf_counter()
        # Sampled through the adapter merged into a copy of the weights: one matmul a layer, and the
        # base weights untouched (sft.modeling.lora.merged_weights)
        with self.compute_loss_context_manager(), merged_weights(model):
            sampled = sample_answers(model, self.processing_class, prompts, seeds, grpo.max_answer_tokens,
                                     self.stop_ids, grpo.temperature, grpo.top_p, grpo.generation_batch_size)
        seconds = time.perf_counter() - start
        answers = [list(answer.token_ids) for answer in sampled]
        scores = self.rewards([item["index"] for item in items for _ in range(group)], [a.text for a in sampled])
        advantages = group_advantages(torch.tensor(scores.rewards, dtype=torch.float64).view(-1, group),
                                      grpo.scale_rewards).flatten().tolist()
        micro, offset = [], 0
        for batch in prompt_batches:
            count = len(batch) * group
            micro.append({"sequences": [{"prompt_ids": prompts[i], "answer_ids": answers[i], "advantage": advantages[i]}
                                        for i in range(offset, offset + count)]})
            offset += count
        if grpo.num_iterations > 1 or grpo.beta:
            with torch.no_grad(), self.compute_loss_context_manager():
                for samples in micro:
                    batch = self._prepare_inputs(self.sample_batch(samples))
                    if grpo.num_iterations > 1:
                        samples[OLD_LOGPS] = answer_token_logps(model, batch, None, GRPO_NOT_MODEL_INPUTS).tolist()
                    if grpo.beta:
                        with model.disable_adapter():
                            samples[REFERENCE_LOGPS] = answer_token_logps(model, batch, None,
                                                                          GRPO_NOT_MODEL_INPUTS).tolist()
        model.train(was_training)
        lengths = [len(answer) for answer in answers]
        metrics = {"reward": statistics.fmean(scores.rewards), "reward_std": statistics.pstdev(scores.rewards),
                   "answer_tokens": statistics.fmean(lengths), "sampling_tokens_per_s": sum(lengths) / seconds}
        if scores.passed is not None:
            metrics["pass_rate"] = statistics.fmean(scores.passed)
        return {"step": step, "keys": keys, "micro": micro, "metrics": metrics}

    def sample_batch(self, samples: dict[str, Any]) -> dict[str, Any]:
        """One micro-batch's sequences (prompt masked, answer scored) batched for the loss, with
        each answer token's advantage and, where taken, its old and reference log-probs."""
        sequences = samples["sequences"]
        if self.share_prompts:
            batch = pack_shared_prompts(sequences)
        else:
            batch = self.collate([{"input_ids": s["prompt_ids"] + s["answer_ids"],
                                   "labels": [IGNORE_INDEX] * len(s["prompt_ids"]) + s["answer_ids"]}
                                  for s in sequences])
        lengths = [len(s["answer_ids"]) for s in sequences]
        batch[ADVANTAGES] = per_token(torch.tensor([s["advantage"] for s in sequences], dtype=torch.float32), lengths)
        for key in (OLD_LOGPS, REFERENCE_LOGPS):
            if key in samples:
                batch[key] = torch.tensor(samples[key], dtype=torch.float32)
        return batch

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        logps = answer_token_logps(model, inputs, head, GRPO_NOT_MODEL_INPUTS)
        # one optimizer step per sample: the sampling policy is the current one, the ratio exactly 1
        old = inputs[OLD_LOGPS] if OLD_LOGPS in inputs else logps.detach()
        terms = token_terms(logps, old, inputs[ADVANTAGES], self.grpo.clip_range, self.grpo.beta,
                            inputs.get(REFERENCE_LOGPS))
        loss = dapo_loss(terms.losses, logps.numel() if num_items_in_batch is None else num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices \
                and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages; the count already covers every process
        if model.training:
            self._watch_loss(loss.detach())
            kl = terms.kl.sum() if terms.kl is not None else logps.new_zeros(())
            sums = torch.stack([logps.new_tensor(logps.numel()), terms.clipped.sum().float(), kl.float()]).double()
            self._loss_sums = sums if self._loss_sums is None else self._loss_sums + sums
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the sampling metrics and the clip fraction and KL since the last log to a training log."""
        if "loss" in logs:
            if self._loss_sums is not None:
                sums = self._loss_sums
                if self.accelerator.num_processes > 1:
                    sums = self.accelerator.reduce(sums, reduction="sum")
                tokens, clipped, kl = sums.tolist()
                logs["clip_fraction"] = clipped / max(tokens, 1.0)
                if self.grpo.beta:
                    logs["kl"] = kl / max(tokens, 1.0)
            for key in self._sample_metrics[0] if self._sample_metrics else ():
                logs[key] = statistics.fmean(m[key] for m in self._sample_metrics)
            self._loss_sums, self._sample_metrics = None, []
        super().log(logs, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.grpo.num_iterations > 1 and self._samples is not None and self.args.should_save:
            atomic_write_text(Path(output_dir) / SAMPLES_FILE, json.dumps(self._samples))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and (Path(checkpoint) / SAMPLES_FILE).is_file():
            self._samples = json.loads((Path(checkpoint) / SAMPLES_FILE).read_text(encoding="utf-8"))
