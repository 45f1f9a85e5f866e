"""Sampling: seeded draws repeat whatever the batch, the filters keep what they should, and
`sft sample` resumes to exactly the answers of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.data.templates import end_of_turn_ids
from sft.inference.loading import load_run, run_config
from sft.modeling.generate import Sampling, generate_greedy, generate_sampled
from sft.rewards.constraints import build, write_records
from sft.rewards.decontaminate import Decontaminator
from sft.rewards.sample import SAMPLES_FILE, main, prompt_ids, read_samples
from sft.rewards.verify import read_constraint_prompts
from sft.training.grpo_sampling import sample_answers as grpo_sample_answers
from tests.tiny import conversation_records, write_jsonl

PROMPTS = ["the quick brown fox", "a", "jumps over the lazy dog while birds sing", "river runs past the old mill"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_a_token_is_drawn_by_its_uniform_number_within_the_filters() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(8, 1)
    uniforms = torch.tensor([0.0, 0.49, 0.51, 0.79, 0.81, 0.94, 0.96, 0.999])

    def draws(sampling: Sampling) -> list[int]:
        return sampling.choose(logits, uniforms).tolist()

    # cumulative 0.5, 0.8, 0.95, 1.0 in vocabulary order
    assert draws(Sampling()) == [0, 0, 1, 1, 2, 2, 3, 3]
    # the two likeliest, renormalized to 0.625 / 0.375
    assert draws(Sampling(top_k=2)) == [0, 0, 0, 1, 1, 1, 1, 1]
    # 0.5 + 0.3 reaches 0.8: the third token is dropped, the second kept
    assert draws(Sampling(top_p=0.8)) == [0, 0, 0, 1, 1, 1, 1, 1]
    assert draws(Sampling(top_p=0.81)) == [0, 0, 0, 1, 1, 2, 2, 2]  # 0.5, 0.8, 0.95 of 0.95
    assert draws(Sampling(top_p=0.1)) == [0] * 8
    # top-p applies to the top-k renormalized (0.526, 0.316, 0.158): 0.526 + 0.316 reaches 0.82
    assert draws(Sampling(top_k=3, top_p=0.82)) == [0, 0, 0, 1, 1, 1, 1, 1]
    # temperature 0.5 squares the probabilities: 0.685 for the likeliest
    assert Sampling(temperature=0.5).choose(logits[:2], torch.tensor([0.68, 0.69])).tolist() == [0, 1]
    # with top-p the draw counts from the likeliest token down, else in vocabulary order
    logits, uniforms = torch.log(torch.tensor([[0.2, 0.5, 0.3]])).repeat(4, 1), torch.tensor([0.0, 0.6, 0.63, 0.99])
    assert draws(Sampling(top_p=0.6)) == [1, 1, 2, 2]
    assert draws(Sampling()) == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="temperature > 0"):
        Sampling(temperature=0)


def test_top_p_over_the_likeliest_prefix_draws_what_a_full_sort_draws(monkeypatch) -> None:
    """Top-p looks at the likeliest few hundred tokens; a row whose nucleus does not fit there is
    sorted whole, alone: every draw equals the one from sorting the whole vocabulary of every row."""
    from sft.modeling import generate

    generator = torch.Generator().manual_seed(0)
    # peaked rows (the nucleus fits in 256 tokens) and flat rows (it needs thousands), 5,000 tokens
    logits = torch.randn(12, 5000, generator=generator) * torch.tensor([8.0] * 9 + [0.5] * 3)[:, None]
    uniforms = torch.rand(12, generator=generator)
    sorted_rows = []
    original_sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort", lambda self, *a, **kw: sorted_rows.append(len(self))
                        or original_sort(self, *a, **kw))
    for top_p in (0.5, 0.9, 0.95, 0.999):
        sampling = Sampling(temperature=0.8, top_p=top_p)
        probs = torch.softmax(logits / 0.8, dim=-1)
        ordered, order = original_sort(probs, dim=-1, descending=True)
        ordered = ordered * ((ordered.cumsum(dim=-1) - ordered) < top_p)
        cumulative = ordered.cumsum(dim=-1)
        expected = order.gather(1, torch.searchsorted(cumulative, uniforms[:, None] * cumulative[:, -1:],
                                                      right=True)).squeeze(1).tolist()
        assert sampling.choose(logits, uniforms).tolist() == expected
        assert sampling.choose(logits[:9], uniforms[:9]).tolist() == expected[:9]   # all narrow
        assert sampling.choose(logits[9:], uniforms[9:]).tolist() == expected[9:]   # all wide
    assert generate.NUCLEUS_PREFIX < 5000 and sorted_rows and max(sorted_rows) <= 3  # only flat rows were sorted


def test_seeded_sampling_repeats_whatever_the_batch(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer(p).input_ids for p in PROMPTS] * 2
    seeds = [11, 12, 13, 14, 21, 22, 23, 24]
    sampling = Sampling(temperature=1.0, top_k=50, top_p=0.95)
    prompt_rows = []  # rows of each prompt pass (more than one token a row)
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: prompt_rows.append(len(kwargs["input_ids"]))
        if kwargs["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    batched = generate_sampled(model, tokenizer, prompts, 10, [-1], seeds, sampling, batch_size=8)
    hook.remove()
    assert prompt_rows == [4]  # 8 answers to 4 prompts: each prompt read once, its cache copied to its rows
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


def test_sft_sample_and_grpo_draw_the_same_answer_for_the_same_seed(tiny_model_dir: Path, constraint_file: Path,
                                                                    tmp_path: Path) -> None:
    """One sampler: GRPO given `sft sample`'s seeds writes `sft sample`'s answers."""
    assert _sample(tiny_model_dir, constraint_file, tmp_path, "--limit", "2", "--batch-size", "4") == 0
    saved = read_samples(tmp_path / SAMPLES_FILE)
    loaded = load_run(None, run_config(None), str(tiny_model_dir), "cpu")
    keys = [(prompt, j) for prompt in read_constraint_prompts(constraint_file)[:2] for j in range(3)]
    answers = grpo_sample_answers(loaded.model, loaded.tokenizer, [prompt_ids(loaded, p) for p, _ in keys],
                                  [saved[(p.id, j)]["seed"] for p, j in keys], 6, end_of_turn_ids(loaded.tokenizer),
                                  temperature=0.9, top_p=0.9, batch_size=5)
    drawn = [(a.text, a.new_tokens, a.finished) for a in answers]
    assert drawn == [tuple(saved[(p.id, j)][key] for key in ("response", "new_tokens", "finished")) for p, j in keys]
    assert len({text for text, _, _ in drawn}) > 2
