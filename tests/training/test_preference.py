"""Packed pair log-probabilities, the DPO losses against a hand computation, and the first step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, TrainingArguments

import sft.modeling.attention  # noqa: F401  (registers varlen_sdpa)
from sft.config.dpo import DPOSettings
from sft.data.pairs import encode_pairs
from sft.training.dpo_trainer import PreferenceTrainer
from sft.training.preference.collate import DESIRABLE_KEY, REFERENCE_KEY, PairCollator, with_mismatched_completions
from sft.training.preference.logps import answer_logps
from sft.training.preference.metrics import METRICS
from sft.training.reference import attach_reference_logps, compute_reference_logps
from tests.training.tiny_pairs import preference_records

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def pairs(chatml_tokenizer) -> list[dict]:
    encoded, stats = encode_pairs(chatml_tokenizer, preference_records(8), 128, None, progress=False)
    assert stats.truncated > 0 and stats.kept == 8  # some answers cut: truncated pairs are scored too
    return encoded


def _model(model_dir: Path, attention: str = "varlen_sdpa", trained_lora: bool = True) -> PeftModel:
    """The tiny model with a LoRA adapter: random B (a policy that differs from the base) or B = 0."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention, dtype=torch.float32)
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                            init_lora_weights=not trained_lora))


def _plain_answer_logps(model: torch.nn.Module, pair: dict,
                        sides: tuple[str, str] = ("chosen", "rejected")) -> list[float]:
    """Sum of answer-token log-probabilities from a plain full-logits forward pass of one sequence."""
    result = []
    for side in sides:
        ids = torch.tensor([pair["prompt_ids"] + pair[f"{side}_ids"]], device=model.device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].double()
        token_logps = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1).cpu()
        result.append(float(token_logps[-len(pair[f"{side}_ids"]):].sum()))
    return result


_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
ON_DEVICES = [
    pytest.param("cpu", torch.float32, 1e-4, id="cpu-float32"),
    pytest.param("cuda", torch.float32, 1e-3, id="cuda-float32", marks=_NO_CUDA),
    # bfloat16 rounds each token's log-probability to ~1e-2; a leak across sequences costs nats
    pytest.param("cuda", torch.bfloat16, 0.25, id="cuda-bfloat16", marks=_NO_CUDA),
]


PACKINGS = ["packed", "shared", "padded"]
"""One packed row; one packed row with each record's prompt once (its answers attending to it); padded rows."""


def _pair_collator(packing: str, tokenizer) -> PairCollator:
    return PairCollator(packing != "padded", tokenizer.pad_token_id, share_prompts=packing == "shared")


