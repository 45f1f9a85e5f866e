"""`sft verify`: rewards of sampled answers, the rejection-sampling SFT set and verified pairs, and
that both train with `sft train` and `sft dpo`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.data.prepared import read_conversations, read_preferences
from sft.errors import DataError
from sft.recipes import dpo as dpo_recipe
from sft.recipes.sft import main as sft_main
from sft.rewards.constraints import build, write_records
from sft.rewards.datasets import PAIRS_FILE, REPORT_FILE, REWARDS_FILE, SFT_FILE, check_sampled_from, main
from sft.rewards.decontaminate import Decontaminator
from sft.rewards.sample import main as sample_main
from tests.rewards.answers import follow_and_break
from tests.tiny import as_flags, conversation_records, logged, tiny_run_overrides, write_jsonl


@pytest.fixture(scope="module")
def verified(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], Path]:
    """Six one-instruction prompts; answers: j=0 breaks the instruction, j=1 follows it, j=2 follows
    it but was cut off; the last prompt has only broken answers."""
    directory = tmp_path_factory.mktemp("verify")
    source = write_jsonl(directory / "sft.jsonl", conversation_records(6))
    records, _ = build([str(source)], Decontaminator([]), seed=2, max_instructions=1)
    prompts = directory / "constraints.jsonl"
    write_records(prompts, records)
    samples = []
    for index, record in enumerate(records):
        follow, broken = follow_and_break(record["instruction_id_list"][0], record["kwargs"][0], record["reference"])
        answers = [(broken, True), (follow, True), (follow + " ", False)] if index < 5 else [(broken, True)] * 2
        samples += [{"id": record["id"], "sample": j, "seed": j, "response": text, "finished": finished,
                     "new_tokens": 5} for j, (text, finished) in enumerate(answers)]
    write_jsonl(directory / "samples.jsonl", samples)
    assert main(["--prompts", str(prompts), "--samples", str(directory / "samples.jsonl"),
                 "--out", str(directory / "out")]) == 0
    return prompts, records, directory / "out"


def test_rewards_data_and_report(verified: tuple[Path, list[dict], Path]) -> None:
    _, records, out = verified
    rewards = [json.loads(line) for line in (out / REWARDS_FILE).read_text(encoding="utf-8").splitlines()]
    assert [(r["sample"], r["reward"], r["finished"]) for r in rewards[:3]] == [(0, 0.0, True), (1, 1.0, True),
                                                                               (2, 1.0, False)]
    conversations = read_conversations(out / SFT_FILE)
    assert [c["id"] for c in conversations] == [f"{r['id']}-s1" for r in records[:5]]
    for conversation, record in zip(conversations, records):
        assert conversation["messages"][:-1] == record["messages"]
        assert conversation["messages"][-1]["role"] == "assistant"
    pairs = read_preferences(out / PAIRS_FILE)
    assert [p["id"] for p in pairs] == [f"{r['id']}-s1-s0" for r in records[:5]]
    assert all(p["prompt"] == r["messages"] and p["chosen"] != p["rejected"] for p, r in zip(pairs, records))
    report = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    assert report["answers"] == 17 and report["answers_finished"] == 12
    assert report["answer_pass_rate"] == 10 / 17 and report["prompt_pass_rate"] == 5 / 6
    assert report["sft_examples"] == 5 and report["pairs"] == 5 and report["judgment"] == "strict"
    assert sum(t["judged"] for t in report["followed_by_instruction"].values()) == 17


def test_outputs_train_with_sft_and_dpo(verified: tuple[Path, list[dict], Path], tiny_model_dir: Path,
                                        tmp_path: Path) -> None:
    _, _, out = verified
    sft_file, pairs_file = out / SFT_FILE, out / PAIRS_FILE
    assert sft_main(as_flags(tiny_run_overrides(tiny_model_dir, sft_file, sft_file, tmp_path / "sft", max_steps=1,
                                                max_seq_length=256))) == 0
    assert 1 in logged(tmp_path / "sft")
    assert dpo_recipe.main(as_flags(tiny_run_overrides(tiny_model_dir, pairs_file, pairs_file, tmp_path / "dpo",
                                                       max_steps=1, max_seq_length=256, batch_size=2,
                                                       lora_dropout=0.0))) == 0
    assert 1 in logged(tmp_path / "dpo")


def test_answers_to_unknown_prompts_are_refused(verified: tuple[Path, list[dict], Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    prompts, _, _ = verified
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"id": "nope", "sample": 0, "response": "x", "finished": True}])
    assert main(["--prompts", str(prompts), "--samples", str(samples), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "'nope'" in error and str(samples) in error


def test_sampled_answers_of_the_tiny_model_verify(verified: tuple[Path, list[dict], Path], tiny_model_dir: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts, _, _ = verified
    assert sample_main(["--prompts", str(prompts), "--model", str(tiny_model_dir), "--out", str(tmp_path),
                        "--k", "2", "--max-new-tokens", "4", "--limit", "3", "--device", "cpu"]) == 0
    assert main(["--prompts", str(prompts), "--samples", str(tmp_path / "samples.jsonl"), "--out",
                 str(tmp_path / "verified"), "--loose"]) == 0
    report = json.loads((tmp_path / "verified" / REPORT_FILE).read_text(encoding="utf-8"))
    assert report["answers"] == 6 and report["prompts_sampled"] == 3 and report["judgment"] == "loose"
    # the same ids with other instructions: the answers were not drawn for them
    records = [json.loads(line) for line in prompts.read_text(encoding="utf-8").splitlines()]
    records[0] |= {"instruction_id_list": ["startend:quotation"], "kwargs": [{}]}
    other = write_jsonl(tmp_path / "other.jsonl", records)
    capsys.readouterr()
    assert main(["--prompts", str(other), "--samples", str(tmp_path / "samples.jsonl"), "--out",
                 str(tmp_path / "verified")]) == 2
    assert "pass the --prompts they were sampled from" in capsys.readouterr().err


@pytest.mark.parametrize("state", ['{"settings": ', '{"settings": [], "seconds": 1}'])
def test_damaged_sampling_settings_are_named_not_a_traceback(tmp_path: Path, state: str) -> None:
    (tmp_path / "sampling.json").write_text(state, encoding="utf-8")
    with pytest.raises(DataError, match=f"^{tmp_path / 'sampling.json'}: not .*generate it again"):
        check_sampled_from(tmp_path / "samples.jsonl", tmp_path / "prompts.jsonl")
