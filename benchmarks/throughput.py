"""Training throughput: sft's trainer against TRL's SFTTrainer and the plain transformers Trainer.

    python benchmarks/throughput.py            # both models, 2 warm-up + 12 timed steps, 2 rounds
    python benchmarks/throughput.py --quick    # bundled model only, short: under 3 minutes on 2 cores

Every contender trains the same LoRA (r=16, alpha=32, dropout 0.05, all attention and MLP
projections) on the same tokenized examples, in the same order (sequential sampler), with the
same batch, optimizer, learning rate and precision (float32 on CPU, bfloat16 on CUDA), each in a
fresh process so peak memory is its own. Rounds alternate the contenders, so a slow minute of the
machine does not fall on one of them. Contenders:

- ``sft``: this project (padding-free packing, per-example attention, supervised-only chunked loss,
  fused LoRA projections);
- ``sft_unfused``: the same with ``lora.fused: false`` (PEFT's LoRA layers one by one);
- ``trl``: TRL SFTTrainer with its defaults (completion-only loss, gradient checkpointing on);
- ``trl_padding_free``: the same with ``padding_free=True`` (with FlashAttention where installed);
- ``hf_trainer``: transformers.Trainer with a pad-to-longest collator and the model's own loss.

Models: the bundled SmolLM2-135M-Instruct, and a randomly initialized model with TinyLlama-1.1B's
exact architecture (token ids taken modulo its 32,000-token vocabulary), to show the user's scale.

Reported per contender (medians over rounds): supervised (answer) tokens/s, all real tokens/s,
seconds per step, peak resident memory (peak GPU memory on CUDA), the loss at each step, useful
GFLOP/s and its fraction of this machine's fp32 (bf16 on CUDA) matmul peak, measured here too.
Useful FLOPs count the work a LoRA step needs on real tokens: 2 FLOPs per weight per token
forward and 2 backward (input gradients; the frozen weights need no weight gradient), plus the
LoRA weights' gradients, causal attention within each example, and the LM head on answer
positions only. Padding, recomputation (gradient checkpointing) and the head on prompt
positions are not useful work, so a trainer that does them scores lower.
"""

from __future__ import annotations

import argparse
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

CONTENDERS = ("sft", "sft_unfused", "trl", "trl_padding_free", "hf_trainer")
MODELS = ("smollm2-135m", "tinyllama-arch")
ASSET_EXAMPLES = "examples.json"
ASSET_TOKENIZER = "tokenizer"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINYLLAMA_ARCH = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)


# ----------------------------------------------------------------------------------------- data
def benchmark_examples(count: int, max_length: int, seed: int,
                       assets: Path | None = None) -> list[dict[str, list[int]]]:
    """Tokenized AlpacaEval demo examples (the real Alpaca-like length mix), in a fixed order.

    With ``assets`` (written by --export-assets) they are read from there: a GPU machine with no
    network has neither the demo data nor the bundled model's tokenizer."""
    if assets is not None:
        examples = json.loads((assets / ASSET_EXAMPLES).read_text(encoding="utf-8"))
        if examples["max_length"] != max_length or examples["seed"] != seed:
            raise SystemExit(f"{assets}: examples of max length {examples['max_length']} and seed {examples['seed']}; "
                             f"export them again with --max-length {max_length} --seed {seed}")
        examples = examples["examples"]
    else:
        examples = tokenize_demo_set(max_length, seed)
    if len(examples) < count:
        raise SystemExit(f"only {len(examples)} usable examples, {count} needed")
    return examples[:count]


