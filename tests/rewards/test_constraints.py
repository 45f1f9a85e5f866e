"""`sft constraints`: generated instructions are scored as intended, never conflict, are
deterministic, and IFEval's test prompts stay out."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sft.errors import DataError
from sft.inference.ifeval.command import main as ifeval_main
from sft.rewards.constraints import build, main, write_records
from sft.rewards.decontaminate import Decontaminator
from sft.rewards.instructions import CONFLICTS, TYPES, Context, compatible, phrase, phrase_fields
from sft.rewards.verify import read_constraint_prompts, reward
from sft.verifiers.instructions import bind
from tests.inference.conftest import SHARED_INPUT_DATA
from tests.rewards.answers import follow_all, follow_and_break
from tests.tiny import write_jsonl, write_prepared_split
from tests.training.tiny_pairs import write_preference_split

IFEVAL_LIKE = [
    {"key": 1, "prompt": "Write a limerick about a cat who learns to play the violin at midnight. Do not use "
                         "any commas.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 2, "prompt": "Describe the history of the printing press in exactly four short paragraphs.",
     "instruction_id_list": ["length_constraints:number_paragraphs"], "kwargs": [{"num_paragraphs": 4}]},
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    train, _ = write_prepared_split(tmp_path_factory.mktemp("sources"), n_train=40, n_val=1)
    return train


@pytest.fixture(scope="module")
def generated(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight instruction sets for each of 40 prompts, through the file layout the scorer reads."""
    records, _ = build([str(sources)], Decontaminator([]), seed=3, variants=8)
    return write_records_at(tmp_path_factory.mktemp("generated") / "constraints.jsonl", records)


def write_records_at(path: Path, records: list[dict]) -> Path:
    write_records(path, records)
    return path


def test_every_instruction_is_scored_as_intended(generated: Path) -> None:
    prompts = read_constraint_prompts(generated)
    seen = set()
    for prompt in prompts:
        for instruction_id, kwargs, check in zip(prompt.instruction_id_list, prompt.kwargs, prompt.checks):
            follow, broken = follow_and_break(instruction_id, kwargs, prompt.reference)
            assert check(follow), (prompt.id, instruction_id, kwargs, follow)
            assert not check(broken), (prompt.id, instruction_id, kwargs, broken)
            seen.add(instruction_id)
    assert seen == set(TYPES)  # every type was drawn, and each was checked both ways


def test_instructions_never_conflict_and_stay_within_bounds(generated: Path) -> None:
    records = [json.loads(line) for line in generated.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 320 and [r["key"] for r in records] == list(range(320))
    for record in records:
        ids = record["instruction_id_list"]
        assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids)
        for a, b in itertools.combinations(ids, 2):
            assert b not in CONFLICTS[a], (record["id"], a, b)
        assert record["messages"][-1] == {"role": "user", "content": record["prompt"]}
    # keywords come from the prompt they are attached to
    for record in records:
        for instruction_id, kwargs in zip(record["instruction_id_list"], record["kwargs"]):
            if instruction_id == "keywords:existence":
                request = record["prompt"].rsplit("\n\n", 1)[0].lower()
                assert all(word in request for word in kwargs["keywords"])


def test_conflict_table_is_symmetric_and_forbids_known_pairs() -> None:
    for a, others in CONFLICTS.items():
        assert a in others and all(a in CONFLICTS[b] for b in others)
    for a, b in [("change_case:english_capital", "change_case:english_lowercase"),
                 ("detectable_format:json_format", "detectable_format:number_bullet_lists"),
                 ("language:response_language", "keywords:existence"),
                 ("length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word")]:
        assert b in CONFLICTS[a]
    assert CONFLICTS["detectable_format:constrained_response"] == frozenset(TYPES)


def test_a_reward_is_the_share_of_instructions_followed(generated: Path) -> None:
    prompt = next(p for p in read_constraint_prompts(generated) if len(p.instruction_id_list) == 3)
    follows = [follow_and_break(i, k, prompt.reference)[0] for i, k in zip(prompt.instruction_id_list, prompt.kwargs)]
    for answer in follows:
        assert reward(prompt, answer) in (1 / 3, 2 / 3, 1.0)
        assert reward(prompt, answer) == sum(check(answer) for check in prompt.checks) / 3
    # loose forgives a preamble line
    quoted = next(p for p in read_constraint_prompts(generated) if p.instruction_id_list == ["startend:quotation"])
    assert reward(quoted, 'Sure:\n"quoted"') == 0.0 and reward(quoted, 'Sure:\n"quoted"', loose=True) == 1.0


