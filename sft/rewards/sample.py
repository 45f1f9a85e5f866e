"""`sft sample`: k sampled answers to every constraint prompt, from a base model or a run.

    sft sample --prompts data/rlvr/constraints.jsonl --model smollm2-135m-instruct --out data/rlvr/base
    sft sample --prompts data/rlvr/constraints.jsonl --adapter models/sft_output --k 8 --temperature 0.8 \\
        --top-p 0.95 --out data/rlvr/sft

Prompts are built by the same code as training (the run's chat template and system prompt) and
answered in batches with the KV cache (sft.modeling.generate). The j-th answer to a prompt is
drawn with a generator seeded by (--seed, the prompt's id, j), one uniform number a token, as
`sft grpo` draws, so a rerun, a resumed run or a run with another batch size draws the same
answers. Answers are appended to OUT/samples.jsonl as they complete, one line each:

    {"id": prompt id, "sample": j, "seed", "response", "finished", "new_tokens"}

Run the same command again after an interruption and it answers only what is missing;
OUT/sampling.json holds the settings, and a rerun with other settings is refused rather than
mixing answers. Score and turn them into training data with `sft verify`.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

from sft.config import StrictArgumentParser
from sft.data.templates import end_of_turn_ids, with_system_prompt
from sft.data.tokenize import generation_prompt
from sft.errors import ConfigError, DataError, run_command
from sft.files import sha256_of_files
from sft.inference.answer_log import AnswerLog, read_saved_answers
from sft.inference.ifeval.command import adapter_fingerprint
from sft.inference.loading import LoadedRun, check_prompt_fits, load_run, run_config
from sft.modeling.generate import Answer, Sampling, generate_sampled
from sft.modeling.lora import merged_weights
from sft.rewards.verify import ConstraintPrompt, read_constraint_prompts

SAMPLES_FILE = "samples.jsonl"
SETTINGS_FILE = "sampling.json"
WINDOW_BATCHES = 8
"""Batches whose prompts are sorted by length together (see sample_answers)."""
SAMPLER = "inverse-cdf"
"""How a token is drawn from its seed (Sampling.choose), recorded so that answers drawn another way
are never resumed into the same file."""


def sample_seed(seed: int, prompt_id: str, sample: int) -> int:
    """The seed of one answer: the same for the same (seed, prompt, j) on every machine."""
    return int(hashlib.sha256(f"{seed}:{prompt_id}:{sample}".encode()).hexdigest()[:15], 16)


def read_samples(path: str | Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(prompt id, j) -> saved answer, from a samples file `sft sample` appends to (a last line
    cut by an interruption is dropped); anything else unusable is an error naming the line."""
    samples = {}
    for where, record in read_saved_answers(Path(path)):
        if not (isinstance(record, dict) and isinstance(record.get("id"), str) and isinstance(record.get("sample"), int)
                and isinstance(record.get("response"), str) and isinstance(record.get("finished"), bool)):
            raise DataError(f"{where}: expected an object with 'id' (string), 'sample' (integer), 'response' "
                            f"(string) and 'finished' (true or false), as `sft sample` writes")
        samples[(record["id"], record["sample"])] = record
    return samples


def prompt_ids(run: LoadedRun, prompt: ConstraintPrompt) -> list[int]:
    """The token ids the model answers, built as training builds a prompt."""
    return generation_prompt(run.tokenizer, with_system_prompt(prompt.messages, run.config.data.system_prompt), None)


