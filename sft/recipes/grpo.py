"""`sft grpo`: online reinforcement learning of a LoRA adapter from verifiable rewards (GRPO).

Reads a prompts file (prepared conversations; a final assistant turn is left out; for the
built-in verifier each line carries IFEval's ``instruction_id_list`` and ``kwargs``). At every
optimizer step the policy (base + the adapter being trained) answers each of the step's prompts
G times, sampled with temperature and top-p on this machine (no vLLM, no server), the answers are
scored (the built-in verifier: the share of a record's instructions followed, strict; plus any
``--reward MODULE:FUNCTION`` of yours), the rewards are normalized within each prompt's group,
and the clipped token-level objective (DAPO's normalization) trains the adapter on the packed
prompt + answer sequences through the supervised-only head. Output, checkpoints, resume and
interrupts are the shared training stages': Trainer-style, as ``sft train`` and ``sft dpo``.

With ``--sft-adapter DIR`` the run starts from an SFT run as ``sft dpo`` does: that adapter is
merged into the base, the merged model is the reference (``--beta``), and a new adapter is
trained on top. ``--batch-size`` counts prompts per micro-batch; each brings G answers.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback

from sft.config import GRPOConfig, StrictArgumentParser, add_config_arguments, config_from_args
from sft.data.grpo_prompts import read_prompt_records
from sft.data.templates import encode_prompt, end_of_turn_ids, render_prompt, with_system_prompt
from sft.errors import ConfigError, DataError, run_command
from sft.recipes.dpo import check_sft_adapter, drop_unused_sft_adapter, fold_in, sft_adapter_source, stage_sft_adapter
from sft.training.arguments import training_arguments
from sft.training.grpo_rewards import Rewards, load_reward_function
from sft.training.grpo_trainer import GRPOTrainer
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
        prog="sft grpo",
        description="Train a LoRA adapter online with GRPO: sampled answers, verifiable rewards.",
        epilog="Example: sft grpo --train-file data/constraints/train.jsonl --group-size 4 --max-steps 50 "
               "--output-dir models/grpo --reward mypkg.rewards:length_penalty")
    add_config_arguments(parser, GRPOConfig)
    parser.add_argument("--reward", action="append", default=[], metavar="MODULE:FUNCTION",
                        help="a reward function of yours, called as fn(prompts, completions, records) -> one number "
                             "per completion, added to the verifier's; repeat for several. Only ever taken from "
                             "the command line (it runs that code)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="continue from the newest intact checkpoint in --output-dir, or from the given one")
    parser.add_argument("--overwrite-output-dir", action="store_true",
                        help="delete a previous run's files in --output-dir (only those) instead of refusing to start")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: train(config_from_args(args, GRPOConfig), rewards=args.reward, resume=args.resume,
                                     overwrite_output_dir=args.overwrite_output_dir))


@dataclass
class TrainingRun:
    trainer: GRPOTrainer
    """The trainer, holding the trained PEFT model in memory."""
    metrics: dict[str, Any]
    """Final training metrics."""


def check_grpo_config(config: GRPOConfig) -> None:
    """What this recipe cannot run, refused before anything is read or loaded."""
    if config.training.group_by_length:
        raise ConfigError("training.group_by_length: not used by GRPO, whose answers are sampled each step; "
                          "set it to false")
    if config.grpo.max_answer_tokens >= config.data.max_seq_length:
        raise ConfigError(f"grpo.max_answer_tokens: {config.grpo.max_answer_tokens} leaves no room for a prompt "
                          f"within data.max_seq_length={config.data.max_seq_length}")
    if config.grpo.sft_adapter is not None:
        check_sft_adapter(Path(config.grpo.sft_adapter), "grpo", "GRPO")


def encode_prompts(config: GRPOConfig, tokenizer: PreTrainedTokenizerBase, records: list[dict[str, Any]],
                   runtime: Runtime) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each record's prompt ids, as generation sees them; a prompt that leaves no room for a
    full answer within max_seq_length is dropped and counted."""
    limit = config.data.max_seq_length - config.grpo.max_answer_tokens
    prompts, too_long = [], 0
    for index, record in enumerate(records):
        ids = encode_prompt(tokenizer, render_prompt(tokenizer, with_system_prompt(record["messages"],
                                                                                   config.data.system_prompt)))
        if len(ids) > limit:
            too_long += 1
        else:
            prompts.append({"index": index, "prompt_ids": ids})
    report = {"records": len(records), "kept": len(prompts), "dropped_prompt_too_long": too_long}
    runtime.say(f"train: {len(prompts)} prompts ({too_long} dropped: longer than max_seq_length - max_answer_tokens "
                f"= {limit} tokens)")
    return prompts, report


