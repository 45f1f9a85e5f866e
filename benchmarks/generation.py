"""Generation speed: our batched greedy loop against transformers' generate, same prompts, same answers.

    .venv/bin/python benchmarks/generation.py --input-data ../shared/data/ifeval/input_data.jsonl

Answers the first N IFEval prompts greedily with the bundled SmolLM2-135M-Instruct (or --model),
float32 on CPU, at each batch size, with each contender:

- ``sft``: ``sft.modeling.generate.generate_greedy`` as evaluation, chat and ``sft ifeval`` run
  it: left-padded batches in order of length, finished rows leave the batch, logits of the last
  position only, and a KV cache that writes into spare room (GrowingCache);
- ``sft-dynamic``: the same loop with transformers' DynamicCache, which concatenates every
  layer's keys and values at every step: what the growing cache buys;
- ``hf-generate``: ``model.generate(do_sample=False)`` on the same left-padded batches, as a user
  of transformers would write it (finished rows stay in the batch until all are done).

Batch size 1 of ``sft`` is the one-at-a-time baseline; every run's answers are compared with it
(padding, batching and caches must not change a greedy answer). Prints a table of answers/s and
new tokens/s and writes it with the settings to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

from sft.data.templates import end_of_turn_ids
from sft.inference.ifeval.command import encode_question
from sft.inference.ifeval.data import DEFAULT_INPUT_DATA, read_prompts
from sft.inference.loading import load_run, run_config
from sft.modeling.generate import Answer, GrowingCache, generate_greedy

CONTENDERS = ("sft", "sft-dynamic", "hf-generate")


def hf_generate(model: torch.nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                stop_ids: list[int], batch_size: int) -> list[Answer]:
    """transformers' greedy generate on left-padded batches (in order of length, as ours)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    answers: list[Answer | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in batch])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch])
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                                    max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                    pad_token_id=pad_id)
        for row, index in enumerate(batch):
            new = output[row, width:].tolist()
            ends = [position for position, token in enumerate(new) if token in stop_ids]
            tokens = new[:ends[0] + 1] if ends else new
            ended = bool(ends)
            text = tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True).strip()
            answers[index] = Answer(text, ended, len(tokens))
    return answers  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-data", default=str(DEFAULT_INPUT_DATA))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16, help="the first N prompts (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated: " + ", ".join(CONTENDERS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks/results/generation.json", help="JSON results file")
    args = parser.parse_args()
    contenders = args.contenders.split(",")
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")

    run = load_run(None, run_config(None), args.model, args.device)
    model, tokenizer = run.model, run.tokenizer
    stop_ids = end_of_turn_ids(tokenizer)
    prompts = [encode_question(tokenizer, p.prompt, run.config.data.system_prompt)
               for p in read_prompts(args.input_data)[:args.prompts]]
    header = (f"{run.model_name}, {len(prompts)} IFEval prompts, greedy, at most {args.max_new_tokens} new tokens, "
              f"{run.policy.device}, {str(run.policy.compute_dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads")
    print(header + "\n")
    lines = [("| contender | batch size | answers | new tokens | seconds | answers/s | new tokens/s | vs hf-generate "
              "| answers equal to one at a time |"), "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    baseline = generate_greedy(model, tokenizer, prompts, args.max_new_tokens, stop_ids, 1) \
        if any(size != 1 or name != "sft" for size in args.batch_sizes for name in contenders) else None
    results = []
    for batch_size in args.batch_sizes:
        peer = None
        for name in sorted(contenders, key=lambda c: c != "hf-generate"):  # the peer first, for the ratio
            started = time.perf_counter()
            if name == "hf-generate":
                answers = hf_generate(model, tokenizer, prompts, args.max_new_tokens, stop_ids, batch_size)
            else:
                answers = generate_greedy(model, tokenizer, prompts, args.max_new_tokens, stop_ids, batch_size,
                                          new_cache=DynamicCache if name == "sft-dynamic" else GrowingCache)
            seconds = time.perf_counter() - started
            tokens = sum(a.new_tokens for a in answers)
            reference = baseline or answers
            result = {"contender": name, "batch_size": batch_size, "answers": len(answers), "new_tokens": tokens,
                      "seconds": seconds, "answers_per_s": len(answers) / seconds, "new_tokens_per_s": tokens / seconds,
                      "equal_to_one_at_a_time": sum(a == b for a, b in zip(answers, reference))}
            peer = peer or (result if name == "hf-generate" else None)
            vs = "-" if peer is None else f"{result['new_tokens_per_s'] / peer['new_tokens_per_s']:.2f}x"
            line = (f"| {name} | {batch_size} | {len(answers)} | {tokens} | {seconds:.1f} | "
                    f"{result['answers_per_s']:.3f} | {result['new_tokens_per_s']:.1f} | {vs} | "
                    f"{result['equal_to_one_at_a_time']} of {len(answers)} |")
            lines.append(line)
            print(line, flush=True)
            results.append(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": "python benchmarks/generation.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k != "out"),
        "setting": header, "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                       "transformers": transformers.__version__},
        "results": results, "table": "\n".join(lines)}, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
