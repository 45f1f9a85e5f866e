"""Generation speed: our batched loop against transformers' generate, same prompts, greedy or sampled.

    .venv/bin/python benchmarks/generation.py --input-data ../shared/data/ifeval/input_data.jsonl
    .venv/bin/python benchmarks/generation.py --input-data ../shared/data/ifeval/input_data.jsonl --sampling \\
        --prompts 64 --batch-sizes 32 64 --max-new-tokens 128

Answers the first N IFEval prompts with the bundled SmolLM2-135M-Instruct (or --model), float32 on
CPU, at each batch size, with each contender.

Greedy (the default):

- ``sft``: ``sft.modeling.generate.generate_greedy`` as evaluation, chat and ``sft ifeval`` run
  it: left-padded batches in order of length, finished rows leave the batch, logits of the last
  position only, and a KV cache that writes into spare room (GrowingCache);
- ``sft-row-major``: the same loop with the weights left in the row-major layout they are loaded
  in, where ``sft`` lays them out for decoding on a CPU (``sft.modeling.generate.decode_layout``):
  what that layout buys;
- ``sft-padded-prompts``: the same loop with the prompts' pass run as a left-padded batch, where
  ``sft`` runs it as one packed row and re-lays the cache as the padded batch: what packing the
  prompt pass buys (every row of a padded batch is computed to the longest prompt's length);
- ``sft-dynamic``: the same loop with transformers' DynamicCache, which concatenates every
  layer's keys and values at every step: what the growing cache buys;
- ``hf-generate``: ``model.generate(do_sample=False)`` on the same left-padded batches, as a user
  of transformers would write it (finished rows stay in the batch until all are done).

Batch size 1 of ``sft`` is the one-at-a-time baseline; every run's answers are compared with it
(padding, batching and caches must not change a greedy answer).

Sampled (``--sampling``; temperature 0.8 and top-p 0.95 unless told, as `sft sample` is run):

- ``sft``: ``sft.modeling.generate.generate_sampled``, the sampler of `sft sample` and `sft grpo`,
  in float32, answer i drawn from its own generator seeded by ``--seed`` + i;
- ``sft-row-major``, ``sft-padded-prompts``: as in the greedy runs; their answers are held to ``sft``'s;
- ``sft-bf16``: the same with the model's weights cast to bfloat16. Its answers are compared with
  the float32 ones at the same seeds: float32 is the reference, and a cheaper dtype is only worth
  having where it leaves the answers (nearly) as they are. On a CPU without bfloat16 dot products
  (the avx512_bf16 or amx_bf16 flags, recorded in the JSON) its matmuls convert to float32 and
  back, so it is expected to lose there;
- ``sft-compiled`` (only when named in --contenders): the same draws with the decode step through
  ``torch.compile`` (default mode: "reduce-overhead" needs CUDA graphs) on transformers'
  StaticCache, whose fixed shapes let one compiled graph serve every step; its answers are held to
  the float32 ones too. Static shapes keep finished rows in the batch until the longest is done
  (no cost with --full-length, where none finishes early). Compilation can only remove the step's
  Python and dispatch overhead, a share that shrinks as the batch grows and the matmuls dominate,
  and it costs a minute or two of compiling a batch size on two CPU cores (done before the timed
  run and reported apart, ``compile_seconds``): hence not a default contender;
- ``hf-generate``: ``model.generate(do_sample=True, temperature, top_p, top_k)`` on the same
  left-padded batches (transformers' global generator, seeded by --seed).

Sampled answers differ between implementations, so their lengths do too, and answers/s would
measure the draws as much as the code; new tokens/s is the fair measure. To make even that
compare equal work (a batch whose rows all end early runs fewer, cheaper steps over shorter
caches), ``--full-length`` (the default when sampling) makes every answer run to exactly
--max-new-tokens: our loop gets no stop ids, and transformers' generate gets ``min_new_tokens``
equal to ``max_new_tokens`` (it masks the end-of-turn ids, a cost of its own of a few
vocabulary-wide operations a step). ``--no-full-length`` measures answers as they end. (Greedy
runs take --full-length too, but then transformers' answers differ from ours wherever an answer
would have ended: it never picks an end-of-turn id, ours picks it and goes on.)

Prints a table of answers/s and new tokens/s, with each contender's new tokens/s over
hf-generate's at the same batch size, and writes it with the settings to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache, PreTrainedTokenizerBase, StaticCache

import sft.modeling.generate as generate_module
from sft.data.templates import end_of_turn_ids
from sft.inference.ifeval.command import encode_question
from sft.inference.ifeval.data import DEFAULT_INPUT_DATA, read_prompts
from sft.inference.loading import load_run, run_config
from sft.modeling.generate import Answer, Sampling, generate_greedy, generate_sampled

CONTENDERS = ("sft", "sft-row-major", "sft-padded-prompts", "sft-dynamic", "hf-generate")
SAMPLED_CONTENDERS = ("sft", "sft-row-major", "sft-padded-prompts", "sft-bf16", "sft-compiled", "hf-generate")
DEFAULT_SAMPLED_CONTENDERS = ("sft", "sft-row-major", "sft-padded-prompts", "sft-bf16", "hf-generate")


@contextlib.contextmanager
def row_major_weights() -> Iterator[None]:
    """Our loop with the weights in the layout they are loaded in: decode_layout made a no-op."""
    original = generate_module.decode_layout
    generate_module.decode_layout = lambda model: contextlib.nullcontext(0)
    try:
        yield
    finally:
        generate_module.decode_layout = original


@contextlib.contextmanager
def padded_prompt_pass() -> Iterator[None]:
    """Our loop with the prompts run as a left-padded batch, where ``sft`` packs them into one row."""
    original = generate_module._prefill_packed
    generate_module._prefill_packed = lambda *_: False
    try:
        yield
    finally:
        generate_module._prefill_packed = original
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "avx512_fp16")
"""The CPU features that decide how a bfloat16 matmul runs: without avx512_bf16 or amx_bf16 it
converts to float32 first."""


def hf_generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                max_new_tokens: int, stop_ids: list[int], batch_size: int, sampling: Sampling | None = None,
                full_length: bool = False) -> list[Answer]:
    """transformers' generate on left-padded batches (in order of length, as ours): greedy, or
    sampled with ``sampling``; ``full_length`` forbids the stop ids until max_new_tokens."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    order = _by_length(prompts)
    answers: list[Answer | None] = [None] * len(prompts)
    options: dict[str, Any] = {"do_sample": False} if sampling is None else {
        "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}
    if full_length:
        options["min_new_tokens"] = max_new_tokens
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in batch])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch])
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                                    max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
                                    **options)
        for row, index in enumerate(batch):
            new = output[row, width:].tolist()
            ends = [position for position, token in enumerate(new) if token in stop_ids]
            tokens = new[:ends[0] + 1] if ends else new
            ended = bool(ends)
            text = tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True).strip()
            answers[index] = Answer(text, ended, len(tokens), tuple(tokens))
    return answers  # type: ignore[return-value]


