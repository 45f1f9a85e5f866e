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

from typing import Any

from transformers import PreTrainedTokenizerBase, TrainerCallback

from sft.config import SFTConfig
from sft.data.collate import PackingCollator, PaddingCollator
from sft.data.prepared import read_conversations
from sft.data.tokenize import encode_records
from sft.errors import DataError
from sft.recipes.skeleton import Encoded, Recipe
from sft.training.arguments import training_arguments
from sft.training.stages import Runtime
from sft.training.trainer import SupervisedTrainer


class SFT(Recipe):
    """Supervised fine-tuning: every prompt token masked out of the loss."""

    command = "python -m sft.train_sft"
    description = "Train LoRA adapters on prepared instruction data (prompt tokens masked out of the loss)."
    epilog = "Example: python -m sft.train_sft --config configs/demo.yaml --max-steps 2"
    next_step = "Evaluate it with: python -m sft.sft_test --output-dir {output_dir}"

    def encode(self, tokenizer: PreTrainedTokenizerBase, runtime: Runtime) -> Encoded:
        """Token ids and label masks of the training and validation sets, and what happened to each record."""
        data = self.config.data
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
        return Encoded(train_set, val_set, {"train": train_stats.as_dict(), "val": val_stats.as_dict()})

    def build_trainer(self, runtime: Runtime, model: Any, tokenizer: PreTrainedTokenizerBase, data: Encoded,
                      resumed: bool, callbacks: list[TrainerCallback] | None) -> SupervisedTrainer:
        return build_trainer(self.config, runtime, model, tokenizer, data.train, data.val, resumed=resumed,
                             callbacks=callbacks)


def build_trainer(config: SFTConfig, runtime: Runtime, model: Any, tokenizer: PreTrainedTokenizerBase,
                  train_set: list[dict], val_set: list[dict], resumed: bool = False,
                  callbacks: list[TrainerCallback] | None = None, **argument_overrides: Any) -> SupervisedTrainer:
    """The trainer of an SFT run (the throughput benchmark builds its contender here too)."""
    args = training_arguments(config, runtime.policy, evaluate=bool(val_set), resumed=resumed,
                              **argument_overrides)
    collator = PackingCollator() if config.data.packing else PaddingCollator(tokenizer.pad_token_id)
    return SupervisedTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set or None,
                             data_collator=collator, processing_class=tokenizer, callbacks=callbacks)


main, train = SFT.main, SFT.run  # the command; one run from a configuration, in code

if __name__ == "__main__":
    raise SystemExit(main())