def test_same_seed_same_bytes_other_seed_other_draws(sources: Path, tmp_path: Path) -> None:
    ifeval = write_jsonl(tmp_path / "input_data.jsonl", IFEVAL_LIKE)
    runs = {name: ["--source", str(sources), "--out", str(tmp_path / f"{name}.jsonl"), "--seed", str(seed),
                   "--ifeval-prompts", str(ifeval)] for name, seed in (("a", 7), ("b", 7), ("c", 8))}
    assert main(runs["a"]) == 0 and main(runs["c"]) == 0
    # another process with another string hash seed writes the same bytes
    subprocess.run([sys.executable, "-m", "sft.cli", "constraints", *runs["b"]], check=True, capture_output=True,
                   env={**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(Path(__file__).parents[2])})
    outputs = [(tmp_path / f"{name}.jsonl").read_bytes() for name in "abc"]
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]
    # a record's draw depends on its id and the seed, not on the records around it
    reversed_source = write_jsonl(tmp_path / "reversed.jsonl",
                                  [json.loads(line) for line in sources.read_text(encoding="utf-8").splitlines()][::-1])
    records, _ = build([str(reversed_source)], Decontaminator([]), seed=7)
    forward = {r["id"]: r | {"key": None} for r in map(json.loads, outputs[0].decode().splitlines())}
    assert {r["id"]: r | {"key": None} for r in records} == forward


def test_decontamination_drops_a_planted_ifeval_prompt(sources: Path, tmp_path: Path) -> None:
    ifeval = write_jsonl(tmp_path / "input_data.jsonl", IFEVAL_LIKE)
    planted = [json.loads(line) for line in sources.read_text(encoding="utf-8").splitlines()][:6]
    # a test prompt with its first words changed and a different ending still shares 8-grams
    planted[2]["instruction"] = "Compose a limerick about a cat who learns to play the violin at midnight!"
    planted[4]["instruction"] = "Describe the history of the printing press, please."  # 7 shared words: kept
    source = write_jsonl(tmp_path / "planted.jsonl", planted)
    out = tmp_path / "c.jsonl"
    assert main(["--source", str(source), "--out", str(out), "--ifeval-prompts", str(ifeval)]) == 0
    report = json.loads((tmp_path / "c.report.json").read_text(encoding="utf-8"))
    assert report["read"] == report["drawn"] == 6 and report["kept"] == 5 and report["dropped_contaminated"] == 1
    assert report["dropped_contaminated_ids"] == [f"{planted[2]['id']}-c0"]
    assert sum(report["by_type"].values()) == sum(report["instructions_per_prompt"][n] * int(n)
                                                 for n in report["instructions_per_prompt"])
    assert planted[2]["id"] not in out.read_text(encoding="utf-8")


def test_our_phrasings_share_no_six_words_with_ifeval() -> None:
    """Not even six words in a row (eight would drop the prompt), so a phrasing next to another
    sentence does not make an IFEval 8-gram either."""
    if not SHARED_INPUT_DATA.is_file():
        pytest.skip(f"{SHARED_INPUT_DATA} is not here")
    test_prompts = [json.loads(line)["prompt"] for line in SHARED_INPUT_DATA.read_text(encoding="utf-8").splitlines()]
    decontaminator = Decontaminator(test_prompts, n=6)
    contexts = [Context("Describe the migration of monarch butterflies across North America in spring."),
                Context("Start teaching me design patterns in React"), Context("Write a poem about the answer.")]
    for (instruction_id, kind), context in itertools.product(TYPES.items(), contexts):
        for seed in range(40):
            rng = random.Random(seed)
            kwargs = kind.draw(rng, context)
            if kwargs is None:
                continue
            for template in kind.phrasings:
                text = template.format(**phrase_fields(instruction_id, kwargs, rng))
                assert not decontaminator.contaminated(text), (instruction_id, text)


def test_real_ifeval_prompt_is_caught(sources: Path, tmp_path: Path) -> None:
    if not SHARED_INPUT_DATA.is_file():
        pytest.skip(f"{SHARED_INPUT_DATA} is not here")
    test_prompt = json.loads(SHARED_INPUT_DATA.read_text(encoding="utf-8").splitlines()[1])["prompt"]
    planted = [{"id": "planted", "instruction": test_prompt, "input": "", "output": "x", "source": "mix"}]
    source = write_jsonl(tmp_path / "planted.jsonl", planted + [json.loads(sources.read_text().splitlines()[0])])
    assert main(["--source", str(source), "--out", str(tmp_path / "c.jsonl"),
                 "--ifeval-prompts", str(SHARED_INPUT_DATA)]) == 0
    report = json.loads((tmp_path / "c.report.json").read_text(encoding="utf-8"))
    assert report["dropped_contaminated_ids"] == ["planted-c0"] and report["kept"] == 1


def test_preference_files_give_their_prompts(tmp_path: Path) -> None:
    train, _ = write_preference_split(tmp_path, n_train=4, n_val=1)
    records, report = build([str(train)], Decontaminator([]))
    pairs = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines()]
    assert report["read"] == 4 and len(records) == 4
    for record, pair in zip(records, pairs):
        assert record["messages"][:-1] == pair["prompt"][:-1] and record["reference"] == pair["chosen"]
        assert record["prompt"].startswith(pair["prompt"][-1]["content"].rstrip() + "\n\n")


