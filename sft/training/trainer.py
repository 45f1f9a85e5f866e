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
import secrets
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sft.errors import ConfigError, NonFiniteLossError
from sft.files import fsync_directory, fsync_tree
from sft.modeling.fingerprint import base_fingerprint, write_adapter_origin
from sft.outputs import Manifest
from sft.training.checkpoints import (
    STAGING_DIR,
    latest_complete_checkpoint,
    rotate_checkpoints,
    write_checkpoint_record,
)
from sft.training.loss import supervised_forward, supervised_totals


class SupervisedTrainer(Trainer):
    METHOD = "sft"
    """What trained the adapter, recorded beside it (sft.modeling.fingerprint)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Read now, before a launcher shards the weights; the embeddings never change in training.
        self._base_fingerprint = base_fingerprint(self.accelerator.unwrap_model(self.model), self.processing_class)
        # Our compute_loss normalizes by num_items_in_batch itself: make the Trainer count the
        # tokens across accumulation steps and processes, and not divide the loss again.
        self.model_accepts_loss_kwargs = True
        self._staging_dir: str | None = None
        self._staging_name_chosen: str | None = None
        # The first optimizer step whose loss was not finite, 0 while all were. Kept on the device
        # and read only when the Trainer logs or saves: reading it every micro-step would be a
        # host-device sync each time.
        self._first_nonfinite_step: torch.Tensor | None = None
        self.run_identity: dict[str, Any] | None = None
        """What each checkpoint records of the run and its history (sft.training.identity; set by
        stages.run_guarded): --resume compares it and picks the checkpoint written last by it."""

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
        if model.training:
            self._watch_loss(nll_sum.detach())
        return (loss, outputs) if return_outputs else loss

    def _watch_loss(self, nll_sum: torch.Tensor) -> None:
        step = self.state.global_step + 1
        if self._first_nonfinite_step is None:
            self._first_nonfinite_step = torch.zeros((), dtype=torch.long, device=nll_sum.device)
        first = self._first_nonfinite_step
        self._first_nonfinite_step = torch.where((first == 0) & ~torch.isfinite(nll_sum), step, first)
        if nll_sum.device.type == "cpu":  # no sync to avoid: stop at once
            self.check_loss_finite()

    def check_loss_finite(self) -> None:
        """Raise if a training loss so far was NaN or infinite, naming the first such step."""
        if self._first_nonfinite_step is None or not (step := int(self._first_nonfinite_step)):
            return
        good = latest_complete_checkpoint(Path(self.args.output_dir))  # a diverged step is never saved
        lower = f"--learning-rate {self.args.learning_rate / 10:g}"
        advice = (f"continue from the last checkpoint saved before it with a lower learning rate (a resumed run may "
                  f"change it): the same command plus --resume {good} {lower}" if good is not None else
                  f"no checkpoint was saved before it: start again with a lower learning rate ({lower})")
        raise NonFiniteLossError(
            f"the training loss is not finite at step {step}. Likely causes: a learning rate too high for this "
            f"model (try a tenth), float16 on a device that cannot train in it (use float32 on MPS and CPU), or "
            f"corrupt weights. To {advice}.")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The saved optimizer and schedule, at the peak learning rate of this run: a resumed run
        may change --learning-rate (the way out of a diverged loss), and the saved states hold the
        old peak, which the Trainer would keep without a word. The schedule continues at the same
        point, scaled to the new peak."""
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate's wrapper
        saved = list(getattr(scheduler, "base_lrs", []))
        peak = self.args.learning_rate
        if checkpoint is None or not saved or all(math.isclose(lr, peak) for lr in saved):
            return
        for group, before in zip(self.optimizer.param_groups, saved, strict=True):
            group["lr"] *= peak / before
            group["initial_lr"] = peak
        scheduler.base_lrs = [peak] * len(saved)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        self.check_loss_finite()
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Validation metrics over the whole set (here the token-weighted loss). Process r of n
        takes examples r, r + n, ...; all run the same number of forward passes (FSDP needs every
        process in each one), and the sums of evaluation_totals are added across processes."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        start = time.time()
        rank, world = self.args.process_index, self.args.world_size
        shard = list(range(rank, len(dataset), world))
        size = self.args.per_device_eval_batch_size
        steps = math.ceil(math.ceil(len(dataset) / world) / size)  # the largest shard's batch count
        batches = [shard[i:i + size] for i in range(0, len(shard), size)]
        model = self.model_wrapped
        was_training = model.training
        model.eval()

        def passes() -> Any:
            for step in tqdm(range(steps), desc="evaluating", leave=False,
                             disable=not self.is_local_process_zero() or self.args.disable_tqdm):
                counted = step < len(batches)
                indices = batches[step] if counted else (batches[0] if batches else [0])  # a pass to keep step
                yield self._prepare_inputs(self.data_collator([dataset[i] for i in indices])), counted

        with self.compute_loss_context_manager():
            totals = self.evaluation_totals(model, passes()).to(self.args.device)
        model.train(was_training)
        if world > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        metrics = self.evaluation_metrics(totals.tolist(), metric_key_prefix)
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def evaluation_totals(self, model: torch.nn.Module, passes: Iterable[tuple[dict[str, Any], bool]]) -> torch.Tensor:
        """The sums a validation metric is made of, over ``passes`` (batches, each with whether it
        counts): here the negative log-likelihood and the supervised tokens. A recipe's trainer
        overrides this and evaluation_metrics; the sharding and reduction stay evaluate()'s."""
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        return supervised_totals(model, passes, head, self.is_fsdp_enabled)

    def evaluation_metrics(self, totals: list[float], metric_key_prefix: str) -> dict[str, float]:
        """The validation metrics from evaluation_totals summed over every process."""
        nll, tokens = totals
        return {f"{metric_key_prefix}_loss": nll / max(tokens, 1.0), f"{metric_key_prefix}_tokens": int(tokens)}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter (the run's or a checkpoint's) with the record of its base and method beside it."""
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            write_adapter_origin(output_dir or self.args.output_dir, self.METHOD, self._base_fingerprint)

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _staging_name(self) -> str:
        """This run's staging folder name, ``.checkpoint-staging-PID-RANDOM`` of the main process,
        the same in every process of the run (the folder is shared; the name is not any other
        run's, so two runs never write into one staging folder)."""
        if self._staging_name_chosen is None:
            name = [f"{STAGING_DIR}-{os.getpid()}-{secrets.token_hex(4)}"]
            if self.accelerator.num_processes > 1:
                broadcast_object_list(name)
            self._staging_name_chosen = name[0]
        return self._staging_name_chosen

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Write checkpoint-N under a staging directory, sync it to disk, then rename it into
        place, so a run killed while saving (or a power cut) never leaves a half-written
        checkpoint-N for --resume to pick. A diverged loss is never saved. The run's manifest
        lists the checkpoint (claimed before the rename, described after it): only what it lists
        is ever replaced or rotated away."""
        self.check_loss_finite()
        run_dir = Path(self.args.output_dir)
        staging = run_dir / self._staging_name()
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_dir = str(staging)
        try:
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging_dir = None
            self.accelerator.wait_for_everyone()  # every process has written its files (RNG states)
            if self.args.should_save:
                if self.run_identity is not None:
                    write_checkpoint_record(staging / name, run_dir, self.run_identity)
                fsync_tree(staging / name)
        except BaseException:  # a full disk, say: the checkpoints before stay, the half-written one goes
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.args.should_save:
            manifest = Manifest.load(run_dir)
            # An older checkpoint of this step (a resume went back) is replaced only if the run wrote it.
            if os.path.lexists(run_dir / name) and (name not in manifest.entries
                                                 or manifest.delete(name, changed_too=True)):
                shutil.rmtree(staging, ignore_errors=True)
                raise ConfigError(f"{run_dir / name} is in the way of this run's checkpoint and was not written "
                                  f"by it (or holds files added since); move it away and run again with --resume")
            manifest.claim(name)
            os.replace(staging / name, run_dir / name)
            fsync_directory(run_dir)
            shutil.rmtree(staging, ignore_errors=True)
            manifest.record(name)
            rotate_checkpoints(run_dir, self.args.save_total_limit)
