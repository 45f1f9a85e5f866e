"""The SFT trainer with a preference loss: pairs (or unpaired examples) in, their metrics logged every step.

Everything but the loss is SupervisedTrainer's (and so the stock Trainer's): optimizer, schedule,
staged checkpoints, resume, the non-finite-loss stop, multi-process training through accelerate.
Each micro-batch's loss is the mean over its records of the per-record loss of the run's
``loss_type`` (sft.training.preference.losses), which the Trainer divides by the accumulation
steps, as TRL's DPOTrainer does; the reference log-probabilities, for a loss that needs them,
travel with the records (computed once before training, sft.training.reference), so a step runs
one forward and one backward pass of the trained model and nothing else.

The metrics (``rewards/*``, ``logps/*``, KTO's ``kl``) are added up on the device over the
micro-batches since the last log, and read once per log: reading them each micro-step would sync
the device each time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from sft.config.dpo import DPOSettings
from sft.training.preference.logps import scored_batch
from sft.training.preference.losses import preference_loss
from sft.training.preference.metrics import metric_means, metric_names, metric_totals
from sft.training.trainer import SupervisedTrainer


class PreferenceTrainer(SupervisedTrainer):
    METHOD = "dpo"
    loss_is_scaled_for_ga = False
    """compute_loss returns a mean over the micro-batch's records: the Trainer divides it by the accumulation steps."""

    def __init__(self, *args: Any, dpo: DPOSettings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Nothing to count per token: the loss is a mean over records.
        self.model_accepts_loss_kwargs = False
        self.dpo = dpo
        self.loss = preference_loss(dpo.loss_type)
        self.metric_names = metric_names(self.loss)
        self._logged_sums: torch.Tensor | None = None
        """[records, summed loss, then each metric's sum and count] over the micro-batches since the last log."""

    def pair_sums(self, model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-record losses of a batch, and [records, summed loss, then each metric's sum and count]."""
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        scored = scored_batch(model, inputs, head)
        losses = self.loss.losses(scored, self.dpo)
        count = torch.tensor([len(losses)], dtype=torch.float64, device=losses.device)
        metrics = metric_totals(scored, self.loss.rewards(scored, self.dpo))
        return losses, torch.cat([count, losses.detach().sum().double()[None], metrics])

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        losses, sums = self.pair_sums(model, inputs)
        loss = losses.mean()
        if model.training:
            self._watch_loss(loss.detach())
            self._logged_sums = sums if self._logged_sums is None else self._logged_sums + sums
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the means of the metrics since the last log to a training log."""
        if "loss" in logs and self._logged_sums is not None:
            sums = self._logged_sums
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            logs.update(self._means(sums.tolist()))
            self._logged_sums = None
        super().log(logs, *args, **kwargs)

    def evaluation_totals(self, model: torch.nn.Module, passes: Iterable[tuple[dict[str, Any], bool]]) -> torch.Tensor:
        """[records, summed loss, then each metric's sum and count] over the validation batches that count."""
        with torch.no_grad():
            return sum(self.pair_sums(model, inputs)[1] * counted for inputs, counted in passes)

    def evaluation_metrics(self, totals: list[float], metric_key_prefix: str) -> dict[str, float]:
        """The mean loss and metrics over the validation records."""
        return {f"{metric_key_prefix}_{name}": value for name, value in self._means(totals, with_loss=True).items()}

    def _means(self, totals: list[float], with_loss: bool = False) -> dict[str, float]:
        """{name: mean} from [records, summed loss, then each metric's sum and count]."""
        records, loss, *metrics = totals
        return ({"loss": loss / max(records, 1.0)} if with_loss else {}) | metric_means(metrics, self.metric_names)