def test_missing_ifeval_prompts_is_one_line_error(sources: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere" / "input_data.jsonl"
    assert main(["--source", str(sources), "--out", str(tmp_path / "c.jsonl"), "--ifeval-prompts", str(missing)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and str(missing) in error and "sft fetch-eval-data" in error
    assert not (tmp_path / "c.jsonl").exists()


def test_bad_constraint_records_name_file_line_and_field(generated: Path, tmp_path: Path) -> None:
    records = [json.loads(line) for line in generated.read_text(encoding="utf-8").splitlines()[:3]]
    records[1]["kwargs"] = [{"num_bulets": 3}] + records[1]["kwargs"][1:]
    records[1]["instruction_id_list"][0] = "detectable_format:number_bullet_lists"
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError, match=rf"^{path}:2: field 'kwargs'\[0\]: .*num_bulets"):
        read_constraint_prompts(path)
    records[1] = {**records[0], "id": "other", "prompt": "not the last turn"}
    with pytest.raises(DataError, match=rf"^{path}:2: field 'prompt'"):
        read_constraint_prompts(write_jsonl(path, records))


def test_sft_ifeval_scores_a_constraints_file(generated: Path, tmp_path: Path) -> None:
    """The records are IFEval's input layout: `sft ifeval --input-data` reads and scores them."""
    records = [json.loads(line) for line in generated.read_text(encoding="utf-8").splitlines()]
    responses = [{"prompt": r["prompt"],
                  "response": follow_and_break(r["instruction_id_list"][0], r["kwargs"][0], r["reference"])[0]}
                 for r in records]
    answers = write_jsonl(tmp_path / "responses.jsonl", responses)
    assert ifeval_main(["--responses", str(answers), "--input-data", str(generated), "--out", str(tmp_path)]) == 0
    results = [json.loads(line) for line in (tmp_path / "eval_results_strict.jsonl").read_text().splitlines()]
    assert len(results) == len(records) and all(r["follow_instruction_list"][0] for r in results)


def test_every_drawn_instruction_set_can_be_followed_at_once(generated: Path) -> None:
    """The conflict table and the argument check leave only sets one answer can satisfy."""
    for prompt in read_constraint_prompts(generated):
        instructions = list(zip(prompt.instruction_id_list, prompt.kwargs))
        answer = follow_all(instructions, lambda text, prompt=prompt: reward(prompt, text) == 1.0)
        assert answer is not None, (prompt.id, instructions)


def test_every_allowed_pair_of_types_can_be_followed_at_once() -> None:
    context = Context("Explain a red bicycle (item 1).\n\nContext 1: quick and a red bicycle.")
    for (a, kind_a), (b, kind_b) in itertools.combinations(TYPES.items(), 2):
        if b in CONFLICTS[a]:
            continue
        for seed in range(3):
            rng = random.Random(seed)
            first, second = (a, kind_a.draw(rng, context)), (b, kind_b.draw(rng, context))
            if not compatible([first], second):
                continue
            checks = [bind(*first), bind(*second)]
            assert follow_all([first, second], lambda text, checks=checks: all(c(text) for c in checks)), (first, second)


def test_multi_turn_prompts_end_at_the_last_user_turn_and_tool_use_is_skipped(tmp_path: Path) -> None:
    turns = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a planet."},
             {"role": "assistant", "content": "Mars."}, {"role": "user", "content": "Name another planet."},
             {"role": "assistant", "content": "Venus."}]
    tool_use = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "weather", "arguments": {}}}]},
                {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    source = write_jsonl(tmp_path / "chats.jsonl", [{"id": "chat", "messages": turns},
                                                    {"id": "tools", "messages": tool_use}])
    records, report = build([str(source)], Decontaminator([]))
    assert report["read"] == 1 and report["skipped_tool_use"] == 1 and len(records) == 1
    assert records[0]["messages"][:-1] == turns[:3] and records[0]["reference"] == "Venus."
    assert records[0]["prompt"].startswith("Name another planet.\n\n")


def test_a_count_of_one_reads_in_the_singular() -> None:
    """Every phrasing, filled with a count of one, says "at least 1 blank", never "1 blanks"."""
    counts = {"num_placeholders", "num_highlights", "num_bullets", "num_sentences", "num_words", "num_paragraphs",
              "num_sections", "capital_frequency", "frequency", "let_frequency"}
    rng = random.Random(0)
    texts = []
    for instruction_id, kind in TYPES.items():
        kwargs = next(filter(None, (kind.draw(rng, Context("Describe the moon over the quiet harbour tonight."))
                                    for _ in range(50))), None)
        if kwargs is None or not counts & set(kwargs):
            continue
        kwargs = {key: 1 if key in counts else value for key, value in kwargs.items()}
        for seed in range(12):
            texts.append(phrase(instruction_id, kwargs, random.Random(seed)))
    assert any("at least 1 blank for" in text for text in texts)
    plural_after_one = [text for text in texts if re.search(r"\b1 (?!or more)(?:[a-z-]+ )?[a-z]+s\b", text)]
    assert not plural_after_one
