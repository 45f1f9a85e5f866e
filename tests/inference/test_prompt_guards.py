"""Generation prompts that cannot fit the model: a huge record costs no more than a long one to
refuse (eval, onpolicy-pairs, chat and ifeval cut it before tokenizing, as training does), and
onpolicy-pairs passes over prompts that leave no room to answer, as eval does."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import pytest

import sft.data.templates
from sft.data.tokenize import generation_prompt
from sft.inference.onpolicy import main as onpolicy_main
from tests.recipes.test_dpo_recipe import sft_run  # noqa: F401 - fixture
from tests.tiny import conversation_records, write_jsonl


def test_a_huge_message_is_cut_before_it_is_rendered_or_tokenized(chatml_tokenizer,  # noqa: ANN001
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rendered: list[int] = []
    render = sft.data.templates.render_prompt
    monkeypatch.setattr("sft.data.tokenize.render_prompt",
                        lambda tokenizer, messages, tools=None: rendered.append(
                            sum(len(m["content"]) for m in messages)) or render(tokenizer, messages, tools))
    huge = [{"role": "user", "content": "word " * 4_000_000}]  # 20 MB
    tracemalloc.start()
    started = time.monotonic()
    try:
        ids = generation_prompt(chatml_tokenizer, huge, positions=256)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(ids) > 256 and rendered[0] < 100_000  # still too long to fit, so still refused
    assert time.monotonic() - started < 10 and peak < 100 << 20
    short = [{"role": "user", "content": "Hi there"}]
    assert generation_prompt(chatml_tokenizer, short, 256) == generation_prompt(chatml_tokenizer, short, None)


def test_onpolicy_pairs_pass_over_prompts_the_model_cannot_answer(sft_run: Path, tmp_path: Path,  # noqa: F811
                                                                  capsys: pytest.CaptureFixture) -> None:
    conversations = conversation_records(3)
    conversations[1]["messages"][0]["content"] = "word " * 2_000_000  # 10 MB, far past 256 positions
    conversations[2]["messages"][0]["content"] = "word " * 240  # fits alone, not with 50 new tokens
    source = write_jsonl(tmp_path / "source.jsonl", conversations)
    out = tmp_path / "pairs.jsonl"
    started = time.monotonic()
    assert onpolicy_main(["--adapter", str(sft_run), "--source", str(source), "--out", str(out),
                          "--max-new-tokens", "50"]) == 0
    assert time.monotonic() - started < 120
    assert "2 passed over" in capsys.readouterr().out
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [pair["id"] for pair in pairs] in ([conversations[0]["id"]], [])


def test_eval_passes_over_a_huge_record_without_tokenizing_it_whole(sft_run: Path, tmp_path: Path,  # noqa: F811
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from sft.inference.evaluate import main as eval_main

    conversations = conversation_records(3)
    conversations[0]["messages"][0]["content"] = "word " * 4_000_000  # 20 MB
    val = write_jsonl(tmp_path / "val.jsonl", conversations)
    longest: list[int] = []
    encode = sft.data.templates.encode_prompt
    monkeypatch.setattr("sft.data.tokenize.encode_prompt",
                        lambda tokenizer, text: longest.append(len(text)) or encode(tokenizer, text))
    assert eval_main(["--adapter", str(sft_run), "--output-dir", str(sft_run), "--val-file", str(val),
                      "--max-new-tokens", "4", "--num-generations", "3"]) == 0
    metrics = json.loads((sft_run / "eval" / "metrics.json").read_text())
    assert metrics["prompts_too_long"] == 1 and metrics["answers"] == 2
    assert max(longest) < 100_000