def step_order(prompts: list[dict[str, Any]], per_step: int, num_iterations: int, steps: int,
               seed: int) -> list[dict[str, Any]]:
    """The prompts in the order the optimizer steps take them: a seeded shuffle, cut into steps of
    ``per_step`` prompts (the remainder waits for the next shuffle), each step's prompts repeated
    for its ``num_iterations`` steps; shuffles follow each other until ``steps`` steps are covered.
    A longer run's order starts with a shorter one's, so a resume that raises max_steps sees the
    same prompts at the same steps."""
    order: list[dict[str, Any]] = []
    shuffle = 0
    while len(order) < steps * per_step:
        generator = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}/{shuffle}".encode()).hexdigest()[:8], 16))
        permutation = torch.randperm(len(prompts), generator=generator).tolist()
        for start in range(0, len(prompts) - per_step + 1, per_step):
            order += [prompts[i] for i in permutation[start:start + per_step]] * num_iterations
        shuffle += 1
    return order


def prompts_per_step(config: GRPOConfig, runtime: Runtime, usable: int) -> int:
    """Prompts one optimizer step takes, all processes together; refused when there are fewer."""
    t = config.training
    per_step = t.batch_size * t.gradient_accumulation_steps * runtime.state.num_processes
    if usable < per_step:
        raise DataError(f"{config.data.train_file}: {usable} usable prompts, fewer than the {per_step} one "
                        f"optimizer step takes (batch_size x gradient_accumulation_steps x processes); lower "
                        f"--batch-size or --gradient-accumulation-steps")
    return per_step


def build_trainer(config: GRPOConfig, runtime: Runtime, model: Any, tokenizer: PreTrainedTokenizerBase,
                  prompts: list[dict[str, Any]], rewards: Rewards, resumed: bool = False,
                  callbacks: list[TrainerCallback] | None = None, **argument_overrides: Any) -> GRPOTrainer:
    """The trainer of a GRPO run, its dataset the prompts in step order."""
    t, grpo = config.training, config.grpo
    per_step = prompts_per_step(config, runtime, len(prompts))
    steps = t.max_steps if t.max_steps > 0 else 1  # by epochs: one shuffle, which the Trainer repeats
    order = step_order(prompts, per_step, grpo.num_iterations, steps, t.seed)
    args = training_arguments(config, runtime.policy, evaluate=False, resumed=resumed, **argument_overrides)
    return GRPOTrainer(model=model, args=args, train_dataset=order, processing_class=tokenizer, callbacks=callbacks,
                       grpo=grpo, rewards=rewards, stop_ids=end_of_turn_ids(tokenizer), packing=config.data.packing)


def train(config: GRPOConfig, rewards: list[str] | None = None, resume: str | None = None,
          overwrite_output_dir: bool = False, callbacks: list[TrainerCallback] | None = None) -> TrainingRun:
    """Run one GRPO job and save its output; ``rewards`` name the user's reward functions."""
    check_grpo_config(config)
    functions = {spec: load_reward_function(spec) for spec in rewards or []}
    records, checks = read_prompt_records(config.data.train_file, config.grpo.verifier)
    scorer = Rewards(records, checks, functions)
    with setup_runtime(config) as runtime:  # holds the output directory's lock until the run ends
        checkpoint = prepare_output_dir(config, runtime, resume, overwrite_output_dir)
        output_dir = config.training.output_dir
        source = sft_adapter_source(config.grpo.sft_adapter, output_dir, resumed=checkpoint is not None)
        tokenizer = load_run_tokenizer(config, runtime)
        prompts, report = encode_prompts(config, tokenizer, records, runtime)
        prompts_per_step(config, runtime, len(prompts))  # before the model loads
        runtime.say(describe_layout(config, runtime).replace("examples per optimizer step",
                                                             f"prompts per optimizer step, {config.grpo.group_size} "
                                                             f"answers each"))
        model = load_lora_model(config, runtime, fold_in(source, config.model.model) if source else None)
        sft_adapter = stage_sft_adapter(output_dir, runtime, source)
        try:
            trainer = build_trainer(config, runtime, model, tokenizer, prompts, scorer,
                                    resumed=checkpoint is not None, callbacks=callbacks)
            save_run_files(config, runtime, {"train": report, "verifier": config.grpo.verifier,
                                             "rewards": list(functions)})
            metrics = final_metrics(trainer, run_guarded(trainer, checkpoint, config, runtime))
        except BaseException:
            drop_unused_sft_adapter(output_dir, runtime, sft_adapter, source)
            raise
        finish(trainer, metrics, runtime)
        runtime.say(f"Adapter saved to {config.training.output_dir}. Score it on IFEval with: "
                    f"sft ifeval --adapter {config.training.output_dir}")
        return TrainingRun(trainer, metrics)


if __name__ == "__main__":
    raise SystemExit(main())
