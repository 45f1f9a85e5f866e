"""Verified repairs: every edit makes a failing answer follow its instruction; content instructions,
edits that do not suffice and passing answers give nothing; `sft verify --repair` adds each repair
as an SFT example and a pair over the unedited answer, with counts that add up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sft.data.prepared import read_conversations, read_preferences
from sft.rewards.datasets import PAIRS_FILE, REPAIR_SOURCE, REPORT_FILE, SFT_FILE, main
from sft.rewards.repair import EDITS, repair
from sft.rewards.verify import ConstraintPrompt, reward
from sft.verifiers.instructions import bind
from tests.tiny import write_jsonl

ANSWER = "Tea is brewed from leaves, then served hot.\nMany people drink it every morning."
REQUEST = "Describe how tea is made."

KWARGS: dict[str, dict[str, Any]] = {
    "detectable_format:number_highlighted_sections": {"num_highlights": 2},
    "detectable_content:postscript": {"postscript_marker": "P.S."},
    "startend:end_checker": {"end_phrase": "Is there anything else I can help with?"},
    "detectable_format:title": {},
    "combination:repeat_prompt": {"prompt_to_repeat": REQUEST},
    "detectable_format:json_format": {},
    "startend:quotation": {},
    "change_case:english_lowercase": {},
    "change_case:english_capital": {},
    "punctuation:no_comma": {},
}


def constraint_prompt(instructions: list[tuple[str, dict[str, Any]]], key: int = 1) -> ConstraintPrompt:
    ids, kwargs = [i for i, _ in instructions], [k for _, k in instructions]
    text = f"{REQUEST}\n\n(instructions)"
    return ConstraintPrompt(key, text, ids, kwargs, [bind(i, k) for i, k in instructions], f"p{key}",
                            [{"role": "user", "content": text}], None)


@pytest.mark.parametrize("instruction_id", sorted(EDITS))
def test_each_edit_repairs_its_instruction(instruction_id: str) -> None:
    prompt = constraint_prompt([(instruction_id, KWARGS[instruction_id])])
    assert reward(prompt, ANSWER) == 0.0
    repaired = repair(prompt, ANSWER)
    assert repaired is not None and reward(prompt, repaired) == 1.0
    assert repair(prompt, repaired) is None  # a passing answer needs no repair


def test_edits_compose_and_keep_what_already_passed() -> None:
    instructions = [("combination:repeat_prompt", KWARGS["combination:repeat_prompt"]),
                    ("detectable_format:title", {}), ("startend:end_checker", KWARGS["startend:end_checker"]),
                    ("change_case:english_lowercase", {}), ("punctuation:no_comma", {}),
                    ("keywords:existence", {"keywords": ["leaves"]})]  # content, already followed
    prompt = constraint_prompt(instructions)
    repaired = repair(prompt, ANSWER)
    assert repaired is not None and reward(prompt, repaired) == 1.0
    assert repaired.startswith(REQUEST.lower()) and "<<" in repaired and "," not in repaired


def test_content_instructions_and_edits_that_fall_short_give_nothing() -> None:
    # a failed content instruction has no edit, even beside one that does
    prompt = constraint_prompt([("keywords:existence", {"keywords": ["kettle"]}), ("startend:quotation", {})])
    assert repair(prompt, ANSWER) is None
    # lower-casing the whole answer breaks the capitals another instruction asks for
    prompt = constraint_prompt([("change_case:english_lowercase", {}),
                                ("change_case:capital_word_frequency",
                                 {"capital_frequency": 1, "capital_relation": "at least"})])
    assert repair(prompt, "TEA is brewed from leaves.") is None


def test_sft_verify_repair_adds_examples_and_pairs(tmp_path: Path) -> None:
    prompts = [constraint_prompt([("startend:quotation", {})], 1),          # repairable
               constraint_prompt([("keywords:existence", {"keywords": ["kettle"]})], 2),  # not repairable
               constraint_prompt([("change_case:english_capital", {})], 3)]           # one answer passes
    records = [{"id": p.id, "key": p.key, "prompt": p.prompt, "messages": p.messages,
                "instruction_id_list": p.instruction_id_list, "kwargs": p.kwargs} for p in prompts]
    prompts_file = write_jsonl(tmp_path / "constraints.jsonl", records)
    answers = {"p1": [ANSWER, "Short.", ANSWER + " More."], "p2": [ANSWER, ANSWER], "p3": [ANSWER, ANSWER.upper()]}
    samples = [{"id": pid, "sample": j, "seed": j, "response": text, "finished": j != 0 or pid != "p1",
                "new_tokens": 9} for pid, texts in answers.items() for j, text in enumerate(texts)]
    samples_file = write_jsonl(tmp_path / "samples.jsonl", samples)
    out = tmp_path / "out"
    assert main(["--prompts", str(prompts_file), "--samples", str(samples_file), "--out", str(out), "--repair"]) == 0

    conversations = {c["id"]: c for c in read_conversations(out / SFT_FILE)}
    pairs = {p["id"]: p for p in read_preferences(out / PAIRS_FILE)}
    # p1: the cut-off answer (j=0) is never used; of the finished ones (alike in reward) the lowest j
    assert set(conversations) == {"p1-s1-repaired", "p3-s1"} and set(pairs) == {"p1-s1-repaired", "p3-s1-s0"}
    assert conversations["p1-s1-repaired"]["source"] == REPAIR_SOURCE
    assert conversations["p1-s1-repaired"]["messages"][-1]["content"] == '"Short."'
    assert pairs["p1-s1-repaired"]["chosen"] == '"Short."' and pairs["p1-s1-repaired"]["rejected"] == "Short."
    report = json.loads((out / REPORT_FILE).read_text())
    assert (report["sft_examples"], report["pairs"], report["sft_examples_repaired"], report["pairs_repaired"]) \
        == (2, 2, 1, 1)

    assert main(["--prompts", str(prompts_file), "--samples", str(samples_file), "--out", str(tmp_path / "plain")]) == 0
    assert [c["id"] for c in read_conversations(tmp_path / "plain" / SFT_FILE)] == ["p3-s1"]
