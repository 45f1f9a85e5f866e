"""GRPO training throughput: sft's online GRPO against TRL's GRPOTrainer, in one run.

    python benchmarks/grpo_throughput.py            # bundled model, 4 prompts x 4 answers of 64 tokens, 1 + 3 steps
    python benchmarks/grpo_throughput.py --quick    # a tiny random Llama, 2 prompts x 4 answers of 16 tokens

Every contender trains the same LoRA (r=16, alpha=32, dropout 0, all attention and MLP
projections) of the same model (the bundled SmolLM2-135M-Instruct, loaded by both from the same
local directory) online: at each optimizer step the policy answers each of the step's prompts G
times (temperature 1, no top-k or top-p), the answers are scored, and the adapter learns from the
group-normalized rewards with the clipped token-level loss (DAPO's normalization, TRL's default
``loss_type``), without KL (beta 0) unless ``--beta`` says otherwise, with the same learning rate,
prompts per step, answers per micro-batch and precision (our device policy: float32 on CPU),
each in a fresh process so that its peak memory is its own. Generation is each trainer's own:
our batched KV-cache sampler, and transformers' ``generate`` for TRL (no vLLM).

- ``sft``: this project's recipe, built by its stages as ``sft grpo`` builds it (packed prompt +
  answer rows, the head on answer tokens only, fused LoRA projections), decoding all of a step's
  answers in one batch as TRL does (``generation_batch_size`` = prompts x G);
- ``sft_gc``: the same with ``gradient_checkpointing: true``, TRL's default;
- ``sft_copied_prompts``: ``sft`` with ``share_prompts: false``: each answer trained after its own
  copy of the prompt, as TRL trains it (``sft`` on a CPU packs a group's prompt once);
- ``trl``: TRL 1.16 GRPOTrainer with its defaults otherwise (padded batches, gradient
  checkpointing, dynamic KV cache; ``pip install trl==1.16.0``, not a dependency of this project);
- ``trl_no_gc``: the same without gradient checkpointing, as ours runs by default.

Prompts: constraint prompts (IFEval-style checkable instructions appended to the last user turn),
drawn by ``sft constraints``' own code from a prepared SFT file (``--source``; IFEval
decontamination is left out, nothing here is evaluated), or read from ``--prompts``. Those whose
rendered prompt fits ``--max-prompt-tokens`` are kept in file order, as many as the run's steps
take; both trainers see the same prompts at the same steps (TRL's dataset is laid out in our
step order, unshuffled), and the benchmark checks that TRL's prompt token ids equal ours. The
reward is the same verifier for both: the share of a prompt's instructions the answer follows
(strict), by our built-in verifier for sft and by a TRL reward function calling
``sft.rewards.verify.reward`` on the same records.

Answer length: every answer is exactly ``--answer-tokens`` tokens for both, so a step's work does
not depend on when a model happens to stop. TRL is given ``min_new_tokens`` (transformers then
masks the end-of-turn tokens until the budget is reached); our sampler has no such mask, so ours
runs with no stop token and an end-of-turn token it draws is followed by more tokens (trained as
answer tokens, dropped from the text the verifier reads). The work per token is the same; the
rewards differ slightly in meaning and are reported only as a sanity check (a random tiny model
scores near 0, the bundled one well above). ``--stop-at-end-of-turn`` lets both stop at their
turn's end instead: then answer lengths differ and sampled tokens/s is the fair measure.

Timing: a step is the wall-clock from the end of one optimizer step to the end of the next
(our trainer samples before the Trainer's ``on_step_begin``, TRL inside it), so sampling,
rewards and training are all in it; the first ``--warmup`` steps are not counted. Reported per
contender (medians over ``--rounds``, which alternate the contenders): optimizer steps/s and
seconds per step, sampled answer tokens/s over whole steps and over generation alone, CPU
seconds per step (all threads), peak resident memory (peak GPU memory on CUDA), the mean answer
length and the mean reward of every step, and the loss.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTENDERS = ("sft", "sft_gc", "sft_copied_prompts", "trl", "trl_no_gc")
BUNDLED = "smollm2-135m-instruct"
DEFAULT_SOURCE = "data/demo/processed/sft_train.jsonl"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY_ARCH = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 1024, "tie_word_embeddings": False}
"""--quick's model: in a random Llama this small the layers cost next to nothing, so a quick run
measures the trainers' fixed costs and their work over the vocabulary (the bundled tokenizer's
49,152 tokens: the head, sampling), not a model's."""
VERSIONS = ("torch", "transformers", "peft", "trl", "accelerate")