@pytest.mark.parametrize(("device", "dtype", "tolerance"), ON_DEVICES)
@pytest.mark.parametrize("packing", PACKINGS)
def test_batched_pair_logps_equal_one_sequence_at_a_time(tiny_model_dir: Path, pairs: list[dict], packing: bool,
                                                         chatml_tokenizer, device: str, dtype: torch.dtype,
                                                         tolerance: float, monkeypatch: pytest.MonkeyPatch) -> None:
    if device == "cuda":  # float32 means float32 matmuls, not TF32 (the trainer's CUDA setting)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False, raising=False)
    model = _model(tiny_model_dir).eval().to(device, dtype)
    batch = _pair_collator(packing, chatml_tokenizer)(pairs)
    if packing == "packed":
        assert batch["input_ids"].shape[0] == 1 and len(batch["packed_boundaries"]) == 2 * len(pairs) + 1
    if packing == "shared":  # each prompt once but its last token, which starts both answers
        tokens = sum(len(p["prompt_ids"]) + 1 + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
        assert batch["input_ids"].shape == (1, tokens)
    on_device = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    with torch.no_grad():
        batched = answer_logps(model, on_device).cpu()
    expected = torch.tensor([_plain_answer_logps(model, pair) for pair in pairs], dtype=torch.float64)
    assert batched.shape == (len(pairs), 2)
    assert torch.allclose(batched.double(), expected, atol=tolerance, rtol=0)


def _unpaired(pairs: list[dict]) -> list[dict]:
    """Each pair's answers as a desirable and an undesirable example, with their mismatched completions."""
    examples = [{"prompt_ids": pair["prompt_ids"], "completion_ids": pair[f"{side}_ids"], "label": side == "chosen"}
                for side in ("chosen", "rejected") for pair in pairs]
    return with_mismatched_completions(examples, 128)


@pytest.mark.parametrize("packing", PACKINGS)
def test_unpaired_examples_score_their_completion_and_the_mismatched_one(tiny_model_dir: Path, pairs: list[dict],
                                                                        packing: str, chatml_tokenizer) -> None:
    model = _model(tiny_model_dir).eval()
    examples = _unpaired(pairs[:4])
    batch = _pair_collator(packing, chatml_tokenizer)(examples)
    assert batch[DESIRABLE_KEY].tolist() == [True] * 4 + [False] * 4
    with torch.no_grad():
        batched = answer_logps(model, batch)
    expected = [_plain_answer_logps(model, example, ("completion", "kl")) for example in examples]
    assert torch.allclose(batched.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)


def test_each_prompts_examples_take_the_previous_prompts_completions() -> None:
    def example(prompt: int, completion: list[int]) -> dict:
        return {"prompt_ids": [prompt] * 3, "completion_ids": completion, "label": True}

    examples = [example(1, [11]), example(2, [21, 22, 23]), example(1, [12]), example(3, [31]), example(3, [32]),
                example(3, [33])]
    mismatched = [e["kl_ids"] for e in with_mismatched_completions(examples, max_seq_length=5)]
    # prompts in first-seen order 1, 2, 3: prompt 1 takes 3's completions, 2 takes 1's, 3 takes 2's (cut to 2 tokens)
    assert mismatched == [[31], [11], [32], [21, 22], [21, 22], [21, 22]]
    assert all(e.items() >= original.items() for e, original in zip(with_mismatched_completions(examples, 5), examples))
    one_prompt = [example(1, [11]), example(1, [12]), example(1, [13])]
    assert [e["kl_ids"] for e in with_mismatched_completions(one_prompt, 8)] == [[13], [11], [12]]


def test_reference_logps_are_the_base_models_with_the_adapter_disabled(tiny_model_dir: Path,
                                                                       pairs: list[dict]) -> None:
    model = _model(tiny_model_dir)
    reference = compute_reference_logps(model, pairs, 3, PairCollator(), "cpu")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = torch.tensor([_plain_answer_logps(base, pair) for pair in pairs], dtype=torch.float64)
    assert torch.allclose(reference.double(), expected, atol=1e-4, rtol=0)
    assert model.training  # left as found


def _trainer(model: torch.nn.Module, pairs: list[dict], tmp_path: Path, dpo: DPOSettings, **args) -> PreferenceTrainer:
    arguments = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no",
                                  per_device_train_batch_size=4, logging_steps=1, lr_scheduler_type="constant",
                                  per_device_eval_batch_size=3, remove_unused_columns=False, disable_tqdm=True, **args)
    return PreferenceTrainer(model=model, args=arguments, train_dataset=pairs, data_collator=PairCollator(), dpo=dpo)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _hand_loss(policy: list[float], reference: list[float], lengths: list[int], dpo: DPOSettings) -> float:
    """One pair's loss, written out from the papers' formulas on plain floats."""
    chosen_ratio, rejected_ratio = policy[0] - reference[0], policy[1] - reference[1]
    if dpo.loss_type == "ipo":
        loss = (chosen_ratio / lengths[0] - rejected_ratio / lengths[1] - 1 / (2 * dpo.beta)) ** 2
    elif dpo.loss_type == "hinge":
        loss = max(0.0, 1 - dpo.beta * (chosen_ratio - rejected_ratio))
    else:
        margin, eps = dpo.beta * (chosen_ratio - rejected_ratio), dpo.label_smoothing
        loss = (-(1 - eps) * _log_sigmoid(margin) + eps * _log_sigmoid(-margin)) / (1 - 2 * eps)
    return loss + dpo.sft_weight * -policy[0] / lengths[0]


@pytest.mark.parametrize("dpo", [
    DPOSettings(), DPOSettings(beta=0.5), DPOSettings(loss_type="ipo", beta=0.5), DPOSettings(loss_type="hinge"),
    DPOSettings(label_smoothing=0.2), DPOSettings(beta=0.3, sft_weight=0.5)],
    ids=["sigmoid", "sigmoid-beta0.5", "ipo", "hinge", "robust", "sigmoid+sft"])
