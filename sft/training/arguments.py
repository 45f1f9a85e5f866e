"""A run's configuration -> transformers.TrainingArguments: the one place the two meet.

Training recipes and the throughput benchmark build their arguments here, so the benchmark's
``sft`` contender runs with exactly the settings ``sft train`` uses.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainingArguments

from sft.config import SFTConfig
from sft.modeling.devices import DevicePolicy


def training_arguments(config: SFTConfig, policy: DevicePolicy, evaluate: bool, resumed: bool = False,
                       **overrides: Any) -> TrainingArguments:
    """TrainingArguments of a run on ``policy``'s device; ``evaluate`` when there is a validation
    set; ``resumed`` skips the evaluation at the start (done when the run first started)."""
    t = config.training
    settings: dict[str, Any] = dict(
        output_dir=t.output_dir,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5 reads a float in [0, 1) as a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps,
        eval_on_start=evaluate and not resumed,
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
    settings.update(overrides)
    return TrainingArguments(**settings)
