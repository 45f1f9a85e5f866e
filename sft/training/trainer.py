"""transformers.Trainer with the loss computed over supervised positions only.

Everything else (optimizer, schedule, checkpoints, resume, logging, evaluation loop, DDP/FSDP
through accelerate) is the stock Trainer's. The loss of a micro-batch is the sum of the
cross-entropies of its answer tokens divided by ``num_items_in_batch``: the Trainer counts the
supervised tokens of all micro-batches of one optimizer step (and, with several processes, of all
processes), so gradient accumulation and data parallelism give the same gradient as one large batch.

Evaluation is ours too: the validation loss is the mean over all supervised tokens of the
validation set (not a mean of per-batch means), each example counted once whatever the number of
processes, so it equals what ``sft_test`` reports and does not change with the batch size or the
number of GPUs.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from sft.errors import NonFiniteLossError
from sft.training.loss import supervised_forward

STAGING_DIR = ".checkpoint-staging"




class SupervisedTrainer(Trainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Our compute_loss normalizes by num_items_in_batch itself: make the Trainer count the
        # tokens across accumulation steps and processes, and not divide the loss again.
        self.model_accepts_loss_kwargs = True
        self._staging_dir: str | None = None

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        nll_sum, n_supervised, outputs = supervised_forward(model, inputs, head, self.is_fsdp_enabled)
        if num_items_in_batch is None:  # outside training (Trainer.predict): this batch alone
            loss = nll_sum / n_supervised.clamp(min=1)
        else:
            loss = nll_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                # DDP averages gradients over processes; num_items_in_batch already counts all of
                # their tokens, so undo the average.
                loss = loss * self.accelerator.num_processes
        if model.training and not math.isfinite(value := float(nll_sum.detach())):
            raise NonFiniteLossError(
                f"the training loss is {value} at step {self.state.global_step + 1}. Likely causes: a "
                f"learning rate too high for this model (try a tenth), float16 on a device that cannot train "
                f"in it (use float32 on MPS and CPU), or corrupt weights. Checkpoints saved before this "
                f"step are intact; resume from one with a lower --learning-rate.")
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Token-weighted validation loss. Process r of n takes examples r, r + n, ...; all run
        the same number of forward passes (FSDP needs every process in each one), and the sums of
        negative log-likelihoods and token counts are added across processes."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        start = time.time()
        rank, world = self.args.process_index, self.args.world_size
        shard = list(range(rank, len(dataset), world))
        size = self.args.per_device_eval_batch_size
        steps = math.ceil(math.ceil(len(dataset) / world) / size)  # the largest shard's batch count
        batches = [shard[i:i + size] for i in range(0, len(shard), size)]
        model = self.model_wrapped
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        with torch.no_grad():
            for step in tqdm(range(steps), desc="evaluating", leave=False, disable=not self.is_local_process_zero()
                             or self.args.disable_tqdm):
                counted = step < len(batches)
                indices = batches[step] if counted else (batches[0] if batches else [0])  # a pass to keep step
                inputs = self._prepare_inputs(self.data_collator([dataset[i] for i in indices]))
                with self.compute_loss_context_manager():
                    nll_sum, n_supervised, _ = supervised_forward(model, inputs, head, self.is_fsdp_enabled)
                if counted:
                    totals += torch.stack([nll_sum.double(), n_supervised.double()])
        model.train(was_training)
        if world > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        nll, tokens = totals.tolist()
        metrics = {f"{metric_key_prefix}_loss": nll / max(tokens, 1.0),
                   f"{metric_key_prefix}_tokens": int(tokens),
                   f"{metric_key_prefix}_runtime": round(time.time() - start, 4)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Write checkpoint-N under a staging directory, then rename it into place, so a run
        killed while saving never leaves a half-written checkpoint-N for --resume to pick."""
        run_dir = Path(self.args.output_dir)
        staging = run_dir / STAGING_DIR
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every process has written its files (RNG states)
        if self.args.should_save:
            shutil.rmtree(run_dir / name, ignore_errors=True)
            os.replace(staging / name, run_dir / name)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=None, use_mtime=False)
