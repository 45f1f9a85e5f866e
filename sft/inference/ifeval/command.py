"""`sft ifeval`: judge-free instruction-following scores (IFEval), base model vs adapter.

    sft ifeval --responses answers.jsonl --out DIR         score given answers
    sft ifeval --adapter models/sft_output                 answer and score, base vs base + adapter
    sft ifeval --model smollm2-135m-instruct --out DIR     answer and score with a base model alone
    sft ifeval --adapter models/sft_output --limit 20      a quick look at the first 20 prompts

IFEval (Zhou et al. 2023) asks 541 prompts with 25 kinds of instruction a program can check ("no
commas", "at least 300 words", "wrap the answer in JSON", ...) and reports the share of prompts
whose instructions are all followed (prompt level) and of instructions followed (instruction
level), strict and loose. Scoring writes the reference implementation's files:
eval_results_strict.jsonl, eval_results_loose.jsonl, plus scores.json.

Answers are generated greedily with the run's own prompt code (chat template, system prompt),
in batches, and appended to responses.jsonl as they come: run the same command again after an
interruption and it continues where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

import torch

from sft.config import StrictArgumentParser
from sft.data.templates import end_of_turn_ids, with_system_prompt
from sft.data.tokenize import generation_prompt
from sft.errors import DataError, run_command
from sft.files import atomic_write_text, sha256_of_files
from sft.inference.answer_log import AnswerLog
from sft.inference.ifeval.data import DEFAULT_INPUT_DATA, IFEvalPrompt, read_prompts, read_responses
from sft.inference.ifeval.scoring import format_by_instruction, format_scores, score_responses
from sft.inference.loading import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    check_prompt_fits,
    folded_adapter,
    load_run,
    run_config,
)
from sft.modeling.generate import Answer, generate_greedy
from sft.modeling.lora import merged_weights
from sft.outputs import Manifest, check_outputs, writer_lock, writing_into

REFERENCE_MAX_NEW_TOKENS = 1280
"""The answer length the reference evaluation allows."""

ANSWERS_FILE = "responses.jsonl"
GENERATION_FILE = "generation.json"
SCORE_FILES = ("eval_results_strict.jsonl", "eval_results_loose.jsonl", "scores.json")
REPORT_SECTION = ("<!-- ifeval -->", "<!-- /ifeval -->")
"""Markers of the IFEval section in a run's eval/report.md, so a rerun replaces it."""