def tokenize_demo_set(max_length: int, seed: int) -> list[dict[str, list[int]]]:
    import random

    from sft.data.demo import DEFAULT_OUT, fetch
    from sft.data.formats import alpaca_user_text
    from sft.data.tokenize import encode_records
    from sft.modeling.models import load_tokenizer, resolve_model_path

    raw = ROOT / DEFAULT_OUT
    if not raw.is_file():
        fetch(raw)
    records = json.loads(raw.read_text(encoding="utf-8"))
    random.Random(seed).shuffle(records)
    conversations = [{"id": str(i), "messages": [
        {"role": "user", "content": alpaca_user_text(r["instruction"], r.get("input") or "")},
        {"role": "assistant", "content": r["output"]}]} for i, r in enumerate(records)]
    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    examples, _ = encode_records(tokenizer, conversations, max_length, None)
    return examples


def export_assets(out: Path, max_length: int, seed: int) -> None:
    """What a GPU machine without network needs: the tokenized examples and a tokenizer (TRL
    wants one beside the model)."""
    from sft.modeling.models import load_tokenizer, resolve_model_path

    out.mkdir(parents=True, exist_ok=True)
    examples = tokenize_demo_set(max_length, seed)
    (out / ASSET_EXAMPLES).write_text(json.dumps({"max_length": max_length, "seed": seed, "examples": examples}),
                                      encoding="utf-8")
    load_tokenizer(resolve_model_path("smollm2-135m-instruct")).save_pretrained(out / ASSET_TOKENIZER)
    print(f"wrote {len(examples)} examples and the tokenizer into {out}")


def model_path(name: str, assets: Path | None = None) -> str:
    from sft.modeling.models import cache_root, resolve_model_path

    if name == "smollm2-135m":
        return resolve_model_path("smollm2-135m-instruct")
    target = cache_root() / "bench" / "tinyllama-arch"
    if not (target / "config.json").is_file():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**TINYLLAMA_ARCH)).save_pretrained(target)
    if not (target / "tokenizer_config.json").is_file():
        # TRL wants a tokenizer beside the model; the data arrive tokenized, so any will do.
        from transformers import AutoTokenizer

        from sft.modeling.models import load_tokenizer

        tokenizer = (AutoTokenizer.from_pretrained(assets / ASSET_TOKENIZER) if assets is not None
                     else load_tokenizer(resolve_model_path("smollm2-135m-instruct")))
        tokenizer.save_pretrained(target)
    return str(target)


# ----------------------------------------------------------------------------------------- flops
def useful_flops(model: torch.nn.Module, example: dict[str, list[int]], lora_rank: int) -> float:
    """Forward + backward FLOPs a LoRA step needs on one example (see the module docstring)."""
    config = model.config
    n = len(example["input_ids"])
    supervised = sum(label != -100 for label in example["labels"][1:])
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    h, i = config.hidden_size, config.intermediate_size
    block_weights = h * q_out + 2 * h * kv_out + q_out * h + 3 * h * i
    lora_weights = lora_rank * ((h + q_out) * 2 + (h + kv_out) * 2 + (h + i) * 2 + (i + h))
    layers = config.num_hidden_layers
    dense = n * layers * (4 * block_weights + 6 * lora_weights)
    attention = layers * 6 * n * n * q_out  # QK^T and AV: 4 n^2 d, causal half, forward + 2x backward
    head = supervised * 4 * config.vocab_size * h
    return float(dense + attention + head)


