"""`sft verify`: score sampled answers by their instructions and turn them into training data.

    sft verify --prompts data/rlvr/constraints.jsonl --samples data/rlvr/base/samples.jsonl --out data/rlvr/base
    sft train --train-file data/rlvr/base/rejection_sft.jsonl ...        # rejection-sampling SFT
    sft dpo --train-file data/rlvr/base/verified_pairs.jsonl ...         # on-policy preference pairs

Every answer of `sft sample` gets a reward: the share of its prompt's instructions it follows
(IFEval's strict judgment; ``--loose`` for the loose one). An answer passes when it follows all of
them. Out of that, in OUT:

- ``rewards.jsonl``: one line per answer, ``{"id", "sample", "reward", "followed", "finished"}``;
- ``rejection_sft.jsonl``: per prompt with a passing answer that ended its turn, the first such
  (lowest j: all passing answers score alike, and the first is an unbiased draw), as a prepared
  SFT conversation ``{"id", "source", "messages"}`` (prompt turns, then the answer);
- ``verified_pairs.jsonl``: per prompt with both, a passing answer (as above) chosen over a
  failing one of the same prompt (the lowest reward, then the lowest j), in the prepared
  preference layout ``{"id", "source", "prompt", "chosen", "rejected"}``; ``--pairs-per-prompt``
  pairs further passing answers with further failing ones;
- with ``--repair``, a prompt without a passing answer gets its best failing answer (that ended
  its turn) edited by rule to follow the instructions about form it failed (sft.rewards.repair),
  kept only if the checkers then pass it: an SFT example and a pair over the unedited answer,
  both with ``"source": "verified-repair"``;
- ``report.json``: pass rates (answers, prompts with a pass, pairs), the mean reward and each
  instruction type's share followed.

An answer cut off by ``--max-new-tokens`` is never chosen: trained on, it would teach the model
to end its turn mid-sentence. It may be rejected.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from sft.config import StrictArgumentParser
from sft.errors import ConfigError, DataError, run_command
from sft.files import atomic_files, sha256_of_files
from sft.inference.answer_log import read_state
from sft.inference.ifeval.scoring import judge
from sft.rewards.repair import repair
from sft.rewards.sample import SETTINGS_FILE, read_samples
from sft.rewards.verify import ConstraintPrompt, read_constraint_prompts

REWARDS_FILE = "rewards.jsonl"
SFT_FILE = "rejection_sft.jsonl"
PAIRS_FILE = "verified_pairs.jsonl"
REPORT_FILE = "report.json"
SFT_SOURCE = "rejection-sampling"
PAIRS_SOURCE = "verified-on-policy"
REPAIR_SOURCE = "verified-repair"


def check_sampled_from(samples: Path, prompts: Path) -> None:
    """Refuse answers that `sft sample` drew for another prompts file (same ids, other instructions
    would be judged by the wrong checks); answers without a sampling.json beside them are taken as given."""
    settings_file = samples.parent / SETTINGS_FILE
    sampled_from = read_state(settings_file).get("settings", {}).get("prompts_sha256")
    if sampled_from not in (None, sha256_of_files([prompts])):
        raise DataError(f"{samples}: answers prompts whose file had sha256 {sampled_from} ({settings_file}), not "
                        f"{prompts}; pass the --prompts they were sampled from")


def score_samples(prompts: list[ConstraintPrompt], samples: dict[tuple[str, int], dict[str, Any]],
                  loose: bool, samples_path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Prompt id -> its answers (in order of j), each with ``reward`` and ``followed`` added."""
    by_id = {prompt.id: prompt for prompt in prompts}
    scored: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (prompt_id, _), sample in sorted(samples.items()):
        if prompt_id not in by_id:
            raise DataError(f"{samples_path}: answers prompt id {prompt_id!r}, which the prompts file does not hold "
                            f"(pass the --prompts it was sampled from)")
        followed = judge(by_id[prompt_id], sample["response"], loose)
        scored[prompt_id].append(sample | {"reward": sum(followed) / len(followed), "followed": followed})
    return scored


