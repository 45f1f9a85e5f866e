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
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback

from sft.config import GRPOConfig, config_from_args
from sft.data.grpo_prompts import read_prompt_records
from sft.data.templates import encode_prompt, end_of_turn_ids, render_prompt, with_system_prompt
from sft.errors import ConfigError, DataError
from sft.recipes.skeleton import Encoded, Recipe
from sft.training.arguments import training_arguments
from sft.training.grpo_rewards import Rewards, load_reward_function
from sft.training.grpo_trainer import GRPOTrainer
from sft.training.stages import Runtime


class GRPO(Recipe):
    """Online reinforcement learning from verifiable rewards; ``rewards`` name the user's reward
    functions, loaded with the prompts file before the run starts."""

    command = "sft grpo"
    description = "Train a LoRA adapter online with GRPO: sampled answers, verifiable rewards."
    epilog = ("Example: sft grpo --train-file data/constraints/train.jsonl --group-size 4 --max-steps 50 "
              "--output-dir models/grpo --reward mypkg.rewards:length_penalty")
    next_step = "Score it on IFEval with: sft ifeval --adapter {output_dir}"
    config_class = GRPOConfig
    starts_from = "grpo"

    def __init__(self, config: GRPOConfig, rewards: list[str] | None = None) -> None:
        super().__init__(config)
        self.functions = {spec: load_reward_function(spec) for spec in rewards or []}
        self.records, checks = read_prompt_records(config.data.train_file, config.grpo.verifier)
        self.rewards = Rewards(self.records, checks, self.functions)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--reward", action="append", default=[], metavar="MODULE:FUNCTION",
                            help="a reward function of yours, called as fn(prompts, completions, records) -> one "
                                 "number per completion, added to the verifier's; repeat for several. Only ever "
                                 "taken from the command line (it runs that code)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GRPO:
        return cls(config_from_args(args, GRPOConfig), args.reward)

    def check(self) -> None:
        config = self.config
        if config.training.group_by_length:
            raise ConfigError("training.group_by_length: not used by GRPO, whose answers are sampled each step; "
                              "set it to false")
        if config.grpo.max_answer_tokens >= config.data.max_seq_length:
            raise ConfigError(f"grpo.max_answer_tokens: {config.grpo.max_answer_tokens} leaves no room for a prompt "
                              f"within data.max_seq_length={config.data.max_seq_length}")

    def encode(self, tokenizer: PreTrainedTokenizerBase, runtime: Runtime) -> Encoded:
        """Each record's prompt ids, as generation sees them; a prompt that leaves no room for a
        full answer within max_seq_length is dropped and counted. Refused when fewer prompts are
        left than one optimizer step takes (before the model loads)."""
        config = self.config
        limit = config.data.max_seq_length - config.grpo.max_answer_tokens
        prompts, too_long = [], 0
        for index, record in enumerate(self.records):
            ids = encode_prompt(tokenizer, render_prompt(tokenizer, with_system_prompt(record["messages"],
                                                                                       config.data.system_prompt)))
            if len(ids) > limit:
                too_long += 1
            else:
                prompts.append({"index": index, "prompt_ids": ids})
        runtime.say(f"train: {len(prompts)} prompts ({too_long} dropped: longer than max_seq_length - "
                    f"max_answer_tokens = {limit} tokens)")
        prompts_per_step(config, runtime, len(prompts))
        report = {"records": len(self.records), "kept": len(prompts), "dropped_prompt_too_long": too_long}
        return Encoded(prompts, [], {"train": report, "verifier": config.grpo.verifier,
                                     "rewards": list(self.functions)})

    def describe(self, layout: str) -> str:
        return layout.replace("examples per optimizer step",
                              f"prompts per optimizer step, {self.config.grpo.group_size} answers each")

    def build_trainer(self, runtime: Runtime, model: Any, tokenizer: PreTrainedTokenizerBase, data: Encoded,
                      resumed: bool, callbacks: list[TrainerCallback] | None) -> GRPOTrainer:
        """The trainer of a GRPO run, its dataset the prompts in step order."""
        t, grpo = self.config.training, self.config.grpo
        per_step = prompts_per_step(self.config, runtime, len(data.train))
        steps = t.max_steps if t.max_steps > 0 else 1  # by epochs: one shuffle, which the Trainer repeats
        order = step_order(data.train, per_step, grpo.num_iterations, steps, t.seed)
        args = training_arguments(self.config, runtime.policy, evaluate=False, resumed=resumed)
        return GRPOTrainer(model=model, args=args, train_dataset=order, processing_class=tokenizer,
                           callbacks=callbacks, grpo=grpo, rewards=self.rewards, stop_ids=end_of_turn_ids(tokenizer),
                           packing=self.config.data.packing)


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


main, train = GRPO.main, GRPO.run  # the command; one run from a configuration, in code

if __name__ == "__main__":
    raise SystemExit(main())