def sample_answers(run: LoadedRun, prompts: list[ConstraintPrompt], k: int, sampling: Sampling, seed: int,
                   max_new_tokens: int, batch_size: int, out_dir: Path,
                   settings: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """Every (prompt id, j) -> answer record for j < k, sampling only those not yet saved in
    ``out_dir/samples.jsonl``."""
    log = AnswerLog(out_dir / SAMPLES_FILE, out_dir / SETTINGS_FILE, settings)
    done = read_samples(log.answers_file)
    todo = [(prompt, j) for prompt in prompts for j in range(k) if (prompt.id, j) not in done]
    if not todo:
        return done
    ids = {prompt.id: prompt_ids(run, prompt) for prompt, _ in todo}
    check_prompt_fits(run, max(map(len, ids.values())), max_new_tokens)
    with merged_weights(run.model), log.appending(len(prompts) * k, len(prompts) * k - len(todo), "sampling") as save:
        def on_answer(chunk: list[tuple[ConstraintPrompt, int]], index: int, answer: Answer) -> None:
            prompt, j = chunk[index]
            record = {"id": prompt.id, "sample": j, "seed": sample_seed(seed, prompt.id, j), "response": answer.text,
                      "finished": answer.finished, "new_tokens": answer.new_tokens}
            save(record)
            done[(prompt.id, j)] = record

        # Batches in file order, a window of WINDOW_BATCHES batches at a time, sorted by prompt
        # length within it: a batch pads its prompts to its longest, and every step attends over
        # that width, so similar lengths together save most of it; an interrupted run has still
        # answered a prefix of the file's windows.
        window = WINDOW_BATCHES * batch_size
        todo = [item for start in range(0, len(todo), window)
                for item in sorted(todo[start:start + window], key=lambda item: len(ids[item[0].id]))]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            generate_sampled(run.model, run.tokenizer, [ids[prompt.id] for prompt, _ in chunk], max_new_tokens,
                             end_of_turn_ids(run.tokenizer), [sample_seed(seed, p.id, j) for p, j in chunk],
                             sampling, batch_size,
                             on_answer=lambda index, answer, chunk=chunk: on_answer(chunk, index, answer))
    return done


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="sft sample", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", required=True, metavar="JSONL", help="constraint prompts (`sft constraints`)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", metavar="RUN_DIR", help="a training output directory: sample base + adapter")
    source.add_argument("--model", help="a base model name or directory: sample it alone")
    parser.add_argument("--out", required=True, metavar="DIR", help="where samples.jsonl and sampling.json go")
    parser.add_argument("--k", type=int, default=4, help="answers per prompt (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="divides the logits: below 1 sharper, above 1 more varied (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 is off (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=0, help="likeliest k tokens only; 0 is off (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="with the prompt id and j, seeds the j-th answer to a prompt (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="answers generated together (default: %(default)s)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N prompts")
    parser.add_argument("--device", default="auto", help="auto, cpu, mps or cuda (default: %(default)s)")
    args = parser.parse_args(argv)

    def run() -> None:
        if min(args.k, args.max_new_tokens, args.batch_size, args.limit or 1) < 1:
            raise ConfigError("--k, --max-new-tokens, --batch-size and --limit must be >= 1")
        try:
            sampling = Sampling(args.temperature, args.top_k, args.top_p)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        prompts = read_constraint_prompts(args.prompts)[:args.limit]
        loaded = load_run(args.adapter, run_config(args.adapter), args.model, args.device)
        adapter = str(Path(args.adapter).resolve()) if args.adapter else None
        settings = {"prompts_sha256": sha256_of_files([Path(args.prompts)]), "model": loaded.model_name,
                    "adapter": adapter, "adapter_sha256": adapter and adapter_fingerprint(Path(adapter)),
                    "system_prompt": loaded.config.data.system_prompt, "k": args.k,
                    "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
                    "max_new_tokens": args.max_new_tokens, "sampler": SAMPLER}
        out = Path(args.out)
        samples = sample_answers(loaded, prompts, args.k, sampling, args.seed, args.max_new_tokens, args.batch_size,
                                 out, settings)
        finished = sum(samples[(p.id, j)]["finished"] for p in prompts for j in range(args.k))
        print(f"{len(prompts) * args.k} answers ({finished} ended their turn) in {out / SAMPLES_FILE}; "
              f"score them with `sft verify --prompts {args.prompts} --samples {out / SAMPLES_FILE}`")

    return run_command(run)


if __name__ == "__main__":
    raise SystemExit(main())