# ----------------------------------------------------------------------------------------- model and prompts
def tiny_model_path() -> str:
    """A random Llama of TINY_ARCH with the bundled model's tokenizer (so its prompts tokenize as
    the bundled model's do), built once into the cache."""
    from sft.modeling.models import cache_root, load_tokenizer, resolve_model_path

    target = cache_root() / "bench" / "grpo-tiny-llama"
    if not (target / "config.json").is_file() or not (target / "tokenizer_config.json").is_file():
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = load_tokenizer(resolve_model_path(BUNDLED))
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **TINY_ARCH, **ids))
        for key, value in ids.items():
            setattr(model.generation_config, key, value)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    return str(target)


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """A prompt's token ids as `sft grpo` encodes it (no configured system prompt)."""
    from sft.data.templates import encode_prompt, render_prompt

    return encode_prompt(tokenizer, render_prompt(tokenizer, messages))


def benchmark_prompts(args: argparse.Namespace, model: str, count: int, out: Path) -> dict[str, Any]:
    """Write the run's ``count`` constraint prompts to ``out``: the first of ``--prompts`` (or of
    the prompts drawn from ``--source``) whose token ids fit ``--max-prompt-tokens``. Returns what
    was read and kept, and the prompts' token lengths."""
    from sft.modeling.models import load_tokenizer
    from sft.rewards.constraints import build, write_records
    from sft.rewards.decontaminate import Decontaminator

    if args.prompts:
        if not Path(args.prompts).is_file():
            raise SystemExit(f"{args.prompts}: no constraint prompts file here (write one with `sft constraints`)")
        records = [json.loads(line) for line in Path(args.prompts).read_text(encoding="utf-8").splitlines()
                   if line.strip()]
        origin = args.prompts
    else:
        if not Path(args.source).is_file():
            raise SystemExit(f"{args.source} not found: run `make demo-data` (or pass --source or --prompts)")
        records, _ = build([args.source], Decontaminator([]), seed=args.seed)
        origin = f"sft constraints --source {args.source} --seed {args.seed} (no decontamination)"
    tokenizer = load_tokenizer(model)
    kept, lengths = [], []
    for record in records:
        turns = record["messages"]
        messages = turns[:-1] if turns[-1]["role"] == "assistant" else turns
        length = len(prompt_ids(tokenizer, messages))
        if length <= args.max_prompt_tokens:
            kept.append(record)
            lengths.append(length)
        if len(kept) == count:
            break
    if len(kept) < count:
        raise SystemExit(f"{origin}: only {len(kept)} prompts fit --max-prompt-tokens {args.max_prompt_tokens}, "
                         f"{count} needed")
    write_records(out, kept)
    return {"from": origin, "read": len(records), "used": count, "prompt_tokens_mean": statistics.fmean(lengths),
            "prompt_tokens_max": max(lengths)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------- worker
def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train one contender for warmup + steps optimizer steps and measure it (in its own process)."""
    from throughput import contender_set_up  # beside this script
    from transformers import TrainerCallback

    from sft.config import GRPOConfig, build_config
    from sft.modeling.models import load_tokenizer
    from sft.recipes.grpo import GRPO, step_order
    from sft.training.stages import load_lora_model, load_run_tokenizer

    group, per_step, micro = args.group_size, args.prompts_per_step, args.micro_prompts
    total_steps = args.warmup + args.steps
    output_dir = tempfile.mkdtemp(prefix="bench-grpo-")
    # The sft contenders are configured as `sft grpo` would be, and built by the same stages.
    config = build_config(None, {
        "model": args.model, "device": args.device, "train_file": args.prompts_file,
        "lora_r": args.lora_rank, "lora_alpha": 2 * args.lora_rank, "lora_dropout": 0.0,
        "lora_target_modules": LORA_TARGETS, "batch_size": micro, "gradient_accumulation_steps": per_step // micro,
        "learning_rate": args.learning_rate, "lr_scheduler_type": "constant", "warmup_ratio": 0.0,
        "max_steps": total_steps, "logging_steps": 1, "save_steps": total_steps + 1, "seed": args.seed,
        "output_dir": output_dir, "max_seq_length": args.max_prompt_tokens + args.answer_tokens,
        "group_size": group, "max_answer_tokens": args.answer_tokens, "generation_batch_size": per_step * group,
        "temperature": 1.0, "top_p": 1.0, "beta": args.beta, "gradient_checkpointing": args.contender == "sft_gc",
        "share_prompts": False if args.contender == "sft_copied_prompts" else None},
        GRPOConfig)
    runtime, policy = contender_set_up(config, args.contender, args.seed)
    ends: list[float] = []
    cpu_ends: list[float] = []

    class StepClock(TrainerCallback):
        """Wall-clock and process CPU time at the start of training and at the end of every
        optimizer step: their differences are whole steps, sampling included wherever a trainer
        does it. On a shared machine the CPU seconds (all threads) show the work done when other
        jobs stretch the wall clock."""

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            _sync(policy.device)
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

        on_step_end = on_train_begin

    sampling_seconds: list[float] = []
    same_prompt_tokens = None
    if args.contender.startswith("sft"):
        recipe = GRPO(config)
        tokenizer = load_run_tokenizer(config, runtime)
        data = recipe.encode(tokenizer, runtime)
        if data.report["train"]["kept"] != data.report["train"]["records"]:
            raise SystemExit(f"sft dropped prompts the benchmark selected: {data.report['train']}")
        model = load_lora_model(config, runtime)
        trainer = recipe.build_trainer(runtime, model, tokenizer, data, resumed=False, callbacks=[StepClock()])
        trainer.args.save_strategy = "no"  # no checkpoint after the last step
        if not args.stop_at_end_of_turn:
            trainer.stop_ids = []  # every answer runs to max_answer_tokens, as TRL's min_new_tokens makes its own
        settings = {"gradient_checkpointing": config.training.gradient_checkpointing, "fused_lora": config.lora.fused,
                    "attention": runtime.attention, "packing": config.data.packing,
                    "generation_batch_size": config.grpo.generation_batch_size,
                    "share_prompts": trainer.share_prompts}
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM
        from trl import GRPOConfig as TRLConfig
        from trl import GRPOTrainer as TRLTrainer

        from sft.rewards.verify import read_constraint_prompts, reward

        prompts = read_constraint_prompts(args.prompts_file)
        by_id = {prompt.id: prompt for prompt in prompts}
        order = step_order([{"index": i} for i in range(len(prompts))], per_step, 1, total_steps, args.seed)
        dataset = Dataset.from_list([{"prompt": prompts[item["index"]].messages, "prompt_id": prompts[item["index"]].id}
                                     for item in order])

        def constraint_reward(completions: list[list[dict[str, str]]], prompt_id: list[str], **_: Any) -> list[float]:
            """The built-in verifier's reward, on the answer text as ours reads it (stripped)."""
            return [reward(by_id[key], completion[0]["content"].strip())
                    for key, completion in zip(prompt_id, completions, strict=True)]

        tokenizer = load_tokenizer(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=policy.load_dtype, attn_implementation="sdpa")
        # TRL's config defaults to bf16, which fails or crawls on CPU: precision comes from our
        # device policy. Batch, group, lengths, sampling, learning rate, beta and the loss are the
        # shared settings; everything else is TRL's default.
        trl_config = TRLConfig(
            output_dir=output_dir, per_device_train_batch_size=micro * group,
            gradient_accumulation_steps=per_step // micro, num_generations=group,
            max_completion_length=args.answer_tokens, temperature=1.0, top_p=1.0, top_k=0,
            generation_kwargs=None if args.stop_at_end_of_turn else {"min_new_tokens": args.answer_tokens},
            learning_rate=args.learning_rate, lr_scheduler_type="constant", beta=args.beta, loss_type="dapo",
            scale_rewards="group", max_steps=total_steps, logging_steps=1, save_strategy="no", report_to="none",
            seed=args.seed, bf16=policy.bf16, fp16=policy.fp16, use_cpu=policy.device == "cpu",
            shuffle_dataset=False, dataloader_pin_memory=False, disable_tqdm=True,
            gradient_checkpointing=args.contender == "trl")
        trainer = TRLTrainer(model=model, reward_funcs=constraint_reward, args=trl_config, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[StepClock()],
                             peft_config=LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                                    target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
        generate = trainer._generate_single_turn
        seen_prompts: list[list[int]] = []

        def timed_generation(prompt_token_ids: list[list[int]], *rest: Any, **kwargs: Any) -> Any:
            """TRL's generation call, timed, with the prompt ids it was given."""
            _sync(policy.device)
            start = time.perf_counter()
            result = generate(prompt_token_ids, *rest, **kwargs)
            _sync(policy.device)
            sampling_seconds.append(time.perf_counter() - start)
            seen_prompts.extend(list(ids) for ids in prompt_token_ids)
            return result

        trainer._generate_single_turn = timed_generation
        settings = {"gradient_checkpointing": trl_config.gradient_checkpointing, "attention": "sdpa",
                    "generation_batch_size": trl_config.generation_batch_size,
                    "generation_kwargs": trl_config.generation_kwargs, "cache_implementation": None}

    if policy.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    answers = per_step * group
    if args.contender.startswith("sft"):
        answer_lengths = [entry["answer_tokens"] for entry in logs]
        sampling_seconds = [length * answers / entry["sampling_tokens_per_s"]
                            for length, entry in zip(answer_lengths, logs, strict=True)]
    else:
        answer_lengths = [entry["completions/mean_length"] for entry in logs]
        expected = [prompt_ids(tokenizer, prompts[item["index"]].messages) for item in order[:total_steps * per_step]
                    for _ in range(group)]
        same_prompt_tokens = seen_prompts == expected
    step_seconds = [b - a for a, b in itertools.pairwise(ends)]
    step_cpu = [b - a for a, b in itertools.pairwise(cpu_ends)]
    timed = slice(args.warmup, total_steps)
    seconds = sum(step_seconds[timed])
    tokens = sum(length * answers for length in answer_lengths[timed])
    return {
        "contender": args.contender, "device": policy.device,
        "dtype": str(policy.compute_dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
        "settings": settings | {"group_size": group, "prompts_per_step": per_step,
                                "answers_per_micro_batch": micro * group, "answer_tokens": args.answer_tokens,
                                "stop_at_end_of_turn": args.stop_at_end_of_turn,
                                "lora": {"r": args.lora_rank, "alpha": 2 * args.lora_rank, "dropout": 0.0,
                                         "target_modules": LORA_TARGETS},
                                "learning_rate": args.learning_rate, "beta": args.beta, "loss": "dapo",
                                "temperature": 1.0, "top_p": 1.0},
        "steps_timed": args.steps, "seconds_per_step": seconds / args.steps, "steps_per_s": args.steps / seconds,
        "sampled_tokens_per_s": tokens / seconds,
        "sampling_only_tokens_per_s": tokens / sum(sampling_seconds[timed]),
        "sampling_share": sum(sampling_seconds[timed]) / seconds,
        "cpu_seconds_per_step": sum(step_cpu[timed]) / args.steps,
        "step_seconds": step_seconds, "step_cpu_seconds": step_cpu, "sampling_seconds": sampling_seconds,
        "answer_tokens": answer_lengths, "rewards": [entry["reward"] for entry in logs],
        "losses": [entry["loss"] for entry in logs], "same_prompt_tokens": same_prompt_tokens,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1024**3 if policy.device.startswith("cuda") else None,
    }


# ----------------------------------------------------------------------------------------- driver
WORKER_FLAGS = ("model", "prompts_file", "steps", "warmup", "group_size", "prompts_per_step", "micro_prompts",
                "answer_tokens", "max_prompt_tokens", "learning_rate", "beta", "lora_rank", "seed", "device")


def run_contender(args: argparse.Namespace, contender: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", contender,
               *[arg for name in WORKER_FLAGS for arg in (f"--{name.replace('_', '-')}", str(getattr(args, name)))],
               *(["--stop-at-end-of-turn"] if args.stop_at_end_of_turn else [])]
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{contender} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


MEDIAN_KEYS = ("seconds_per_step", "steps_per_s", "sampled_tokens_per_s", "sampling_only_tokens_per_s",
               "sampling_share", "cpu_seconds_per_step", "peak_rss_gb")


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first round's result with the medians over rounds of the measured rates and sizes."""
    result = dict(runs[0])
    for key in MEDIAN_KEYS:
        result[key] = statistics.median(run[key] for run in runs)
    if runs[0]["peak_gpu_gb"] is not None:
        result["peak_gpu_gb"] = statistics.median(run["peak_gpu_gb"] for run in runs)
    result["rounds"] = [{key: run[key] for key in (*MEDIAN_KEYS, "rewards", "answer_tokens")} for run in runs]
    return result


def table(results: list[dict[str, Any]]) -> str:
    reference = next((r for r in results if r["contender"] == "trl"),
                     next((r for r in results if r["contender"].startswith("trl")), None))
    gpu = results[0]["peak_gpu_gb"] is not None
    memory = "peak GPU GB" if gpu else "peak RSS GB"
    versus = f" | vs {reference['contender']}: speed | vs {reference['contender']}: memory" if reference else ""
    lines = [(f"| trainer | steps/s | s/step | sampled tok/s | sampling-only tok/s | sampling share | CPU s/step | "
              f"{memory}{versus} | answer tokens | reward per step |"),
             "|---" * (10 + 2 * bool(reference)) + "|"]
    for r in results:
        mem = r["peak_gpu_gb"] if gpu else r["peak_rss_gb"]
        ratios = ""
        if reference:
            ref_mem = reference["peak_gpu_gb"] if gpu else reference["peak_rss_gb"]
            ratios = f" | {r['steps_per_s'] / reference['steps_per_s']:.2f}x | {mem / ref_mem:.2f}x"
        lengths = sorted(set(r["answer_tokens"]))
        length = f"{lengths[0]:g}" if len(lengths) == 1 else f"{statistics.fmean(r['answer_tokens']):.1f} (mean)"
        lines.append(f"| {r['contender']} | {r['steps_per_s']:.3f} | {r['seconds_per_step']:.1f} | "
                     f"{r['sampled_tokens_per_s']:.1f} | {r['sampling_only_tokens_per_s']:.1f} | "
                     f"{100 * r['sampling_share']:.0f}% | {r['cpu_seconds_per_step']:.1f} | {mem:.2f}{ratios} | "
                     f"{length} | {' '.join(f'{value:.3f}' for value in r['rewards'])} |")
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


DEFAULTS = {"steps": 3, "warmup": 1, "rounds": 1, "group_size": 4, "prompts_per_step": 4, "answer_tokens": 64}
QUICK = DEFAULTS | {"steps": 2, "prompts_per_step": 2, "answer_tokens": 16}
"""--quick's run: short, and small enough for a tiny model's step to be the trainers' fixed costs."""


def main() -> int:
    quick_defaults = ", ".join(f"--{key.replace('_', '-')} {value}" for key, value in QUICK.items())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--quick", action="store_true",
                        help="a tiny random Llama (unless --model); defaults of " + quick_defaults)
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated: " + ", ".join(CONTENDERS))
    parser.add_argument("--model", help=f"a model directory with its tokenizer (default: the bundled {BUNDLED}; "
                                        f"with --quick a tiny random Llama with its tokenizer)")
    parser.add_argument("--source", default=DEFAULT_SOURCE,
                        help=f"prepared SFT file whose prompts get instructions (default {DEFAULT_SOURCE}: "
                             f"make demo-data)")
    parser.add_argument("--prompts", metavar="JSONL", help="constraint prompts as `sft constraints` writes them "
                                                           "(instead of drawing them from --source)")
    parser.add_argument("--steps", type=int, help="timed steps (default 3)")
    parser.add_argument("--warmup", type=int, help="untimed first steps (default 1)")
    parser.add_argument("--rounds", type=int, help="alternating rounds of all contenders; medians are reported "
                                                   "(default 1)")
    parser.add_argument("--group-size", type=int, help="answers per prompt, G (default 4)")
    parser.add_argument("--prompts-per-step", type=int, help="prompts per optimizer step (default 4)")
    parser.add_argument("--micro-prompts", type=int,
                        help="prompts per forward pass, each with its G answers (default: all of the step's; "
                             "TRL's per_device_train_batch_size is this x G)")
    parser.add_argument("--answer-tokens", type=int,
                        help="tokens of every answer (default 64; with --stop-at-end-of-turn the most)")
    parser.add_argument("--stop-at-end-of-turn", action="store_true",
                        help="let answers end at the turn's end (lengths then differ between the trainers)")
    parser.add_argument("--max-prompt-tokens", type=int, default=160,
                        help="only prompts of at most this many tokens (default 160)")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.0, help="KL weight, the same for all (default 0: no KL)")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA r; alpha is twice it (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks/results/grpo-throughput.json", help="JSON results file")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.contender = args.worker
        print(json.dumps(run_worker(args)))
        return 0
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.micro_prompts = args.micro_prompts or args.prompts_per_step
    if args.prompts_per_step % args.micro_prompts:
        parser.error("--prompts-per-step must be a multiple of --micro-prompts")
    if args.group_size < 2 or args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("need --group-size >= 2 (TRL's minimum), --steps >= 1, --warmup >= 0, --rounds >= 1")
    contenders = args.contenders.split(",")
    if unknown := sorted(set(contenders) - set(CONTENDERS)):
        parser.error(f"--contenders: unknown {unknown}; known: {', '.join(CONTENDERS)}")

    from sft.modeling.models import resolve_model_path

    args.model = args.model or (tiny_model_path() if args.quick else resolve_model_path(BUNDLED))
    runs: dict[str, list[dict[str, Any]]] = {contender: [] for contender in contenders}
    with tempfile.TemporaryDirectory(prefix="bench-grpo-prompts-") as work:
        args.prompts_file = str(Path(work) / "prompts.jsonl")
        prompts = benchmark_prompts(args, args.model, args.prompts_per_step * (args.warmup + args.steps),
                                    Path(args.prompts_file))
        print(f"{prompts['used']} prompts of {prompts['prompt_tokens_mean']:.0f} tokens on average (at most "
              f"{prompts['prompt_tokens_max']}), {args.group_size} answers of {args.answer_tokens} tokens each, "
              f"{args.prompts_per_step} prompts per step; model {args.model}", flush=True)
        for round_index in range(args.rounds):
            for contender in contenders:
                started = time.perf_counter()
                run = run_contender(args, contender)
                runs[contender].append(run)
                same = run["same_prompt_tokens"]
                print(f"round {round_index + 1}/{args.rounds} {contender}: {run['steps_per_s']:.3f} steps/s, "
                      f"{run['sampled_tokens_per_s']:.1f} sampled tok/s, {run['peak_rss_gb']:.2f} GB peak RSS, "
                      f"answer tokens {run['answer_tokens']}, rewards {[round(r, 3) for r in run['rewards']]}"
                      f"{'' if same is None else f', prompt ids equal ours: {same}'} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
    results = [median_result(runs[contender]) for contender in contenders]
    report = table(results)
    print(f"\n{report}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/grpo_throughput.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "versions": versions(),
        "settings": {key: getattr(args, key) for key in (
            "model", "quick", "group_size", "prompts_per_step", "micro_prompts", "answer_tokens",
            "stop_at_end_of_turn", "max_prompt_tokens", "learning_rate", "beta", "lora_rank", "steps", "warmup",
            "rounds", "seed")},
        "prompts": prompts, "results": results, "table": report}, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