def build_parser() -> argparse.ArgumentParser:
    parser = StrictArgumentParser(prog="sft ifeval", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--responses", metavar="FILE", help="score these answers (JSONL of prompt, response)")
    source.add_argument("--adapter", metavar="RUN_DIR", help="a training output directory: score base and adapter")
    source.add_argument("--model", help="a base model name or directory: score it alone")
    parser.add_argument("--out", metavar="DIR", help="output directory (default with --adapter: RUN_DIR/eval/ifeval)")
    parser.add_argument("--input-data", metavar="PATH", default=str(DEFAULT_INPUT_DATA),
                        help="the prompts, IFEval's input_data.jsonl "
                             "(default: %(default)s, written by `sft fetch-eval-data`)")
    parser.add_argument("--max-new-tokens", type=int, default=REFERENCE_MAX_NEW_TOKENS,
                        help="longest answer, in tokens (default: %(default)s, as the reference)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N prompts, for a quick look")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="prompts answered together; more is faster until memory runs short (default: %(default)s)")
    parser.add_argument("--skip-base", action="store_true",
                        help="with --adapter: answer and score base + adapter only, not the base model too (its "
                             "answers at 1,280 tokens take as long again; its scores do not change between runs)")
    parser.add_argument("--device", default="auto", help="auto, cpu, mps or cuda (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="replace files in --out of the names it writes that sft did not write (default: refuse)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.responses and not args.out or args.model and not args.out:
        parser.error("--out DIR is required with --responses and --model")
    if args.max_new_tokens < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--max-new-tokens, --batch-size and --limit must be >= 1")
    if args.skip_base and not args.adapter:
        parser.error("--skip-base goes with --adapter (it leaves out the base model's answers)")
    return run_command(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    """Score, holding the writer lock of the folder written into (and of the run's with --adapter):
    its outputs are checked first (never an input, a device, or a file sft did not write there)."""
    out = Path(args.out or Path(args.adapter, "eval", "ifeval"))
    run_dir = Path(args.adapter) if args.adapter else None
    root = run_dir if run_dir and out.resolve().is_relative_to(run_dir.resolve()) else out
    variants = [out] if args.responses else [*([] if args.skip_base else [out / "base"]),
                                             *([out / "adapter"] if run_dir else [])]
    written = [folder / name for folder in variants for name in SCORE_FILES] + ([] if args.responses
                                                                                 else [out / "report.md"])
    # What ifeval reads back (the answers so far, the run's report it adds to) it checks itself.
    # (scoring a --responses file generates nothing: no answers of its own to read back)
    state = [] if args.responses else [folder / name for folder in variants for name in (ANSWERS_FILE, GENERATION_FILE)]
    run_report = run_dir / "eval" / "report.md" if run_dir else None
    state += [run_report] if run_report else []
    inputs = [args.responses, args.input_data]
    check_outputs(state, inputs, force=True)

    def relative(path: Path) -> str:
        return path.resolve().relative_to(root.resolve()).as_posix()

    with contextlib.ExitStack() as held:
        if run_dir and root != run_dir:
            held.enter_context(writer_lock(run_dir))
        held.enter_context(writing_into(root, [relative(path) for path in written], inputs, args.force))
        _score(args, out)
        Manifest.load(root).record(*(relative(path) for path in state
                                     if path.exists() and path.resolve().is_relative_to(root.resolve())))
        if run_report is not None and root != run_dir and run_report.exists():
            # the run's own report, written outside --out: listed in the run's manifest, so that
            # `sft eval` of the run replaces it as sft's own
            Manifest.load(run_dir).record("eval/report.md")


def _score(args: argparse.Namespace, out: Path) -> None:
    every_prompt = read_prompts(args.input_data)
    prompts = every_prompt[:args.limit]
    if args.responses:
        # A responses file answers the whole prompts file; --limit picks which of its answers are scored.
        responses = read_responses(args.responses, every_prompt)
        unanswered = [p for p in prompts if p.prompt not in responses]
        if len(unanswered) == len(prompts):
            raise DataError(f"{args.responses}: none of the {len(prompts)} prompts has a response here; expected "
                            f"JSONL of {{\"prompt\": ..., \"response\": ...}} answering {args.input_data}")
        if unanswered:
            print(f"note: {len(unanswered)} of {len(prompts)} prompts have no response in {args.responses} "
                  f"and are not scored", file=sys.stderr)
        scores = score_responses([p for p in prompts if p.prompt in responses], responses, out)
        print(format_scores({Path(args.responses).name: scores}))
        return
    run = load_run(args.adapter, run_config(args.adapter), args.model, args.device)
    system_prompt = run.config.data.system_prompt
    positions = run.max_positions
    check_prompt_fits(run, max(len(encode_question(run.tokenizer, p.prompt, system_prompt, positions))
                               for p in prompts), args.max_new_tokens)
    variants = {} if args.skip_base else {"base": (run.model_name, None)}
    if args.adapter:
        adapter = Path(args.adapter).resolve()
        variants["adapter"] = (f"{run.model_name} + {adapter.name}", str(adapter))
    named_scores, generation = {}, {}
    for variant, (label, adapter) in variants.items():
        # answered with the adapter merged into a copy of the weights (one matmul a layer); with the
        # adapter off, merged_weights leaves the model as it is
        with run.adapter(enabled=adapter is not None), merged_weights(run.model):
            settings = {"model": run.model_name, "adapter": adapter, "system_prompt": system_prompt,
                        "max_new_tokens": args.max_new_tokens}
            if adapter is not None:  # a run resumed or retrained in place keeps its path, not its answers
                settings["adapter_sha256"] = adapter_fingerprint(Path(adapter))
            responses, generation[label] = answer_prompts(run.model, run.tokenizer, prompts, settings,
                                                          args.batch_size, out / variant)
        named_scores[label] = score_responses(prompts, responses, out / variant)
    report = render_report(named_scores, generation, len(prompts), system_prompt, args.max_new_tokens)
    atomic_write_text(out / "report.md", report)
    if args.adapter:
        add_to_run_report(Path(args.adapter, "eval", "report.md"), report)
    print(format_scores(named_scores))
    print(f"Report: {out / 'report.md'}")


def answer_prompts(model: torch.nn.Module, tokenizer: Any, prompts: list[IFEvalPrompt], settings: dict[str, Any],
                   batch_size: int, out_dir: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Every prompt's answer, generating only those not yet in ``out_dir/responses.jsonl``, and
    the generation's totals (answers, new tokens, and seconds over all runs that wrote the file);
    ``generation.json`` holds the settings and the seconds (sft.inference.answer_log)."""
    log = AnswerLog(out_dir / ANSWERS_FILE, out_dir / GENERATION_FILE, settings)
    done = {}
    for location, record in log.saved():
        if not (isinstance(record.get("prompt"), str) and isinstance(record.get("finished"), bool)
                and isinstance(record.get("new_tokens"), int)):
            raise DataError(f"{location}: not an answer record of sft ifeval (prompt, response, finished, "
                            f"new_tokens); delete {out_dir} to start over")
        done[record["prompt"]] = record
    todo = [p for p in prompts if p.prompt not in done]
    if todo:
        ids = [encode_question(tokenizer, p.prompt, settings["system_prompt"]) for p in todo]
        desc = f"answering ({'base + adapter' if settings['adapter'] else 'base'})"
        with log.appending(len(prompts), len(prompts) - len(todo), desc) as save:
            def on_answer(index: int, answer: Answer) -> None:
                record = {"key": todo[index].key, "prompt": todo[index].prompt, "response": answer.text,
                          "finished": answer.finished, "new_tokens": answer.new_tokens}
                save(record)
                done[todo[index].prompt] = record

            # One batch at a time in file order, so an interrupted run has answered a prefix of the
            # prompts: its partial scores are those of --limit N, not of the longest prompts.
            for start in range(0, len(todo), batch_size):
                generate_greedy(model, tokenizer, ids[start:start + batch_size], settings["max_new_tokens"],
                                end_of_turn_ids(tokenizer), batch_size,
                                on_answer=lambda index, answer, start=start: on_answer(start + index, answer))
    answered = [done[p.prompt] for p in prompts]
    totals = {**log.state, "answers": len(answered), "new_tokens": sum(r["new_tokens"] for r in answered),
              "finished": sum(r["finished"] for r in answered)}
    return {p.prompt: done[p.prompt]["response"] for p in prompts}, totals


def adapter_fingerprint(adapter_dir: Path) -> str:
    """The content hash of the adapter that answers: its own files and, for a DPO run, the SFT
    adapter folded in before it."""
    files = [adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS]
    if (folded := folded_adapter(adapter_dir)) is not None:
        files += [folded / ADAPTER_CONFIG, folded / ADAPTER_WEIGHTS]
    return sha256_of_files(files)


def encode_question(tokenizer: Any, question: str, system_prompt: str | None,
                    positions: int | None = None) -> list[int]:
    """The prompt token ids of a one-turn question, built by the same functions as training's
    (a question too long for ``positions`` cut where that is certain; see generation_prompt)."""
    messages = with_system_prompt([{"role": "user", "content": question}], system_prompt)
    return generation_prompt(tokenizer, messages, positions)


def render_report(named_scores: dict[str, dict[str, Any]], generation: dict[str, dict[str, Any]], prompts: int,
                  system_prompt: str | None, max_new_tokens: int) -> str:
    system = "(template default)" if system_prompt is None else repr(system_prompt)
    lines = [
        "## Instruction following (IFEval)", "",
        (f"{prompts} prompts, greedy answers of at most {max_new_tokens} new tokens, system prompt "
         f"{system}. Accuracy in %: strict judges the answer as it is; loose also accepts it without its first "
         f"or last line or without Markdown `*`."), "",
        format_scores(named_scores), "",
        "| model | answers that ended their turn | new tokens | generation seconds | answers/s | new tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for label, totals in generation.items():
        seconds = totals["seconds"]
        rates = [f"{count / seconds:.2f}" if seconds else "-" for count in (totals["answers"], totals["new_tokens"])]
        lines.append(f"| {label} | {totals['finished']}/{totals['answers']} | {totals['new_tokens']} | "
                     f"{seconds:.0f} | {rates[0]} | {rates[1]} |")
    lines += ["", "### Per instruction type (strict / loose accuracy, %)", "", format_by_instruction(named_scores)]
    return "\n".join(lines) + "\n"


def add_to_run_report(report_path: Path, section: str) -> None:
    """Put the IFEval section into the run's evaluation report, replacing an earlier one."""
    start, end = REPORT_SECTION
    block = f"{start}\n{section}{end}\n"
    text = report_path.read_text(encoding="utf-8") if report_path.is_file() else ""
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end) + 1:]
    else:
        text += ("\n" if text else "") + block
    report_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report_path, text)


if __name__ == "__main__":
    raise SystemExit(main())
