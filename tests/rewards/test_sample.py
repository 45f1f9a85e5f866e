"""Sampling: seeded draws repeat whatever the batch, the filters keep what they should, and
`sft sample` resumes to exactly the answers of an uninterrupted run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.inference.generate import Sampling, generate_greedy, generate_sampled
from sft.rewards.constraints import build, write_records
from sft.rewards.decontaminate import Decontaminator
from sft.rewards.sample import SAMPLES_FILE, main, read_samples
from tests.tiny import conversation_records, write_jsonl

PROMPTS = ["the quick brown fox", "a", "jumps over the lazy dog while birds sing", "river runs past the old mill"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_filters_keep_the_likeliest_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(Sampling().probabilities(logits), torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(Sampling(top_k=2).probabilities(logits), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # 0.5 + 0.3 reaches 0.8: the third token is dropped, the second kept
    assert torch.allclose(Sampling(top_p=0.8).probabilities(logits), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(Sampling(top_p=0.81).probabilities(logits), torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    assert torch.allclose(Sampling(top_p=0.1).probabilities(logits), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    sharp = Sampling(temperature=0.5).probabilities(logits)
    assert math.isclose(sharp[0, 0].item(), 0.25 / (0.25 + 0.09 + 0.0225 + 0.0025), rel_tol=1e-5)
    with pytest.raises(ValueError, match="temperature > 0"):
        Sampling(temperature=0)


def test_seeded_sampling_repeats_whatever_the_batch(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer(p).input_ids for p in PROMPTS] * 2
    seeds = [11, 12, 13, 14, 21, 22, 23, 24]
    sampling = Sampling(temperature=1.0, top_k=50, top_p=0.95)
    batched = generate_sampled(model, tokenizer, prompts, 10, [-1], seeds, sampling, batch_size=8)
    alone = [generate_sampled(model, tokenizer, [p], 10, [-1], [s], sampling, batch_size=1)[0]
             for p, s in zip(prompts, seeds)]
    assert batched == alone and [a.token_ids for a in batched] == [a.token_ids for a in alone]
    assert all(len(a.token_ids) == a.new_tokens == 10 for a in batched)
    assert batched[1].text == tokenizer.decode(list(batched[1].token_ids), skip_special_tokens=True).strip()
    assert generate_sampled(model, tokenizer, prompts, 10, [-1], seeds, sampling, batch_size=3) == batched
    # the same prompt with another seed draws another answer; top_k=1 is greedy
    assert batched[0] != batched[4]
    greedy = generate_greedy(model, tokenizer, prompts[:4], 10, [-1])
    assert generate_sampled(model, tokenizer, prompts[:4], 10, [-1], seeds[:4], Sampling(top_k=1)) == greedy


@pytest.fixture(scope="module")
def constraint_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("constraints")
    source = write_jsonl(directory / "sft.jsonl", conversation_records(5))
    records, _ = build([str(source)], Decontaminator([]), seed=1)
    path = directory / "constraints.jsonl"
    write_records(path, records)
    return path


def _sample(tiny_model_dir: Path, prompts: Path, out: Path, *extra: str) -> int:
    return main(["--prompts", str(prompts), "--model", str(tiny_model_dir), "--out", str(out), "--k", "3",
                 "--max-new-tokens", "6", "--temperature", "0.9", "--top-p", "0.9", "--seed", "5",
                 "--device", "cpu", *extra])


def test_resumed_sampling_equals_uninterrupted(tiny_model_dir: Path, constraint_file: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert _sample(tiny_model_dir, constraint_file, tmp_path / "whole", "--batch-size", "8") == 0
    whole = read_samples(tmp_path / "whole" / SAMPLES_FILE)
    assert len(whole) == 15 and all(isinstance(r["finished"], bool) for r in whole.values())
    # an interrupted run: two prompts answered, the last line cut mid-write
    assert _sample(tiny_model_dir, constraint_file, tmp_path / "resumed", "--limit", "2", "--batch-size", "4") == 0
    samples = tmp_path / "resumed" / SAMPLES_FILE
    samples.write_text(samples.read_text(encoding="utf-8")[:-20], encoding="utf-8")
    assert _sample(tiny_model_dir, constraint_file, tmp_path / "resumed", "--batch-size", "5") == 0
    assert read_samples(samples) == whole
    lines = samples.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 15
    # a rerun has nothing left to do; other settings are refused
    assert _sample(tiny_model_dir, constraint_file, tmp_path / "resumed") == 0
    assert len(samples.read_text(encoding="utf-8").splitlines()) == 15
    capsys.readouterr()
    assert _sample(tiny_model_dir, constraint_file, tmp_path / "resumed", "--top-k", "3") == 2
    assert "holds answers generated with" in capsys.readouterr().err
    assert json.loads(lines[0]).keys() == {"id", "sample", "seed", "response", "finished", "new_tokens"}
