"""GRPO's pieces: advantages and the clipped token loss against hand computations, the per-token
head against the model's own log_softmax (values and gradients), and seeded sampling."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.config import ConfigError, GRPOConfig, build_config
from sft.data.collate import IGNORE_INDEX, PackingCollator
from sft.data.grpo_prompts import read_prompt_records
from sft.errors import DataError
from sft.modeling.generate import generate_greedy
from sft.modeling.head import LogitRule
from sft.training.grpo import dapo_loss, group_advantages, per_token, token_terms
from sft.training.grpo_rewards import Rewards, load_reward_function
from sft.training.grpo_sampling import answer_seed, sample_answers
from sft.training.token_logps import answer_token_logps, linear_token_log_probs
from tests.tiny import write_jsonl


def test_advantages_are_the_group_normalized_rewards() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]])
    std = math.sqrt((0.25 + 0.25) / 3)  # unbiased, as torch.std and TRL
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0] + [0.0] * 4
    assert group_advantages(rewards).flatten().tolist() == pytest.approx(expected, abs=1e-7)
    assert group_advantages(rewards, scale=False).flatten().tolist() == pytest.approx([0.5, -0.5, 0, 0] + [0] * 4,
                                                                                      abs=1e-7)


def test_a_group_of_one_has_zero_advantage() -> None:
    assert group_advantages(torch.tensor([[0.7], [0.1]])).tolist() == [[0.0], [0.0]]


def test_the_clipped_token_loss_matches_a_hand_computation() -> None:
    # answer 1 (advantage +1): ratios 1.5 (clipped at 1.2) and 0.9; answer 2 (advantage -1): ratios
    # 0.7 (clipped at 0.8), 1.1 and 1.0
    ratios = torch.tensor([1.5, 0.9, 0.7, 1.1, 1.0], dtype=torch.float64)
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5], dtype=torch.float64)
    logps = old + ratios.log()
    advantages = per_token(torch.tensor([1.0, -1.0], dtype=torch.float64), [2, 3])
    terms = token_terms(logps, old, advantages, (0.8, 1.2))
    assert terms.losses.tolist() == pytest.approx([-1.2, -0.9, 0.8, 1.1, 1.0])
    assert terms.clipped.tolist() == [True, False, True, False, False]
    assert dapo_loss(terms.losses, 5).item() == pytest.approx(0.8 / 5)  # no per-answer length normalization
    # with a reference: plus beta x (exp(ref - logp) - (ref - logp) - 1) per token
    reference = logps + torch.tensor([0.1, -0.2, 0.0, 0.3, -0.1], dtype=torch.float64)
    with_kl = token_terms(logps, old, advantages, (0.8, 1.2), beta=0.5, reference_logps=reference)
    kl = [math.exp(d) - d - 1 for d in (0.1, -0.2, 0.0, 0.3, -0.1)]
    assert with_kl.kl.tolist() == pytest.approx(kl)
    assert with_kl.losses.tolist() == pytest.approx([x + 0.5 * k for x, k in
                                                     zip([-1.2, -0.9, 0.8, 1.1, 1.0], kl, strict=True)])


def test_the_gradient_of_the_loss_is_minus_the_advantage_per_token_at_ratio_one() -> None:
    logps = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    advantages = torch.tensor([0.5, 0.5, -2.0])
    dapo_loss(token_terms(logps, logps.detach(), advantages, (0.8, 1.2)).losses, 3).backward()
    assert logps.grad.tolist() == pytest.approx([-0.5 / 3, -0.5 / 3, 2.0 / 3])


@pytest.mark.parametrize("rule", [LogitRule(), LogitRule(scale=0.5, softcap=3.0)], ids=["plain", "scale+softcap"])
def test_per_token_head_log_probs_and_gradients_equal_log_softmax(rule: LogitRule) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    upstream = torch.randn(11, dtype=torch.float64)
    ours = linear_token_log_probs(hidden, weight, targets, chunk_tokens=4, rule=rule)
    (ours.double() * upstream).sum().backward()
    ours_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = F.log_softmax(rule.apply(hidden @ weight.T), dim=-1).gather(1, targets[:, None]).squeeze(1)
    (reference * upstream).sum().backward()
    assert ours.tolist() == pytest.approx(reference.tolist(), abs=1e-5)
    torch.testing.assert_close(ours_grads[0], hidden.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours_grads[1], weight.grad, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_lora_model(tiny_model_dir: Path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _prompt_answer_batch(tokenizer) -> tuple[dict, list[tuple[list[int], list[int]]]]:
    pairs = [(tokenizer("Write about the ocean.").input_ids, tokenizer("the sea is blue").input_ids),
             (tokenizer("Name a colour").input_ids, tokenizer("green tea and jazz music").input_ids)]
    examples = [{"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a} for p, a in pairs]
    return PackingCollator()(examples), pairs


def test_answer_token_logps_of_a_packed_batch_equal_the_models_own_log_softmax(tiny_lora_model) -> None:
    model, tokenizer = tiny_lora_model
    batch, pairs = _prompt_answer_batch(tokenizer)
    with torch.no_grad():
        ours = answer_token_logps(model, batch)
        expected = []
        for prompt, answer in pairs:
            log_probs = F.log_softmax(model(input_ids=torch.tensor([prompt + answer])).logits[0].float(), dim=-1)
            expected += [log_probs[len(prompt) - 1 + i, token].item() for i, token in enumerate(answer)]
    assert len(ours) == sum(len(a) for _, a in pairs)  # every answer token
    assert ours.tolist() == pytest.approx(expected, abs=1e-5)


def test_zero_advantages_give_a_zero_policy_gradient(tiny_lora_model) -> None:
    model, tokenizer = tiny_lora_model
    batch, pairs = _prompt_answer_batch(tokenizer)
    model.zero_grad()
    logps = answer_token_logps(model, batch)
    advantages = per_token(group_advantages(torch.tensor([[0.3], [0.9]])).flatten(), [len(a) for _, a in pairs])
    dapo_loss(token_terms(logps, logps.detach(), advantages, (0.8, 1.2)).losses, len(logps)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)
    # and a non-zero advantage does move the adapter
    model.zero_grad()
    logps = answer_token_logps(model, batch)
    advantages = per_token(torch.tensor([1.0, -1.0]), [len(a) for _, a in pairs])
    dapo_loss(token_terms(logps, logps.detach(), advantages, (0.8, 1.2)).losses, len(logps)).backward()
    assert any(p.grad.any() for p in model.parameters() if p.requires_grad)


def test_sampling_with_a_seed_is_repeatable_and_independent_of_the_batch(tiny_lora_model) -> None:
    model, tokenizer = tiny_lora_model
    prompts = [tokenizer("Write about the ocean.").input_ids, tokenizer("Name a colour").input_ids] * 3
    seeds = [answer_seed(7, 3, position, 0) for position in range(len(prompts))]
    stop = [tokenizer.eos_token_id]

    def sample(batch_size: int, seeds: list[int] = seeds, temperature: float = 1.0) -> list[tuple[int, ...]]:
        answers = sample_answers(model, tokenizer, prompts, seeds, 12, stop, temperature, 0.95, batch_size)
        return [answer.token_ids for answer in answers]

    first = sample(4)
    assert first == sample(4)
    assert first == sample(1)  # an answer's draws do not depend on its batch
    assert len(set(first)) > 2  # the same prompt gets different answers
    assert first != sample(4, [answer_seed(8, 3, position, 0) for position in range(len(prompts))])
    greedy = [answer.token_ids for answer in generate_greedy(model, tokenizer, prompts, 12, stop)]
    assert sample(4, temperature=0.0) == greedy


@pytest.mark.parametrize("field, value, message", [
    ("top_p", 0, "grpo.top_p: must be in (0, 1], got 0.0"),
    ("group_size", 0, "grpo.group_size: must be >= 1, got 0"),
    ("epsilon", 1.5, "grpo.epsilon: must be in (0, 1), got 1.5"),
    ("beta", -0.1, "grpo.beta: must be >= 0, got -0.1"),
])
def test_grpo_settings_refuse_what_cannot_run(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_config(overrides={field: value}, config_class=GRPOConfig)
    assert str(error.value) == message


def test_clip_range_defaults_to_a_symmetric_epsilon() -> None:
    assert build_config(overrides={"epsilon": 0.2}, config_class=GRPOConfig).grpo.clip_range == (0.8, 1.2)
    assert build_config(overrides={"epsilon_high": 0.28}, config_class=GRPOConfig).grpo.clip_range == (0.8, 1.28)


def test_prompt_records_drop_a_final_answer_and_bind_their_instructions(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi, you"}],
         "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [{}, {}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count."}],
         "instruction_id_list": ["length_constraints:number_words"],
         "kwargs": [{"relation": "less than", "num_words": 3}]}])
    records, checks = read_prompt_records(path, verifier=True)
    assert records[0]["messages"] == [{"role": "user", "content": "Say hi."}]
    assert records[1]["id"] and records[1]["messages"][0]["role"] == "system"
    english = "the weather is nice today and we walk to the park"
    assert [check(english) for check in checks[0]] == [True, True]
    assert [check("The weather is nice, so we walk") for check in checks[0]] == [False, False]
    assert [check("one two three") for check in checks[1]] == [False]
    assert read_prompt_records(path, verifier=False)[1] is None
    rewards = Rewards(records, checks, {})(indices=[0, 0, 1], completions=[english, english.title(), ""])
    assert rewards.rewards == [1.0, 0.5, 0.0] and rewards.passed == [True, False, False]  # empty: follows nothing


def test_a_bad_instruction_is_refused_naming_the_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [{"role": "user", "content": "Say hi."}], "instruction_id_list": ["punctuation:no_coma"],
         "kwargs": [{}]}])
    with pytest.raises(DataError, match=rf"^{path}:1: field 'instruction_id_list'\[0\]: unknown instruction id 'punctuation:no_coma'$"):
        read_prompt_records(path, verifier=True)


def test_a_reward_function_must_return_one_finite_number_per_completion() -> None:
    records = [{"messages": [{"role": "user", "content": "hi"}]}]
    short = Rewards(records, None, {"mod:short": lambda prompts, completions, records: [1.0]})
    with pytest.raises(ConfigError, match=r"^--reward mod:short must return one finite number per completion \(2\)"):
        short([0, 0], ["a", "b"])
    nan = Rewards(records, None, {"mod:nan": lambda prompts, completions, records: [float("nan")] * 2})
    with pytest.raises(ConfigError, match=r"^--reward mod:nan must return"):
        nan([0, 0], ["a", "b"])
    with pytest.raises(ConfigError, match=r"^no reward: the built-in verifier is off"):
        Rewards(records, None, {})


@pytest.mark.parametrize("spec, message", [
    ("tests.tiny", "--reward 'tests.tiny': expected MODULE:FUNCTION, e.g. mypkg.rewards:fn"),
    ("no_such_module_xyz:fn", ("--reward no_such_module_xyz:fn: cannot import no_such_module_xyz "
                               "(ModuleNotFoundError: No module named 'no_such_module_xyz')")),
    ("tests.tiny:nothing_here", "--reward tests.tiny:nothing_here: tests.tiny has no function 'nothing_here'"),
])
def test_a_reward_function_that_cannot_be_loaded_is_named(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_reward_function(spec)
    assert str(error.value) == message