def matmul_peak_gflops(device: str, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        (a @ b).sum().item()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------- profile
PROFILED_STEPS = 3
SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
"""Where the host waits for the device: a tensor read into Python (.item(), a bool of a tensor,
.tolist()) and explicit synchronizations. The step timer's own synchronize is one per step."""


class StepProfiler:
    """torch.profiler over a few timed steps: where a step's time goes on the host and on the device,
    how many kernels it launches and where it waits for the device (with the Python lines that wait)."""

    def __init__(self, device: str) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        self.device = device
        self.profile = profile(activities=activities, with_stack=True)
        self.step_seconds: list[float] = []

    def start(self) -> None:
        self.profile.__enter__()

    def stop(self, step_seconds: list[float]) -> None:
        _sync(self.device)
        self.profile.__exit__(None, None, None)
        self.step_seconds = list(step_seconds)

    def report(self) -> str:
        from torch.autograd import DeviceType

        steps = len(self.step_seconds)
        events = self.profile.events()
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        busy = sum(getattr(e, "device_time", 0.0) for e in kernels) / 1e6  # microseconds -> s
        launches = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"))
        lines = [f"steps profiled: {steps}, wall per step {sum(self.step_seconds) / steps:.4f} s (under the profiler)",
                 f"device kernels per step: {len(kernels) / steps:.0f}, kernel launches per step: "
                 f"{launches / steps:.0f}, device busy per step: {busy / steps:.4f} s"]
        for name in SYNC_EVENTS:
            count = sum(1 for e in events if e.name == name)
            if count:
                lines.append(f"{name} per step: {count / steps:.1f}")
        waits: dict[str, int] = {}
        for event in events:
            if event.name in SYNC_EVENTS[:2]:
                frames, parent = [], event.cpu_parent
                while parent is not None and len(frames) < 4:  # the Python lines above the wait
                    if ".py(" in parent.name and "torch/" not in parent.name.split("(")[0]:
                        frames.append(parent.name)
                    parent = parent.cpu_parent
                where = f"{event.name}: " + (" <- ".join(frames) or "(no Python line recorded above it)")
                waits[where] = waits.get(where, 0) + 1
        lines.append("\nwhere the host waits for the device (count per step, the Python lines above it):")
        for where, count in sorted(waits.items(), key=lambda item: -item[1])[:15]:
            lines.append(f"  {count / steps:7.1f}  {where}")
        plain = self.profile.key_averages()
        lines.append("\nhost time by operator:")
        lines.append(plain.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        if kernels:
            lines.append("\ndevice time by operator:")
            lines.append(plain.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60))
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- worker
def contender_set_up(config: Any, contender: str, seed: int) -> tuple[Any, Any]:
    """(runtime, device policy) for a contender: ours (sft*) through our runtime set-up; a peer as
    its own users run it, with our device policy and the seed only (our set-up also sets the CPU
    allocator to keep freed memory, which would change a peer's CPU speed too), runtime None."""
    from transformers import set_seed

    from sft.modeling.devices import device_policy
    from sft.training.stages import setup_runtime

    if contender.startswith("sft"):
        runtime = setup_runtime(config)
        return runtime, runtime.policy
    set_seed(seed)
    return None, device_policy(config.training.device, config.model.dtype)


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train one contender for warmup + steps steps and measure it (runs in its own process)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

    from sft.config import build_config
    from sft.data.collate import IGNORE_INDEX, PaddingCollator
    from sft.modeling.attention import resolve_attention
    from sft.recipes.sft import build_trainer
    from sft.training.stages import load_lora_model

    total_steps = args.warmup + args.steps
    assets = Path(args.assets) if args.assets else None
    examples = benchmark_examples(args.batch_size * total_steps, args.max_length, args.seed, assets)
    if args.model == "tinyllama-arch":
        examples = [{"input_ids": [t % TINYLLAMA_ARCH["vocab_size"] for t in e["input_ids"]],
                     "labels": [t if t == IGNORE_INDEX else t % TINYLLAMA_ARCH["vocab_size"] for t in e["labels"]]}
                    for e in examples]
    output_dir = tempfile.mkdtemp(prefix="bench-")
    # The sft contender is configured as `sft train` would be, and built by the same stages.
    config = build_config(None, {
        "model": model_path(args.model, assets), "device": args.device, "lora_r": args.lora_rank,
        "lora_alpha": 2 * args.lora_rank, "lora_dropout": args.lora_dropout, "lora_target_modules": LORA_TARGETS,
        "batch_size": args.batch_size, "gradient_accumulation_steps": 1, "learning_rate": 2e-4,
        "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "max_steps": total_steps, "logging_steps": 1,
        "seed": args.seed, "output_dir": output_dir, "max_seq_length": args.max_length,
        "lora_fused": args.contender != "sft_unfused"})
    runtime, policy = contender_set_up(config, args.contender, args.seed)
    peer_attention = "sdpa"
    if args.contender == "trl_padding_free":
        peer_attention = resolve_attention("auto", policy.device)  # flash_attention_2 where installed
        peer_attention = peer_attention if peer_attention == "flash_attention_2" else "sdpa"
    lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=args.lora_dropout,
                      target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    common = dict(output_dir=output_dir, per_device_train_batch_size=args.batch_size,
                  gradient_accumulation_steps=1, learning_rate=2e-4, lr_scheduler_type="constant",
                  max_steps=total_steps, logging_steps=1, save_strategy="no", report_to="none", seed=args.seed,
                  bf16=policy.bf16, fp16=policy.fp16, use_cpu=policy.device == "cpu",
                  train_sampling_strategy="sequential", dataloader_pin_memory=False, disable_tqdm=True)

    step_times: list[float] = []

    profiled = min(PROFILED_STEPS, args.steps) if args.profile else 0
    profiler = StepProfiler(policy.device) if profiled else None

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            _sync(policy.device)
            if profiler is not None and len(step_times) == args.warmup:
                profiler.start()
            self.start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            _sync(policy.device)
            step_times.append(time.perf_counter() - self.start)
            if profiler is not None and len(step_times) == args.warmup + profiled:
                profiler.stop(step_times[args.warmup:])

    if args.contender.startswith("sft"):
        model = load_lora_model(config, runtime)
        trainer = build_trainer(config, runtime, model, None, examples, [], callbacks=[StepTimer()],
                                save_strategy="no", train_sampling_strategy="sequential", disable_tqdm=True,
                                dataloader_pin_memory=False)
        settings = {"gradient_checkpointing": False, "fused_lora": config.lora.fused,
                    "attention": resolve_attention(config.model.attn_implementation, policy.device)}
    else:
        model = AutoModelForCausalLM.from_pretrained(config.model.model, dtype=policy.load_dtype,
                                                     attn_implementation=peer_attention)
        model.config.use_cache = False
    if args.contender.startswith("trl"):
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        # Pre-tokenized with our labels (-100 on the prompt): TRL's completion-only loss on exactly
        # the same tokens (TRL would ignore a completion_mask column on pre-tokenized data).
        dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
        # TRL's SFTConfig defaults to bf16, which fails or crawls on CPU: precision comes from our
        # device policy, like every other contender's. Everything else is TRL's default.
        padding_free = args.contender == "trl_padding_free"
        # Examples are already truncated to max_length; TRL refuses max_length with padding_free.
        trl_config = SFTConfig(**common, max_length=None if padding_free else args.max_length,
                               padding_free=padding_free)
        trainer = SFTTrainer(model=model, args=trl_config, train_dataset=dataset, peft_config=lora,
                             callbacks=[StepTimer()])
        settings = {"gradient_checkpointing": trl_config.gradient_checkpointing, "padding_free": padding_free,
                    "attention": peer_attention}
    elif args.contender == "hf_trainer":
        from transformers import Trainer

        model = get_peft_model(model, lora)
        pad = PaddingCollator(pad_token_id=0)

        def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
            return {k: v for k, v in pad(batch).items() if k in ("input_ids", "attention_mask", "labels")}

        trainer = Trainer(model=model, args=TrainingArguments(**common, remove_unused_columns=False),
                          train_dataset=examples, data_collator=collate, callbacks=[StepTimer()])
        settings = {"gradient_checkpointing": False, "attention": peer_attention}

    if policy.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    flop_model = trainer.accelerator.unwrap_model(trainer.model)
    batches = [examples[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    timed = slice(args.warmup, total_steps)
    supervised = [sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in b) for b in batches]
    real = [sum(len(e["input_ids"]) for e in b) for b in batches]
    flops = [sum(useful_flops(flop_model, e, args.lora_rank) for e in b) for b in batches]
    seconds = sum(step_times[timed])
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    if args.contender == "sft":  # whether q/k/v and gate/up ran fused on this device, not only asked to
        from sft.modeling.fusion import fused_group_counts

        settings["fused_groups_ran"] = "{} of {}".format(*fused_group_counts(flop_model))
    if profiler is not None:
        report = Path(args.profile) / f"profile-{args.model}-{args.contender}-b{args.batch_size}.txt"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(f"{args.contender} on {args.model}, batch {args.batch_size}, {policy.device}, "
                          f"{str(policy.load_dtype).removeprefix('torch.')}\n{profiler.report()}", encoding="utf-8")
    return {
        "contender": args.contender, "model": args.model, "device": policy.device,
        "dtype": str(policy.load_dtype).removeprefix("torch."), "settings": settings,
        "steps_timed": args.steps, "seconds_per_step": seconds / args.steps,
        "supervised_tokens_per_s": sum(supervised[timed]) / seconds,
        "real_tokens_per_s": sum(real[timed]) / seconds,
        "useful_gflops_per_s": sum(flops[timed]) / seconds / 1e9,
        "peak_rss_gb": peak_rss_gb,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1024**3 if policy.device.startswith("cuda") else None,
        "losses": losses,
    }


# ----------------------------------------------------------------------------------------- driver
def run_round(args: argparse.Namespace, model: str, contender: str, steps: int, warmup: int) -> dict[str, Any]:
    from sft.modeling.devices import CPU_BF16_VARIABLE

    command = [sys.executable, __file__, "--worker", contender, "--model", model, "--steps", str(steps),
               *(["--assets", args.assets] if args.assets else []),
               "--warmup", str(warmup), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--lora-rank", str(args.lora_rank), "--lora-dropout", str(args.lora_dropout),
               "--seed", str(args.seed), "--device", args.device, *(["--profile", args.profile] if args.profile else [])]
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    if args.precision != "auto":  # every contender takes its CPU precision from our policy
        env[CPU_BF16_VARIABLE] = "1" if args.precision == "bf16" else "0"
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{contender} on {model} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("seconds_per_step", "supervised_tokens_per_s", "real_tokens_per_s", "useful_gflops_per_s", "peak_rss_gb")
    result = dict(runs[0])
    for key in keys:
        result[key] = statistics.median(run[key] for run in runs)
    if runs[0]["peak_gpu_gb"] is not None:
        result["peak_gpu_gb"] = statistics.median(run["peak_gpu_gb"] for run in runs)
    result["rounds"] = [{key: run[key] for key in keys} for run in runs]
    return result


def table(results: list[dict[str, Any]], peak: float) -> str:
    memory = "peak GPU GB" if results[0]["peak_gpu_gb"] is not None else "peak RSS GB"
    lines = [f"| model | trainer | supervised tok/s | all tok/s | s/step | {memory} | useful GFLOP/s | "
             f"% of matmul peak | vs TRL defaults | vs HF Trainer | losses (first, last) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        def peer(name: str, r: dict[str, Any] = r) -> dict[str, Any] | None:  # the same model and precision
            return next((x for x in results if x["model"] == r["model"] and x["contender"] == name
                         and x.get("precision") == r.get("precision")), None)

        trl, hf = peer("trl"), peer("hf_trainer")
        vs_hf = f"{r['supervised_tokens_per_s'] / hf['supervised_tokens_per_s']:.2f}x" if hf else "-"
        vs_trl = f"{r['supervised_tokens_per_s'] / trl['supervised_tokens_per_s']:.2f}x" if trl else "-"
        mem = r["peak_gpu_gb"] if r["peak_gpu_gb"] is not None else r["peak_rss_gb"]
        lines.append(
            f"| {r['model']} | {r['contender']} ({r.get('precision', 'auto')}) | {r['supervised_tokens_per_s']:.1f} | {r['real_tokens_per_s']:.1f} | "
            f"{r['seconds_per_step']:.2f} | {mem:.2f} | {r['useful_gflops_per_s']:.1f} | "
            f"{100 * r['useful_gflops_per_s'] / peak:.0f}% | "
            f"{vs_trl} | {vs_hf} | "
            f"{r['losses'][0]:.4f}, {r['losses'][-1]:.4f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--quick", action="store_true",
                        help="bundled model only, batch 4, length 256, 1 warm-up + 2 steps, 1 round")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated: " + ", ".join(CONTENDERS))
    parser.add_argument("--steps", type=int, default=12, help="timed steps (default 12)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (default 2)")
    parser.add_argument("--tinyllama-steps", type=int, default=3, help="timed steps on tinyllama-arch (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians are reported (default 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precisions", default="auto",
                        help="comma-separated CPU precisions to run every contender in: auto (what sft picks for "
                             "this CPU), float32, bf16 (float32 weights, bf16 autocast); e.g. float32,bf16")
    parser.add_argument("--out", default="benchmarks/results/throughput.json", help="JSON results file")
    parser.add_argument("--assets", help="read the tokenized examples and tokenizer from this folder (no network)")
    parser.add_argument("--export-assets", metavar="DIR",
                        help="write the tokenized examples and the tokenizer into DIR for --assets, then exit")
    parser.add_argument("--profile", metavar="DIR",
                        help=f"also profile {PROFILED_STEPS} timed steps of each contender (torch.profiler: host and "
                             "device time by operator, kernel launches, where the host waits for the device) into "
                             "DIR/profile-MODEL-CONTENDER-bBATCH.txt; the profiler slows the timed steps")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.export_assets:
        export_assets(Path(args.export_assets), args.max_length, args.seed)
        return 0
    if args.worker:
        args.contender = args.worker
        print(json.dumps(run_worker(args)))
        return 0

    models = args.models.split(",")
    if args.quick:
        models, args.steps, args.warmup, args.rounds = ["smollm2-135m"], 2, 1, 1
        args.batch_size, args.max_length = 4, 256
    contenders = args.contenders.split(",")
    precisions = args.precisions.split(",")
    if not set(precisions) <= {"auto", "float32", "bf16"}:
        raise SystemExit("--precisions: expected a comma-separated list of auto, float32, bf16")
    if "trl" not in contenders and not args.profile:
        raise SystemExit("the trl contender is the reference of the ratios; keep it in --contenders")
    from sft.modeling.devices import device_policy

    policy = device_policy(args.device, "auto")
    peak = matmul_peak_gflops(policy.device, policy.load_dtype if not policy.bf16 else torch.bfloat16)
    print(f"{policy.device}, {torch.get_num_threads()} threads: measured matmul peak {peak:.1f} GFLOP/s", flush=True)

    results = []
    for model in models:
        steps = args.tinyllama_steps if model == "tinyllama-arch" else args.steps
        warmup = min(args.warmup, 1) if model == "tinyllama-arch" else args.warmup
        runs: dict[tuple[str, str], list] = {(c, p): [] for p in precisions for c in contenders}
        for round_index in range(args.rounds):
            for contender, precision in runs:
                started = time.perf_counter()
                args.precision = precision
                run = run_round(args, model, contender, steps, warmup) | {"precision": precision}
                runs[contender, precision].append(run)
                fused = run["settings"].get("fused_groups_ran")
                print(f"round {round_index + 1}/{args.rounds} {model} {contender} ({precision}): "
                      f"{run['supervised_tokens_per_s']:.1f} supervised tok/s, {run['peak_rss_gb']:.2f} GB "
                      f"({time.perf_counter() - started:.0f} s{f'; fused groups ran: {fused}' if fused else ''})",
                      flush=True)
        results += [median_result(runs[key]) for key in runs]

    report = table(results, peak)
    print()
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/throughput.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": policy.device,
                    "matmul_peak_gflops": peak},
        "settings": {k: getattr(args, k) for k in ("batch_size", "max_length", "lora_rank", "lora_dropout",
                                                   "steps", "warmup", "tinyllama_steps", "rounds", "seed",
                                                   "precisions")},
        "results": results, "table": report}, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
