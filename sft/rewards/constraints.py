"""`sft constraints`: prompts with instructions a program can check, for verifiable rewards.

    sft constraints --source data/processed/sft_train.jsonl --out data/rlvr/constraints.jsonl
    sft constraints --source dpo_train.jsonl --variants 2 --max-instructions 2 --seed 1 --out c.jsonl

Takes the prompts of prepared SFT or preference files (everything up to the last user turn) and
appends 1-3 instructions to the last user turn, drawn from IFEval's 25 checkable types with
randomized arguments (counts, keywords from the prompt, forbidden words, case, JSON, bullets,
sections, placeholders, postscripts, end phrases, quotation, title, highlights, language, ...),
each phrased in one of several ways of our own, never in conflicting pairs (see
sft.rewards.instructions). Conversations that use tools are skipped.

Each output line is one prompt:

    {"id", "key", "source", "source_id", "prompt", "messages", "instruction_id_list", "kwargs", "reference"}

``prompt`` is the last user turn with its instructions and ``messages`` the whole prompt
conversation ending with that turn (what `sft sample` and `sft grpo` answer); ``key``,
``prompt``, ``instruction_id_list`` and ``kwargs`` are IFEval's ``input_data.jsonl`` layout, so
`sft ifeval --input-data` scores answers to it; ``reference`` is the source's own answer (None
where it has none), ``source_id`` the source record's id.

Decontamination is part of the command: a prompt sharing any word 8-gram with IFEval's 541 test
prompts (``--ifeval-prompts``) is dropped, counted and named in the report written beside the
output (``*.report.json``: ``read`` source prompts, ``drawn`` = read x ``--variants`` instruction
sets, of which ``kept`` plus each ``dropped_*`` count add up to ``drawn``, and counts per type). The same sources, seed and flags give the same file byte for byte;
each prompt's instructions are drawn from a generator seeded by the seed and the record's id, so
adding or removing other records does not change them.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from sft.config import StrictArgumentParser
from sft.data.prepared import read_conversations, read_preferences
from sft.errors import ConfigError, DataError, run_command
from sft.files import atomic_write_text
from sft.inference.ifeval.data import DEFAULT_INPUT_DATA
from sft.rewards.decontaminate import NGRAM, Decontaminator
from sft.rewards.instructions import TYPES, Context, draw_instructions, phrase

Record = dict[str, Any]


def source_prompts(path: str | Path) -> tuple[list[Record], int]:
    """The prompts of a prepared SFT or preference file as ``{"id", "source", "messages",
    "reference"}`` (turns as role and content only), and how many conversations were skipped for
    using tools."""
    if _first_record(Path(path)).keys() >= {"chosen", "rejected", "prompt"}:
        return [{"id": p["id"], "source": p["source"], "messages": p["prompt"], "reference": p["chosen"]}
                for p in read_preferences(path)], 0
    prompts, skipped = [], 0
    for conversation in read_conversations(path):
        messages = conversation["messages"]
        if conversation.get("tools") or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            skipped += 1
            continue
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        prompts.append({"id": conversation["id"], "source": conversation["source"],
                        "messages": [{"role": m["role"], "content": m["content"]} for m in messages[:last_user + 1]],
                        "reference": messages[last_user + 1]["content"] if last_user + 1 < len(messages) else None})
    return prompts, skipped


def _first_record(path: Path) -> dict[str, Any]:
    """The first line's object, to tell a preference file from an SFT file ({} where unreadable:
    the SFT reader then names the problem)."""
    try:
        with path.open(encoding="utf-8-sig") as handle:
            line = next((line for line in handle if line.strip()), "")
        record = json.loads(line)
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def constrain(prompt: Record, variant: int, seed: int, min_instructions: int, max_instructions: int,
              types: list[str]) -> Record | None:
    """The prompt with instructions appended to its last user turn (None where fewer than
    ``min_instructions`` fit), without its ``key``."""
    rng = random.Random(f"{seed}:{prompt['id']}:{variant}")
    request = prompt["messages"][-1]["content"]
    instructions = draw_instructions(rng, Context(request), rng.randint(min_instructions, max_instructions), types)
    if len(instructions) < min_instructions:
        return None
    sentences = [phrase(instruction_id, kwargs, rng) for instruction_id, kwargs in instructions]
    text = f"{request.rstrip()}\n\n{rng.choice((' ', chr(10))).join(sentences)}"
    return {"id": f"{prompt['id']}-c{variant}", "source": prompt["source"], "source_id": prompt["id"],
            "prompt": text, "messages": [*prompt["messages"][:-1], {"role": "user", "content": text}],
            "instruction_id_list": [instruction_id for instruction_id, _ in instructions],
            "kwargs": [kwargs for _, kwargs in instructions], "reference": prompt["reference"]}


def build(sources: list[str], decontaminator: Decontaminator, seed: int = 0, variants: int = 1,
          min_instructions: int = 1, max_instructions: int = 3, types: list[str] | None = None,
          limit: int | None = None) -> tuple[list[Record], dict[str, Any]]:
    """The constraint prompts of the sources and the report of what happened to each source prompt."""
    types = sorted(types or TYPES)
    prompts, skipped_tools = [], 0
    for path in sources:
        read, skipped = source_prompts(path)
        prompts += read
        skipped_tools += skipped
    prompts = prompts[:limit]
    records: list[Record] = []
    seen: set[str] = set()
    report: dict[str, Any] = {"sources": sources, "seed": seed, "variants": variants, "ngram": NGRAM,
                              "read": len(prompts), "skipped_tool_use": skipped_tools,
                              "drawn": len(prompts) * variants, "kept": 0,
                              "dropped_contaminated": 0, "dropped_duplicate": 0, "dropped_too_few_instructions": 0,
                              "dropped_contaminated_ids": []}
    for prompt in prompts:
        for variant in range(variants):
            record = constrain(prompt, variant, seed, min_instructions, max_instructions, types)
            if record is None:
                report["dropped_too_few_instructions"] += 1
            elif decontaminator.contaminated("\n".join(m["content"] for m in record["messages"])):
                report["dropped_contaminated"] += 1
                report["dropped_contaminated_ids"].append(record["id"])
            elif (identity := json.dumps(record["messages"])) in seen or record["prompt"] in seen:
                report["dropped_duplicate"] += 1
            else:
                seen.update((identity, record["prompt"]))
                records.append({"id": record["id"], "key": len(records), **record})
    by_type = Counter(instruction_id for record in records for instruction_id in record["instruction_id_list"])
    report |= {"kept": len(records),
               "instructions_per_prompt": dict(sorted(Counter(str(len(r["instruction_id_list"])) for r in records)
                                                      .items())),
               "by_type": {instruction_id: by_type[instruction_id] for instruction_id in types}}
    return records, report


def write_records(path: Path, records: list[Record]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="sft constraints", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, nargs="+", metavar="JSONL",
                        help="prepared SFT or preference files whose prompts get instructions")
    parser.add_argument("--out", required=True, metavar="JSONL", help="the constraint prompts to write")
    parser.add_argument("--report", metavar="JSON", help="the report (default: beside --out, *.report.json)")
    parser.add_argument("--ifeval-prompts", default=str(DEFAULT_INPUT_DATA), metavar="PATH",
                        help="IFEval's input_data.jsonl, for decontamination (default: %(default)s, written by "
                             "`sft fetch-eval-data`)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the instructions drawn (default: %(default)s)")
    parser.add_argument("--variants", type=int, default=1,
                        help="instruction sets drawn per source prompt, each a record (default: %(default)s)")
    parser.add_argument("--min-instructions", type=int, default=1, help="fewest per prompt (default: %(default)s)")
    parser.add_argument("--max-instructions", type=int, default=3, help="most per prompt (default: %(default)s)")
    parser.add_argument("--types", metavar="ID,ID", help="only these instruction types (comma-separated ids, "
                                                         "e.g. punctuation:no_comma,startend:quotation)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N source prompts")
    args = parser.parse_args(argv)

    def run() -> None:
        if not 1 <= args.min_instructions <= args.max_instructions or args.variants < 1:
            raise ConfigError("need 1 <= --min-instructions <= --max-instructions and --variants >= 1")
        types = args.types.split(",") if args.types else None
        unknown = sorted(set(types or []) - set(TYPES))
        if unknown:
            raise ConfigError(f"--types: unknown instruction ids {unknown}; known: {', '.join(sorted(TYPES))}")
        out = Path(args.out)
        report_path = Path(args.report) if args.report else out.with_suffix(".report.json")
        if any(out.resolve() == Path(source).resolve() or report_path.resolve() == Path(source).resolve()
               for source in args.source):
            raise ConfigError(f"--out {out} (or its report) is one of the --source files; write elsewhere")
        decontaminator = Decontaminator.from_ifeval(args.ifeval_prompts)
        records, report = build(args.source, decontaminator, args.seed, args.variants, args.min_instructions,
                                args.max_instructions, types, args.limit)
        if not records:
            raise DataError(f"no prompts left out of {report['read']} in {', '.join(args.source)} "
                            f"(contaminated {report['dropped_contaminated']}, tool use {report['skipped_tool_use']})")
        write_records(out, records)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(report_path, json.dumps(report | {"ifeval_prompts": args.ifeval_prompts}, indent=2) + "\n")
        print(f"wrote {len(records)} constraint prompts to {out} (read {report['read']}, dropped "
              f"{report['dropped_contaminated']} sharing an {NGRAM}-gram with IFEval, "
              f"{report['dropped_duplicate']} duplicates); report: {report_path}")

    return run_command(run)


if __name__ == "__main__":
    raise SystemExit(main())