def test_loss_and_metrics_equal_a_hand_computation(tiny_model_dir: Path, pairs: list[dict], tmp_path: Path,
                                                   dpo: DPOSettings) -> None:
    model = _model(tiny_model_dir)
    with_reference = attach_reference_logps(pairs, compute_reference_logps(model, pairs, 8, PairCollator(), "cpu"))
    trainer = _trainer(model, with_reference, tmp_path, dpo)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, PairCollator()(with_reference))

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    policies = [_plain_answer_logps(model, pair) for pair in pairs]
    references = [_plain_answer_logps(base, pair) for pair in pairs]
    lengths = [[len(pair["chosen_ids"]), len(pair["rejected_ids"])] for pair in pairs]
    expected = sum(map(_hand_loss, policies, references, lengths, [dpo] * len(pairs))) / len(pairs)
    assert abs(float(loss) - expected) <= 1e-4 * max(1.0, abs(expected))
    assert abs(float(loss) - math.log(2)) > 1e-3  # the random adapter moved the policy: not a trivial pass
    evaluated = trainer.evaluate(eval_dataset=with_reference)  # batches of 3: sums over uneven batches
    assert evaluated["eval_loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)

    model.train()  # (no dropout: the same values) metrics are collected in training and logged with the loss
    trainer.compute_loss(model, PairCollator()(with_reference))
    trainer.log({"loss": float(loss)})
    logged = trainer.state.log_history[-1]
    rewards = [[dpo.beta * (p - r) for p, r in zip(policy, reference, strict=True)]
               for policy, reference in zip(policies, references, strict=True)]
    n = len(pairs)
    assert evaluated["eval_rewards/margins"] == pytest.approx(sum(r[0] - r[1] for r in rewards) / n, abs=1e-4)
    assert evaluated["eval_rewards/accuracies"] == sum(r[0] > r[1] for r in rewards) / n
    assert logged["rewards/chosen"] == pytest.approx(sum(r[0] for r in rewards) / n, abs=1e-4)
    assert logged["rewards/rejected"] == pytest.approx(sum(r[1] for r in rewards) / n, abs=1e-4)
    assert logged["rewards/margins"] == pytest.approx(sum(r[0] - r[1] for r in rewards) / n, abs=1e-4)
    assert logged["rewards/accuracies"] == sum(r[0] > r[1] for r in rewards) / n
    assert logged["logps/chosen"] == pytest.approx(sum(p[0] for p in policies) / n, abs=1e-4)
    assert logged["logps/rejected"] == pytest.approx(sum(p[1] for p in policies) / n, abs=1e-4)


def test_first_step_is_ln2_with_zero_rewards_and_training_moves_it(tiny_model_dir: Path, pairs: list[dict],
                                                                   tmp_path: Path) -> None:
    """With the adapter's B matrices at zero the policy is the reference: loss ln 2, rewards 0,
    whatever the batch composition (the reference was computed in other batches). After a few
    steps the loss has left ln 2: the gradient reaches the adapter."""
    model = _model(tiny_model_dir, trained_lora=False)
    assert all(float(p.detach().abs().max()) == 0 for name, p in model.named_parameters() if "lora_B" in name)
    reference = compute_reference_logps(model, pairs, 3, PairCollator(), "cpu")
    trainer = _trainer(model, attach_reference_logps(pairs, reference), tmp_path, DPOSettings(), max_steps=4,
                       learning_rate=2e-2)
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in history] == [1, 2, 3, 4]
    first = history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[name] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/accuracies"] <= 0.5  # ties are not counted as correct
    assert all(set(METRICS) <= entry.keys() for entry in history)
    assert abs(history[-1]["loss"] - math.log(2)) > 1e-3
    assert history[-1]["rewards/margins"] > 0  # and the policy moved toward the chosen answers
    assert any(float(p.detach().abs().max()) > 0 for name, p in model.named_parameters() if "lora_B" in name)
    assert all(REFERENCE_KEY in pair for pair in trainer.train_dataset)
