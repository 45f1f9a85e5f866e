"""Rewards from checkable instructions: the share of a prompt's instructions an answer follows.

The judge is IFEval's own (sft.verifiers): strict judges the answer as it is, loose also
accepts an instruction followed once the first or last line or the Markdown ``*`` are removed.
A constraint prompt (what `sft constraints` writes) is read into a :class:`ConstraintPrompt`, an
IFEval prompt with its id, prompt conversation and reference answer, every instruction bound to
its checker as the file is read, so a bad argument stops a command before a model is loaded.

    prompts = read_constraint_prompts("constraints.jsonl")
    reward(prompts[0], "answer text")            # 0.0 .. 1.0, strict
    reward(prompts[0], "answer text", loose=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.data.prepared import read_prompts
from sft.data.sources import describe_json_type
from sft.errors import DataError
from sft.inference.ifeval.data import IFEvalPrompt
from sft.verifiers.instructions import followed, record_checks


@dataclass(frozen=True)
class ConstraintPrompt(IFEvalPrompt):
    id: str
    messages: list[dict[str, Any]]
    """The prompt conversation, ending with the user turn that holds the instructions."""
    reference: str | None
    """The source's own answer to the prompt without its instructions, where it had one."""


def read_constraint_prompts(path: str | Path) -> list[ConstraintPrompt]:
    """The prompts of a constraints file, in file order; anything unusable raises DataError
    naming the file, line and field."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no constraint prompts file here; write one with `sft constraints`")
    prompts, seen = [], set()
    for where, record in read_prompts(path, "sft constraints"):
        for name, kind in (("key", int), ("prompt", str)):
            if not isinstance(record.get(name), kind) or isinstance(record.get(name), bool):
                found = "it is missing" if name not in record else f"got {describe_json_type(record[name])}"
                raise DataError(f"{where}: field {name!r} must be {kind.__name__}, but {found}")
        checks = record_checks(where, record)
        if record["messages"][-1]["content"] != record["prompt"]:
            raise DataError(f"{where}: field 'prompt' must be the content of the last turn of 'messages'")
        if record["id"] in seen:
            raise DataError(f"{where}: field 'id' repeats an earlier line's ({record['id']!r})")
        seen.add(record["id"])
        reference = record.get("reference")
        prompts.append(ConstraintPrompt(record["key"], record["prompt"], record["instruction_id_list"],
                                        record["kwargs"], checks, record["id"], record["messages"],
                                        reference if isinstance(reference, str) else None))
    return prompts


def reward(prompt: IFEvalPrompt, response: str, loose: bool = False) -> float:
    """The share of the prompt's instructions the response follows (1.0: all of them)."""
    judgments = followed(prompt.checks, response, loose)
    return sum(judgments) / len(judgments)