class CompiledSampler:
    """Our sampler (seeded per answer, ``Sampling.choose``) with the decode step compiled.

    The prompt goes through the model as it is; each later step, one token per row, goes through
    ``torch.compile(model)`` on a StaticCache as long as the longest prompt plus the answer, with
    a 2-D attention mask of that full length (ones where a real token is or is being written): every
    step of every batch of a size then has the same shapes and reuses one graph. Rows stay in the
    batch until all are done (dropping rows would change the shapes); a finished row's draws are
    thrown away. The cache of each batch size is kept and reset, so its tensors, which the graph
    reads, stay the same objects. :meth:`compile` compiles ahead for the batch sizes a run will
    see, so that a timed run measures the compiled steps and not their compilation."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, stop_ids: Sequence[int],
                 sampling: Sampling, cache_length: int) -> None:
        self.model, self.tokenizer, self.stop_ids, self.sampling = model, tokenizer, list(stop_ids), sampling
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        self.cache_length = cache_length
        self.step = torch.compile(model, mode="default", dynamic=False)
        self.caches: dict[int, StaticCache] = {}

    def compile(self, prompts: Sequence[list[int]], batch_size: int) -> float:
        """Compile the step for every batch size that batching ``prompts`` by ``batch_size`` gives
        (two tokens of a batch of each, answers thrown away); the seconds it took."""
        started = time.perf_counter()
        order = _by_length(prompts)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                if len(batch) not in self.caches:
                    self._decode([prompts[i] for i in batch], [0] * len(batch), 2)
        return time.perf_counter() - started

    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int, seeds: Sequence[int],
                 batch_size: int) -> list[Answer]:
        """Answers as :func:`sft.modeling.generate.generate_sampled` gives them, in the prompts' order."""
        order = _by_length(prompts)
        answers: list[Answer | None] = [None] * len(prompts)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                rows = self._decode([prompts[i] for i in batch], [seeds[i] for i in batch], max_new_tokens)
                for index, tokens in zip(batch, rows, strict=True):
                    ended = tokens[-1] in self.stop_ids
                    text = self.tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True).strip()
                    answers[index] = Answer(text, ended, len(tokens), tuple(tokens))
        return answers  # type: ignore[return-value]

    def _decode(self, prompts: list[list[int]], seeds: list[int], max_new_tokens: int) -> list[list[int]]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        if width + max_new_tokens > self.cache_length:
            raise ValueError(f"a prompt of {width} tokens and {max_new_tokens} new ones overflow the cache")
        cache = self.caches.get(len(prompts))
        if cache is None:
            cache = self.caches[len(prompts)] = StaticCache(config=self.model.config, max_cache_len=self.cache_length)
        else:
            cache.reset()
        mask = torch.zeros(len(prompts), self.cache_length, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            mask[row, width - len(prompt):width] = 1
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        tokens: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        logits = self.model(input_ids=input_ids, attention_mask=mask[:, :width], position_ids=positions,
                            past_key_values=cache, cache_position=torch.arange(width, device=device),
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        for step in range(max_new_tokens):
            uniforms = torch.cat([torch.rand(1, generator=generator) for generator in generators])
            next_ids = self.sampling.choose(logits, uniforms.to(logits.device))
            for row, token in enumerate(next_ids.tolist()):
                if not done[row]:
                    tokens[row].append(token)
                    done[row] = token in self.stop_ids
            if all(done) or step == max_new_tokens - 1:
                break
            column = width + step
            mask[:, column] = 1
            positions = positions[:, -1:] + 1
            logits = self.step(input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions,
                               past_key_values=cache, cache_position=torch.tensor([column], device=device),
                               use_cache=True, logits_to_keep=1).logits[:, -1]
        return tokens


def _by_length(prompts: Sequence[list[int]]) -> list[int]:
    """Prompt indices, longest first: the batching order of our loop."""
    return sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)


def cpu_flags() -> dict[str, bool]:
    """Which of CPU_FLAGS this CPU has (empty where /proc/cpuinfo is not: macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return {}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {flag: flag in flags for flag in CPU_FLAGS}


SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "seed")


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command that reruns these settings (every option that applies spelled out, --out left off)."""
    parts = ["python benchmarks/generation.py"]
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if (not action.option_strings or action.dest in ("help", "out") or value is None
                or (action.dest in SAMPLING_OPTIONS and not args.sampling)):
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            parts.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif isinstance(action, argparse._StoreTrueAction):
            if value:
                parts.append(flag)
        else:
            parts.append(f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-data", default=str(DEFAULT_INPUT_DATA))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16, help="the first N prompts (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--sampling", action="store_true", help="draw the tokens instead of taking the likeliest")
    parser.add_argument("--temperature", type=float, default=0.8, help="when sampling (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=0.95, help="when sampling; 1 is off (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=0, help="when sampling; 0 is off (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="answer i is drawn with seed + i (default: %(default)s)")
    parser.add_argument("--full-length", action=argparse.BooleanOptionalAction, default=None,
                        help="every answer runs to --max-new-tokens (default: when sampling)")
    parser.add_argument("--contenders", help="comma-separated: greedy " + ", ".join(CONTENDERS) + "; sampled "
                        + ", ".join(SAMPLED_CONTENDERS) + " (default: all but sft-compiled)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="JSON results file (default: benchmarks/results/generation.json, "
                        "generation-sampled.json when sampling)")
    args = parser.parse_args()
    if args.out is None:
        args.out = f"benchmarks/results/generation{'-sampled' if args.sampling else ''}.json"
    known = SAMPLED_CONTENDERS if args.sampling else CONTENDERS
    if args.contenders is None:
        args.contenders = ",".join(DEFAULT_SAMPLED_CONTENDERS if args.sampling else CONTENDERS)
    if args.full_length is None:
        args.full_length = args.sampling
    contenders = args.contenders.split(",")
    unknown = set(contenders) - set(known)
    if unknown:
        parser.error(f"unknown {'sampled' if args.sampling else 'greedy'} contenders: {', '.join(sorted(unknown))}")
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p) if args.sampling else None
    except ValueError as exc:
        parser.error(str(exc))

    run = load_run(None, run_config(None), args.model, args.device)
    model, tokenizer = run.model, run.tokenizer
    stop_ids = end_of_turn_ids(tokenizer)
    # what our loop stops at: nothing, when every answer is to run to the budget
    loop_stop_ids: list[int] = [] if args.full_length else stop_ids
    prompts = [encode_question(tokenizer, p.prompt, run.config.data.system_prompt)
               for p in read_prompts(args.input_data)[:args.prompts]]
    seeds = [args.seed + i for i in range(len(prompts))]
    mode = "greedy" if sampling is None else (
        f"sampled (temperature {sampling.temperature}, top-p {sampling.top_p}, top-k {sampling.top_k})")
    length = f"exactly {args.max_new_tokens}" if args.full_length else f"at most {args.max_new_tokens}"
    header = (f"{run.model_name}, {len(prompts)} IFEval prompts, {mode}, {length} new tokens, "
              f"{run.policy.device}, {str(run.policy.compute_dtype).removeprefix('torch.')}, "
              f"{torch.get_num_threads()} threads")
    print(header + "\n")
    compared = "answers equal to float32" if sampling is not None else "answers equal to one at a time"
    lines = [("| contender | batch size | answers | new tokens | seconds | answers/s | new tokens/s | vs hf-generate "
              f"| {compared} |"), "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)

    compiled: CompiledSampler | None = None
    # cast once, before any timing: a copy, so that the float32 contenders keep their weights
    bf16_model = copy.deepcopy(model).to(torch.bfloat16) if "sft-bf16" in contenders else None

    def sampled(batch_size: int, the_model: torch.nn.Module = model) -> list[Answer]:
        assert sampling is not None
        return generate_sampled(the_model, tokenizer, prompts, args.max_new_tokens, loop_stop_ids, seeds, sampling,
                                batch_size)

    runners: dict[str, Callable[[int], list[Answer]]] = {
        "hf-generate": lambda size: hf_generate(model, tokenizer, prompts, args.max_new_tokens, stop_ids, size,
                                                sampling, args.full_length),
    }
    def row_major(size: int) -> list[Answer]:
        with row_major_weights():
            return runners["sft"](size)

    def padded_prompts(size: int) -> list[Answer]:
        with padded_prompt_pass():
            return runners["sft"](size)

    runners["sft-row-major"] = row_major
    runners["sft-padded-prompts"] = padded_prompts
    if sampling is None:
        runners["sft"] = lambda size: generate_greedy(model, tokenizer, prompts, args.max_new_tokens, loop_stop_ids,
                                                      size)
        runners["sft-dynamic"] = lambda size: generate_greedy(model, tokenizer, prompts, args.max_new_tokens,
                                                              loop_stop_ids, size, new_cache=DynamicCache)
    else:
        runners["sft"] = sampled
        runners["sft-bf16"] = lambda size: sampled(size, bf16_model)
        if "sft-compiled" in contenders:
            compiled = CompiledSampler(model, tokenizer, loop_stop_ids, sampling,
                                       max(map(len, prompts)) + args.max_new_tokens)
            runners["sft-compiled"] = lambda size: compiled.generate(prompts, args.max_new_tokens, seeds, size)

    baseline = generate_greedy(model, tokenizer, prompts, args.max_new_tokens, loop_stop_ids, 1) \
        if sampling is None and any(size != 1 or name != "sft" for size in args.batch_sizes for name in contenders) \
        else None
    results = []
    compile_notes: list[str] = []
    for batch_size in args.batch_sizes:
        peer = None
        reference: list[Answer] | None = baseline
        if sampling is not None and "sft" not in contenders:  # the float32 answers the others are held to
            reference = sampled(batch_size)
        for name in sorted(contenders, key=lambda c: (c != "hf-generate", c != "sft")):  # peer, reference first
            if name == "hf-generate":
                torch.manual_seed(args.seed)  # transformers draws from the global generator: the same draws each run
            compile_seconds = compiled.compile(prompts, batch_size) if compiled and name == "sft-compiled" else None
            started = time.perf_counter()
            answers = runners[name](batch_size)
            seconds = time.perf_counter() - started
            tokens = sum(a.new_tokens for a in answers)
            result: dict[str, Any] = {"contender": name, "batch_size": batch_size, "answers": len(answers),
                                      "new_tokens": tokens, "seconds": seconds,
                                      "answers_per_s": len(answers) / seconds, "new_tokens_per_s": tokens / seconds}
            if sampling is None:
                equal = sum(a == b for a, b in zip(answers, baseline or answers))
                result["equal_to_one_at_a_time"] = equal
                shown = f"{equal} of {len(answers)}"
            else:
                if name == "sft":
                    reference = answers
                # the draws of transformers' generate are its own; ours are held to float32's, token for token
                equal = None if name in ("hf-generate", "sft") or reference is None else sum(
                    a.token_ids == b.token_ids for a, b in zip(answers, reference))
                result["equal_to_float32"] = equal
                shown = "-" if equal is None else f"{equal} of {len(answers)}"
                if compile_seconds is not None:  # spent before the timed run, once per batch size
                    result["compile_seconds"] = compile_seconds
                    compile_notes.append(f"sft-compiled at batch size {batch_size}: {compile_seconds:.1f} s "
                                         "compiling before the timed run")
            peer = peer or (result if name == "hf-generate" else None)
            result["vs_hf_generate"] = None if peer is None else result["new_tokens_per_s"] / peer["new_tokens_per_s"]
            vs = "-" if peer is None else f"{result['vs_hf_generate']:.2f}x"
            line = (f"| {name} | {batch_size} | {len(answers)} | {tokens} | {seconds:.1f} | "
                    f"{result['answers_per_s']:.3f} | {result['new_tokens_per_s']:.1f} | {vs} | {shown} |")
            lines.append(line)
            print(line, flush=True)
            results.append(result)
    # the question the benchmark answers: how much faster our loop is than transformers' at each batch size
    speedups = {str(r["batch_size"]): r["vs_hf_generate"] for r in results
                if r["contender"] == "sft" and r["vs_hf_generate"] is not None}
    notes = ["sft over hf-generate: " + ", ".join(f"{ratio:.2f}x at batch size {size}"
                                                   for size, ratio in speedups.items())] if speedups else []
    notes += compile_notes
    if notes:
        lines += [""] + notes
        print("\n" + "\n".join(notes))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": command_line(parser, args), "setting": header,
        "sampling": None if sampling is None else {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                                   "top_k": sampling.top_k, "seed": args.seed},
        "full_length": args.full_length, "sft_over_hf_generate": speedups,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "cpu_flags": cpu_flags(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "results": results, "table": "\n".join(lines)}, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