def repaired_answer(prompt: ConstraintPrompt, answers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best failing answer that ended its turn (highest reward, then lowest j) whose verified
    repair follows every instruction, as an answer record with the repair as its response and
    ``repaired_from`` the original; None if no answer repairs."""
    for answer in sorted((a for a in answers if a["reward"] < 1.0 and a["finished"]),
                         key=lambda a: (-a["reward"], a["sample"])):
        edited = repair(prompt, answer["response"])
        if edited is not None:
            return answer | {"response": edited, "reward": 1.0, "repaired_from": answer}
    return None


def training_data(prompts: list[ConstraintPrompt], scored: dict[str, list[dict[str, Any]]],
                  pairs_per_prompt: int = 1, with_repairs: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rejection-sampling conversations and the verified preference pairs; ``with_repairs``:
    a prompt without a passing answer gets its best repairable answer's verified repair instead,
    chosen over that answer unedited."""
    conversations, pairs = [], []
    for prompt in prompts:
        answers = scored.get(prompt.id, [])
        passing = [a for a in answers if a["reward"] == 1.0 and a["finished"]]
        failing = sorted((a for a in answers if a["reward"] < 1.0), key=lambda a: (a["reward"], a["sample"]))
        if not passing and with_repairs:
            repaired = repaired_answer(prompt, answers)
            if repaired is not None:
                original = repaired["repaired_from"]
                conversations.append({"id": f"{prompt.id}-s{original['sample']}-repaired", "source": REPAIR_SOURCE,
                                       "messages": [*prompt.messages,
                                                    {"role": "assistant", "content": repaired["response"]}]})
                pairs.append({"id": f"{prompt.id}-s{original['sample']}-repaired", "source": REPAIR_SOURCE,
                              "prompt": prompt.messages, "chosen": repaired["response"],
                              "rejected": original["response"]})
            continue
        if passing:
            best = passing[0]
            conversations.append({"id": f"{prompt.id}-s{best['sample']}", "source": SFT_SOURCE,
                                  "messages": [*prompt.messages, {"role": "assistant", "content": best["response"]}]})
        for chosen, rejected in list(zip(passing, failing))[:pairs_per_prompt]:
            pairs.append({"id": f"{prompt.id}-s{chosen['sample']}-s{rejected['sample']}", "source": PAIRS_SOURCE,
                          "prompt": prompt.messages, "chosen": chosen["response"], "rejected": rejected["response"]})
    return conversations, pairs


def _share(part: float, whole: int) -> float:
    return part / whole if whole else 0.0


def report(prompts: list[ConstraintPrompt], scored: dict[str, list[dict[str, Any]]], conversations: list[Any],
           pairs: list[Any], loose: bool) -> dict[str, Any]:
    answers = [a for prompt in prompts for a in scored.get(prompt.id, [])]
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for prompt in prompts:
        for answer in scored.get(prompt.id, []):
            for instruction_id, ok in zip(prompt.instruction_id_list, answer["followed"]):
                by_type[instruction_id][0] += ok
                by_type[instruction_id][1] += 1
    sampled = [p for p in prompts if scored.get(p.id)]
    return {
        "judgment": "loose" if loose else "strict",
        "prompts": len(prompts), "prompts_sampled": len(sampled), "answers": len(answers),
        "answers_finished": sum(a["finished"] for a in answers),
        "mean_reward": _share(sum(a["reward"] for a in answers), len(answers)),
        "answer_pass_rate": _share(sum(a["reward"] == 1.0 for a in answers), len(answers)),
        "prompt_pass_rate": _share(sum(any(a["reward"] == 1.0 for a in scored[p.id]) for p in sampled), len(sampled)),
        "sft_examples": len(conversations), "pairs": len(pairs),
        "sft_examples_repaired": sum(c["source"] == REPAIR_SOURCE for c in conversations),
        "pairs_repaired": sum(p["source"] == REPAIR_SOURCE for p in pairs),
        "followed_by_instruction": {instruction_id: {"followed": counts[0], "judged": counts[1],
                                                     "rate": _share(counts[0], counts[1])}
                                    for instruction_id, counts in sorted(by_type.items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="sft verify", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", required=True, metavar="JSONL", help="constraint prompts (`sft constraints`)")
    parser.add_argument("--samples", required=True, metavar="JSONL", help="their answers (`sft sample`)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the rewards, data and report go")
    parser.add_argument("--loose", action="store_true", help="judge loosely (IFEval's loose accuracy)")
    parser.add_argument("--pairs-per-prompt", type=int, default=1, help="most pairs per prompt (default: %(default)s)")
    parser.add_argument("--repair", action="store_true",
                        help="a prompt without a passing answer gets its best answer edited by rule to follow "
                             "instructions about form (case, quotes, title, ending, ...), kept only if it then "
                             "follows all of them: an SFT example and a pair over the unedited answer")
    args = parser.parse_args(argv)

    def run() -> None:
        if args.pairs_per_prompt < 1:
            raise ConfigError("--pairs-per-prompt must be >= 1")
        if not Path(args.samples).is_file():
            raise DataError(f"{args.samples}: no samples file here; write one with `sft sample`")
        out = Path(args.out)
        outputs = [out / name for name in (REWARDS_FILE, SFT_FILE, PAIRS_FILE, REPORT_FILE)]
        if any(path.resolve() in (Path(args.prompts).resolve(), Path(args.samples).resolve()) for path in outputs):
            raise ConfigError(f"--out {out} would overwrite an input; write elsewhere")
        check_sampled_from(Path(args.samples), Path(args.prompts))
        prompts = read_constraint_prompts(args.prompts)
        scored = score_samples(prompts, read_samples(args.samples), args.loose, args.samples)
        conversations, pairs = training_data(prompts, scored, args.pairs_per_prompt, args.repair)
        summary = report(prompts, scored, conversations, pairs, args.loose)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_files(outputs) as (rewards_file, sft_file, pairs_file, report_file):
            for prompt in prompts:
                rewards_file.writelines(json.dumps({key: a[key] for key in ("id", "sample", "reward", "followed",
                                                                             "finished")}) + "\n"
                                        for a in scored.get(prompt.id, []))
            sft_file.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations)
            pairs_file.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
            report_file.write(json.dumps(summary, indent=2) + "\n")
        print(f"{summary['answers']} answers to {summary['prompts_sampled']} prompts: mean reward "
              f"{summary['mean_reward']:.3f}, {100 * summary['answer_pass_rate']:.1f}% of answers and "
              f"{100 * summary['prompt_pass_rate']:.1f}% of prompts pass ({summary['judgment']}); wrote "
              f"{len(conversations)} SFT examples ({outputs[1]}) and {len(pairs)} pairs ({outputs[2]})"
              + (f", {summary['sft_examples_repaired']} of each repaired" if args.repair else ""))

    return run_command(run)


if __name__ == "__main__":
    raise SystemExit(main())
