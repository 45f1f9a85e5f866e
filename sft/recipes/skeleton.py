"""The one sequence of stages every training method runs; a recipe supplies only what differs.

A recipe (sft.recipes.sft, .dpo, .grpo) subclasses ``Recipe``: it names its command, its
configuration class and the advice its last line gives, and fills in the hooks

- ``check``: what the method cannot run, refused before anything is read or loaded;
- ``encode``: its training and validation data as its trainer takes them, and the data report;
- ``with_reference``: what the loaded base (an SFT adapter folded in, where the run starts from
  one) computes for the data before training, such as DPO's reference log-probabilities;
- ``build_trainer``: its trainer.

The skeleton owns the rest: the command line (the configuration's flags, the method's own,
``--resume``, ``--overwrite-output-dir``), and the stages in this order: setup_runtime,
prepare_output_dir, the tokenizer, encode, the layout line, the LoRA model, the run's copy of its
SFT adapter (sft.recipes.sft_adapter), with_reference, build_trainer, save_run_files,
run_guarded, final_metrics, finish.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback

from sft.config import SFTConfig, StrictArgumentParser, add_config_arguments, config_from_args
from sft.errors import run_command
from sft.recipes.sft_adapter import check_sft_adapter, fold_in, sft_adapter_source, staged_sft_adapter
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


@dataclass
class Encoded:
    """A run's data as its trainer takes it, and what reading and tokenizing did (data_report.json)."""

    train: list[dict]
    val: list[dict]
    report: dict[str, Any]


@dataclass
class TrainingRun:
    trainer: Trainer
    """The trainer, holding the trained PEFT model in memory."""
    metrics: dict[str, Any]
    """Final training metrics, and the last validation metrics of a method that validates."""


class Recipe(ABC):
    """One run of a training method, made from its configuration (checked on the spot)."""

    command: ClassVar[str]
    description: ClassVar[str]
    epilog: ClassVar[str]
    next_step: ClassVar[str]
    """What to do with the adapter, said after the run; ``{output_dir}`` is the run's."""
    config_class: ClassVar[type[SFTConfig]] = SFTConfig
    starts_from: ClassVar[str | None] = None
    """The configuration section whose ``sft_adapter`` the run may start from (None: the base)."""

    def __init__(self, config: SFTConfig) -> None:
        self.config = config
        self.check()
        if self.sft_adapter is not None:
            check_sft_adapter(Path(self.sft_adapter), self.starts_from, self.starts_from.upper())

    @property
    def sft_adapter(self) -> str | None:
        """The SFT run's adapter this run starts from, as configured; None: the base model."""
        return getattr(self.config, self.starts_from).sft_adapter if self.starts_from else None

    @classmethod
    def build_parser(cls) -> argparse.ArgumentParser:
        parser = StrictArgumentParser(prog=cls.command, description=cls.description, epilog=cls.epilog)
        add_config_arguments(parser, cls.config_class, cls.flag_options())
        cls.add_arguments(parser)
        parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                            help="continue from the newest intact checkpoint in --output-dir, or from the given one")
        parser.add_argument("--overwrite-output-dir", action="store_true",
                            help="delete a previous run's files in --output-dir (only those) instead of refusing "
                                 "to start")
        return parser

    @classmethod
    def flag_options(cls) -> dict[str, dict[str, Any]]:
        """Choices and help of some configuration flags, by field name, from a registry the
        configuration does not import (none by default)."""
        return {}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The method's own flags, beside the configuration's (none by default)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Recipe:
        """The run the command line asks for."""
        return cls(config_from_args(args, cls.config_class))

    @classmethod
    def run(cls, config: SFTConfig, resume: str | None = None, overwrite_output_dir: bool = False,
            callbacks: list[TrainerCallback] | None = None, **options: Any) -> TrainingRun:
        """Run one job of this method and save its output (``options``: the method's own, such as GRPO's rewards)."""
        return cls(config, **options).train(resume, overwrite_output_dir, callbacks)

    @classmethod
    def main(cls, argv: list[str] | None = None) -> int:
        """The command: parse the flags, train, and return the exit status (sft.errors.run_command)."""
        args = cls.build_parser().parse_args(argv)
        return run_command(lambda: cls.from_args(args).train(resume=args.resume,
                                                             overwrite_output_dir=args.overwrite_output_dir))

    def check(self) -> None:
        """What this method cannot run, refused before anything is read or loaded (nothing by default)."""

    @abstractmethod
    def encode(self, tokenizer: PreTrainedTokenizerBase, runtime: Runtime) -> Encoded:
        """The run's data as its trainer takes it, and the data report."""

    def describe(self, layout: str) -> str:
        """The layout line (processes, device, global batch) in this method's words."""
        return layout

    def with_reference(self, runtime: Runtime, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                       sft_adapter: Path | None, data: Encoded) -> Encoded:
        """The data with what the reference model (the loaded base, the new adapter not yet trained)
        computes for it before training; unchanged by default."""
        return data

    @abstractmethod
    def build_trainer(self, runtime: Runtime, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                      data: Encoded, resumed: bool, callbacks: list[TrainerCallback] | None) -> Trainer:
        """The trainer of this run."""

    def train(self, resume: str | None = None, overwrite_output_dir: bool = False,
              callbacks: list[TrainerCallback] | None = None) -> TrainingRun:
        """Run the job and save its output."""
        config, output_dir = self.config, self.config.training.output_dir
        with setup_runtime(config) as runtime:  # holds the output directory's lock until the run ends
            checkpoint = prepare_output_dir(config, runtime, resume, overwrite_output_dir)
            source = sft_adapter_source(self.sft_adapter, output_dir, resumed=checkpoint is not None)
            tokenizer = load_run_tokenizer(config, runtime)
            data = self.encode(tokenizer, runtime)
            runtime.say(self.describe(describe_layout(config, runtime)))
            model = load_lora_model(config, runtime, fold_in(source, config.model.model) if source else None)
            with staged_sft_adapter(output_dir, runtime, source) as sft_adapter:
                data = self.with_reference(runtime, model, tokenizer, sft_adapter, data)
                trainer = self.build_trainer(runtime, model, tokenizer, data, resumed=checkpoint is not None,
                                             callbacks=callbacks)
                save_run_files(config, runtime, data.report)
                metrics = final_metrics(trainer, run_guarded(trainer, checkpoint, config, runtime))
            finish(trainer, metrics, runtime)
            runtime.say(f"Adapter saved to {output_dir}. {self.next_step.format(output_dir=output_dir)}")
            return TrainingRun(trainer, metrics)
