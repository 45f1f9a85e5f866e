"""transformers.Trainer with the loss computed over supervised positions only.

Everything else (optimizer, schedule, checkpoints, resume, logging, evaluation loop, DDP/FSDP
through accelerate) is the stock Trainer's. The loss of a micro-batch is the sum of the
cross-entropies of its answer tokens divided by ``num_items_in_batch``: the Trainer counts the
supervised tokens of all micro-batches of one optimizer step (and, with several processes, of all
processes), so gradient accumulation gives the same gradient as one large batch.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from sft.dataset import IGNORE_INDEX
from sft.loss import linear_cross_entropy_sum

_NO_LOGITS = torch.zeros(0, dtype=torch.long)


class SupervisedTrainer(Trainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Our compute_loss normalizes by num_items_in_batch itself: make the Trainer count the
        # tokens across accumulation steps and processes, and not divide the loss again.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        inputs = dict(inputs)
        inputs.pop("labels", None)
        shift_labels = inputs.pop("shift_labels")
        # The head runs below on supervised positions only: ask the model for no logits at all,
        # and take its final (normed) hidden states instead.
        outputs = model(**inputs, output_hidden_states=True, use_cache=False,
                        logits_to_keep=_NO_LOGITS.to(shift_labels.device))
        supervised = shift_labels != IGNORE_INDEX
        hidden = outputs.hidden_states[-1][supervised]
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        nll_sum = linear_cross_entropy_sum(hidden, head.weight, shift_labels[supervised])
        if num_items_in_batch is None:  # evaluation: this batch alone
            loss = nll_sum / supervised.sum().clamp(min=1)
        else:
            loss = nll_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                # DDP averages gradients over processes; num_items_in_batch already counts all of
                # their tokens, so undo the average.
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss
