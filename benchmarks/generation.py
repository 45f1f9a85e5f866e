"""Generation speed: batched with a KV cache vs one prompt at a time, same prompts, same answers.

    .venv/bin/python benchmarks/generation.py --input-data ../shared/data/ifeval/input_data.jsonl

Answers the first N IFEval prompts greedily with the bundled SmolLM2-135M-Instruct (or --model)
through ``sft.inference.generate.generate_greedy`` at each batch size, and prints answers/s and
new tokens/s. Batch size 1 is the one-at-a-time path; every batched run's answers are compared
with it (left padding must not change a greedy answer).
"""

from __future__ import annotations

import argparse
import time

from sft.data.templates import end_of_turn_ids
from sft.inference.generate import generate_greedy
from sft.inference.ifeval.command import encode_question
from sft.inference.ifeval.data import DEFAULT_INPUT_DATA, read_prompts
from sft.inference.loading import load_run, run_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-data", default=str(DEFAULT_INPUT_DATA))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16, help="the first N prompts (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    run = load_run(None, run_config(None), args.model, args.device)
    model, tokenizer = run.model, run.tokenizer
    prompts = [encode_question(tokenizer, p.prompt, run.config.data.system_prompt)
               for p in read_prompts(args.input_data)[:args.prompts]]
    print(f"{run.model_name}, {len(prompts)} IFEval prompts, greedy, at most {args.max_new_tokens} new tokens, "
          f"device {run.policy.device}\n")
    print("| batch size | answers | new tokens | seconds | answers/s | new tokens/s | answers equal to one at a time |")
    print("|---|---|---|---|---|---|---|")
    one_at_a_time = None
    for batch_size in args.batch_sizes:
        started = time.perf_counter()
        answers = generate_greedy(model, tokenizer, prompts, args.max_new_tokens, end_of_turn_ids(tokenizer),
                                  batch_size)
        seconds = time.perf_counter() - started
        one_at_a_time = one_at_a_time or (answers if batch_size == 1 else None)
        equal = "-" if one_at_a_time is None else sum(a == b for a, b in zip(answers, one_at_a_time))
        tokens = sum(a.new_tokens for a in answers)
        print(f"| {batch_size} | {len(answers)} | {tokens} | {seconds:.1f} | {len(answers) / seconds:.3f} | "
              f"{tokens / seconds:.1f} | {equal} |", flush=True)


if __name__ == "__main__":
    main()
