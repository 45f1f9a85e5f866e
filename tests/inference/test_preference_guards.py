"""Preference pairs that carry no preference once cut, repeated ids, and eval-dpo on an SFT run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.data.pairs import encode_pairs
from sft.inference.preference_eval import main as eval_dpo_main
from tests.recipes.test_dpo_recipe import dpo_run, pair_files, sft_run  # noqa: F401 - fixtures
from tests.reliability.helpers import assert_user_error
from tests.tiny import write_jsonl
from tests.training.tiny_pairs import preference_records


def test_pairs_identical_after_truncation_are_dropped_and_counted(chatml_tokenizer) -> None:  # noqa: ANN001
    common = " ".join(f"word{i}" for i in range(200))
    pairs = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}],
              "chosen": f"{common} yes", "rejected": f"{common} no"} for i in range(3)]
    pairs.append({"id": "short", "prompt": [{"role": "user", "content": "Q?"}], "chosen": "yes", "rejected": "no"})
    encoded, stats = encode_pairs(chatml_tokenizer, pairs, max_seq_length=64, system_prompt=None, progress=False)
    assert [pair["id"] for pair in encoded] == ["short"]
    assert stats.dropped_identical_after_truncation == 3 and stats.dropped_no_answer_tokens == 0
    assert stats.as_dict()["dropped_ids"] == ["p0", "p1", "p2"] and stats.read == stats.kept + 3


def test_eval_dpo_rows_show_their_own_prompt_when_ids_repeat(dpo_run: Path, tmp_path: Path) -> None:  # noqa: F811
    pairs = [pair | {"id": "same"} for pair in preference_records(4)]
    val = write_jsonl(tmp_path / "val.jsonl", pairs)
    assert eval_dpo_main(["--adapter", str(dpo_run), "--val-file", str(val), "--output-dir", str(dpo_run),
                          "--num-generations", "4", "--max-new-tokens", "2"]) == 0
    rows = [json.loads(line) for line in (dpo_run / "eval" / "preference_generations.jsonl").read_text().splitlines()]
    assert [(row["prompt"], row["chosen"]) for row in rows] == [(pair["prompt"], pair["chosen"]) for pair in pairs]


def test_eval_dpo_on_an_sft_run_is_one_error_line(sft_run: Path, pair_files: tuple[Path, Path],  # noqa: F811
                                                  capsys: pytest.CaptureFixture) -> None:
    status = eval_dpo_main(["--adapter", str(sft_run), "--val-file", str(pair_files[1]), "--output-dir", str(sft_run)])
    assert_user_error(status, capsys.readouterr().err, str(sft_run), "not a DPO run", "sft eval")
