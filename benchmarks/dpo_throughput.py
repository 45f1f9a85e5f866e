"""DPO training throughput: sft's preference trainer against TRL's DPOTrainer, in one run.

    python benchmarks/dpo_throughput.py            # bundled model, 8 pairs per step, 1 warm-up + 3 timed steps
    python benchmarks/dpo_throughput.py --quick    # max length 512, 1 warm-up + 1 timed step

Both contenders train the same LoRA (r=16, alpha=32, all attention and MLP projections) of the
bundled SmolLM2-135M-Instruct on the same preference pairs (LLaMA-Factory's dpo_en_demo, prepared
as ``make demo-dpo`` does), in file order, with the same pairs per optimizer step, learning rate,
beta and maximum length (TRL's default, 1024), and the precision of our device policy (float32
on CPU, bfloat16 on CUDA), each in a fresh process so that its peak memory is its own:

- ``trl``: TRL 1.16 DPOTrainer with its defaults otherwise: the batch padded, gradient
  checkpointing, dropout disabled, the reference computed at every step by a second forward pass
  with the adapter disabled (``pip install trl==1.16.0``; not a dependency of this project);
- ``sft``: this project's recipe, built by its stages as ``sft dpo`` builds it: each pair's chosen
  and rejected sequence packed into one row, per-sequence attention, the head on answer tokens
  only, the reference log-probabilities computed once before training (timed separately), and
  ``--sft-micro-batch`` pairs per forward pass (gradient accumulation makes up the step);
- ``sft_unfused``: the same with ``lora.fused: false`` (PEFT's LoRA layers one by one);
- ``sft_gc``: the same with ``gradient_checkpointing: true``, which trades speed for memory as
  TRL's default does;
- ``sft_copied_prompts``: ``sft`` with a copy of the prompt before each answer (on a CPU ``sft``
  packs a pair's prompt once, both answers attending to it).

The pairs are those our tokenization keeps (TRL drops the same ones: a prompt that fills the
maximum length); the benchmark checks that TRL's token ids equal ours. Reported: pairs/s and
seconds per timed step, peak resident memory (peak GPU memory on CUDA), the losses of every step
(both ln 2 = 0.6931 at the first: the new adapter starts at zero), and our one-time reference pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTENDERS = ("sft", "sft_unfused", "sft_gc", "sft_copied_prompts", "trl")
DEFAULT_DATA = "data/demo_dpo/processed/dpo_train.jsonl"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def benchmark_pairs(data: Path, count: int, max_length: int, model: str) -> tuple[list[dict], list[dict]]:
    """The first ``count`` pairs of ``data`` that keep an answer token within ``max_length``: as
    read (for TRL) and as our tokenization encodes them."""
    from sft.data.pairs import encode_pair
    from sft.data.prepared import read_preferences
    from sft.modeling.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(model))
    raw, encoded = [], []
    for pair in read_preferences(data):
        ids, _ = encode_pair(tokenizer, pair, max_length, None)
        if ids["chosen_ids"]:
            raw.append(pair)
            encoded.append(ids)
        if len(raw) == count:
            return raw, encoded
    raise SystemExit(f"{data}: only {len(raw)} pairs fit max length {max_length}, {count} needed")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _trl_matches(trainer: Any, encoded: list[dict], max_length: int) -> bool:
    """Whether TRL's sequences (prompt + answer, cut to max_length) are ours, token for token."""
    for row, ours in zip(trainer.train_dataset, encoded, strict=True):
        for side in ("chosen", "rejected"):
            theirs = (row["prompt_ids"] + row[f"{side}_ids"])[:max_length]
            if theirs != ours["prompt_ids"] + ours[f"{side}_ids"]:
                return False
    return True


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train one contender for warmup + steps steps and measure it (runs in its own process)."""
    from peft import LoraConfig
    from throughput import contender_set_up  # beside this script
    from transformers import AutoModelForCausalLM, TrainerCallback

    from sft.config import DPOConfig, build_config
    from sft.modeling.models import load_tokenizer, resolve_model_path
    from sft.recipes.dpo import build_trainer, pair_collator, with_reference_logps
    from sft.training.stages import load_lora_model

    total_steps = args.warmup + args.steps
    raw, encoded = benchmark_pairs(Path(args.data), args.pairs_per_step * total_steps, args.max_length, args.model)
    output_dir = tempfile.mkdtemp(prefix="bench-dpo-")
    micro = args.pairs_per_step if args.contender == "trl" else args.sft_micro_batch
    # The sft contender is configured as `sft dpo` would be, and built by the same stages.
    config = build_config(None, {
        "model": args.model, "device": args.device, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "lora_target_modules": LORA_TARGETS, "batch_size": micro, "eval_batch_size": args.pairs_per_step,
        "gradient_accumulation_steps": args.pairs_per_step // micro, "learning_rate": args.learning_rate,
        "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "max_steps": total_steps, "logging_steps": 1,
        "seed": 0, "output_dir": output_dir, "max_seq_length": args.max_length, "beta": 0.1,
        "gradient_checkpointing": args.contender == "sft_gc", "lora_fused": args.contender != "sft_unfused"},
        DPOConfig)
    runtime, policy = contender_set_up(config, args.contender, 0)
    step_times: list[float] = []
    step_cpu_times: list[float] = []

    class StepTimer(TrainerCallback):
        """Wall-clock and process CPU seconds of each optimizer step. On a shared machine the CPU
        seconds (all threads together) show the work done when other jobs stretch the wall clock."""

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            _sync(policy.device)
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            _sync(policy.device)
            step_times.append(time.perf_counter() - self.start)
            step_cpu_times.append(time.process_time() - self.cpu_start)

    reference_seconds, same_tokens = None, None
    if args.contender == "sft_copied_prompts":
        import sft.recipes.dpo

        sft.recipes.dpo.shares_prompts_by_default = lambda *_: False
    if args.contender.startswith("sft"):
        tokenizer = load_tokenizer(resolve_model_path(config.model.model))
        model = load_lora_model(config, runtime)
        start = time.perf_counter()
        collator = pair_collator(config, tokenizer, runtime)
        pairs = with_reference_logps(config, runtime, model, None, collator, train=encoded)
        reference_seconds = time.perf_counter() - start
        trainer = build_trainer(config, runtime, model, tokenizer, pairs["train"], [], callbacks=[StepTimer()],
                                save_strategy="no", train_sampling_strategy="sequential", disable_tqdm=True,
                                dataloader_pin_memory=False)
        settings = {"gradient_checkpointing": config.training.gradient_checkpointing, "attention": runtime.attention,
                    "micro_batch": micro, "share_prompts": collator.share_prompts}
    else:
        from datasets import Dataset
        from trl import DPOConfig as TRLConfig
        from trl import DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(config.model.model), dtype=policy.load_dtype,
                                                     attn_implementation="sdpa")
        dataset = Dataset.from_list([{"prompt": pair["prompt"],
                                      "chosen": [{"role": "assistant", "content": pair["chosen"]}],
                                      "rejected": [{"role": "assistant", "content": pair["rejected"]}]}
                                     for pair in raw])
        # TRL's config defaults to bf16, which fails or crawls on CPU: precision comes from our
        # device policy. The batch, learning rate, beta and maximum length are the shared settings;
        # everything else is TRL's default.
        trl_config = TRLConfig(output_dir=output_dir, per_device_train_batch_size=args.pairs_per_step,
                               gradient_accumulation_steps=1, learning_rate=args.learning_rate,
                               lr_scheduler_type="constant", max_steps=total_steps, logging_steps=1,
                               save_strategy="no", report_to="none", seed=0, bf16=policy.bf16, fp16=policy.fp16,
                               use_cpu=policy.device == "cpu", train_sampling_strategy="sequential",
                               dataloader_pin_memory=False, disable_tqdm=True, max_length=args.max_length, beta=0.1)
        trainer = DPOTrainer(model=model, args=trl_config, train_dataset=dataset,
                             processing_class=load_tokenizer(resolve_model_path(config.model.model)),
                             peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                    target_modules=LORA_TARGETS, task_type="CAUSAL_LM"),
                             callbacks=[StepTimer()])
        same_tokens = _trl_matches(trainer, encoded, args.max_length)
        settings = {"gradient_checkpointing": trl_config.gradient_checkpointing,
                    "padding_free": trl_config.padding_free, "precompute_ref_log_probs": False}

    if policy.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    seconds = sum(step_times[args.warmup:])
    return {
        "contender": args.contender, "device": policy.device, "dtype": str(policy.compute_dtype).removeprefix("torch."),
        "settings": settings, "pairs_per_step": args.pairs_per_step, "steps_timed": args.steps,
        "seconds_per_step": seconds / args.steps, "pairs_per_s": args.pairs_per_step * args.steps / seconds,
        "step_seconds": step_times, "cpu_seconds_per_step": sum(step_cpu_times[args.warmup:]) / args.steps,
        "step_cpu_seconds": step_cpu_times, "reference_seconds": reference_seconds, "same_tokens": same_tokens,
        "tokens_per_pair": sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
                               for p in encoded) / len(encoded),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1024**3 if policy.device.startswith("cuda") else None,
        "losses": losses,
    }


def run_contender(args: argparse.Namespace, contender: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", contender, "--data", args.data, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--pairs-per-step", str(args.pairs_per_step),
               "--sft-micro-batch", str(args.sft_micro_batch), "--max-length", str(args.max_length),
               "--learning-rate", str(args.learning_rate), "--device", args.device, "--model", args.model]
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{contender} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict[str, Any]]) -> str:
    trl = next(r for r in results if r["contender"] == "trl")
    memory = "peak GPU GB" if trl["peak_gpu_gb"] is not None else "peak RSS GB"
    lines = [(f"| trainer | pairs/s | s/step | CPU s/step | {memory} | vs TRL: speed | vs TRL: memory | "
              "reference pass, s | loss, first / last step |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mem, trl_mem = (r["peak_gpu_gb"], trl["peak_gpu_gb"]) if r["peak_gpu_gb"] is not None \
            else (r["peak_rss_gb"], trl["peak_rss_gb"])
        reference = "-" if r["reference_seconds"] is None else f"{r['reference_seconds']:.1f} (once)"
        lines.append(f"| {r['contender']} | {r['pairs_per_s']:.3f} | {r['seconds_per_step']:.1f} | "
                     f"{r['cpu_seconds_per_step']:.1f} | {mem:.2f} | "
                     f"{r['pairs_per_s'] / trl['pairs_per_s']:.2f}x | {mem / trl_mem:.2f}x | {reference} | "
                     f"{r['losses'][0]:.4f} / {r['losses'][-1]:.4f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="max length 512, 1 warm-up + 1 timed step")
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"prepared pairs (default {DEFAULT_DATA}: make demo-dpo)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated: " + ", ".join(CONTENDERS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps (default 1)")
    parser.add_argument("--pairs-per-step", type=int, default=8,
                        help="pairs per optimizer step (TRL's batch; default 8)")
    parser.add_argument("--sft-micro-batch", type=int, default=1,
                        help="pairs per forward pass of the sft contenders (default 1: the least memory)")
    parser.add_argument("--max-length", type=int, default=1024, help="TRL's default max_length")
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="the bundled model (default), or a model directory with its tokenizer (on an offline "
                             "GPU machine: random weights built from a config)")
    parser.add_argument("--out", default="benchmarks/results/dpo-throughput.json", help="JSON results file")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pairs_per_step % args.sft_micro_batch:
        parser.error("--pairs-per-step must be a multiple of --sft-micro-batch")

    if args.worker:
        args.contender = args.worker
        print(json.dumps(run_worker(args)))
        return 0
    if args.quick:
        args.max_length, args.steps, args.warmup = 512, 1, 1
    if not Path(args.data).is_file():
        raise SystemExit(f"{args.data} not found: run `make demo-dpo-data` (or pass --data)")
    contenders = args.contenders.split(",")
    results = []
    for contender in contenders:
        started = time.perf_counter()
        result = run_contender(args, contender)
        results.append(result)
        print(f"{contender}: {result['pairs_per_s']:.3f} pairs/s, {result['seconds_per_step']:.1f} s/step, "
              f"{result['peak_rss_gb']:.2f} GB peak RSS, losses {result['losses']} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    trl = next((r for r in results if r["contender"] == "trl"), None)
    report = table(results) if trl else ""
    if trl:
        print(f"\n{report}\n\nTRL's token ids equal ours: {trl['same_tokens']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/dpo_throughput.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "settings": {k: getattr(args, k) for k in ("model", "data", "pairs_per_step", "sft_micro_batch", "max_length",
                                                   "learning_rate", "steps", "warmup")},
        "results": results, "table": report}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
