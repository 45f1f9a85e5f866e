"""Every family trains the model's own objective: our log-probs, losses and LoRA gradients equal
the model's own eager forward on unpacked examples, packed and padded, fused and unfused, and
greedy generation equals ``model.generate``.

The reference is transformers' own code for the family (eager attention, full logits, one
example at a time) under PEFT's own LoRA layers; ours is what training runs: the model loaded
through sft (varlen_sdpa attention), adapters through sft.modeling.lora (fused or not), packed
rows or padded batches, and the supervised-only head. The tiny models (tests/families.py) switch
every family transform on at non-identity values, so skipping one fails here.
"""

from __future__ import annotations

import functools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from sft.data.collate import PackingCollator, PaddingCollator, pack_shared_prompts, shifted_labels
from sft.data.tokenize import IGNORE_INDEX
from sft.modeling.attention import VARLEN_SDPA
from sft.modeling.fusion import fuse
from sft.modeling.generate import generate_greedy
from sft.modeling.head import LogitRule, logit_rule, rule_from_config
from sft.modeling.lora import add_lora
from sft.modeling.models import load_model
from sft.training.loss import linear_cross_entropy_sum, supervised_forward
from sft.training.preference.collate import PairCollator
from sft.training.preference.logps import answer_logps
from sft.training.token_logps import answer_token_logps
from tests.families import FAMILIES, WINDOW, build_family_model_dir
from tests.tiny import build_tokenizer

LENGTHS = (11, 17, 7)
"""Example lengths: every one longer than the families' sliding window."""
PROMPT_TOKENS = 3


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("chatml")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("families")
    return {family: build_family_model_dir(root / family, family, tokenizer) for family in FAMILIES}


def _examples(vocab: int) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(3)
    examples = []
    for length in LENGTHS:
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * PROMPT_TOKENS + ids[PROMPT_TOKENS:]})
    return examples


def _lora_config(targets) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")


def _randomize_adapters(model: torch.nn.Module) -> None:
    """LoRA B starts at zero, which hides the adapters' part of the forward and A's gradients."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


@functools.cache
def _reference(model_dir):
    """Per-token log-probs (a list per example), their summed NLL and the LoRA gradients, from the
    model's own eager forward under PEFT's layers, one unpadded example at a time."""
    examples = _examples(len(build_tokenizer("chatml")))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(model, _lora_config("all-linear"))
    _randomize_adapters(model)
    model.train()
    logps, total = [], 0.0
    for example in examples:
        logits = model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0].float()
        targets = torch.tensor(shifted_labels(example["labels"]))
        kept = targets != IGNORE_INDEX
        token_logps = logits[kept].log_softmax(-1).gather(1, targets[kept, None]).squeeze(1)
        logps.append(token_logps)
        total = total - token_logps.sum()
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return [t.detach() for t in logps], total.detach(), grads


def _ours(model_dir, fused: bool):
    model = load_model(str(model_dir), torch.float32, VARLEN_SDPA, device="cpu")
    model = add_lora(model, _lora_config("all-linear"), "cpu")
    if fused:
        fuse(model)
    _randomize_adapters(model)
    return model.train()


def _our_token_logps(model, batch) -> torch.Tensor:
    """Each supervised token's log-prob from our head kernel, one token per call."""
    outputs = model(**{k: v for k, v in batch.items() if k not in ("labels", "shift_labels", "supervised_positions")},
                    output_hidden_states=True, use_cache=False, logits_to_keep=torch.zeros(0, dtype=torch.long))
    positions = batch["supervised_positions"]
    hidden = outputs.hidden_states[-1].flatten(0, 1).index_select(0, positions)
    targets = batch["shift_labels"].flatten().index_select(0, positions)
    weight = model.get_output_embeddings().weight
    rule = logit_rule(model)
    return torch.stack([-linear_cross_entropy_sum(hidden[i:i + 1], weight, targets[i:i + 1], rule=rule)
                        for i in range(len(targets))])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_loss_and_gradients_equal_the_models_own(family, fused, packing, family_dirs, tokenizer):
    model_dir = family_dirs[family]
    examples = _examples(len(tokenizer))
    reference_logps, reference_nll, reference_grads = _reference(model_dir)
    model = _ours(model_dir, fused)
    batch = PackingCollator()(examples) if packing else PaddingCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        token_logps = _our_token_logps(model, batch)
    torch.testing.assert_close(token_logps, torch.cat(reference_logps), atol=2e-4, rtol=1e-4)
    nll, count, _ = supervised_forward(model, batch)
    assert int(count) == sum(length - PROMPT_TOKENS for length in LENGTHS)
    torch.testing.assert_close(nll, reference_nll, atol=2e-3, rtol=1e-5)
    nll.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        expected = reference_grads[name]
        # float32 sums in another order: errors scale with the gradient's size (some reach 10)
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(grad, expected, atol=5e-5 * scale, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_answer_logps_equal_the_models_own(family, family_dirs, tokenizer):
    model_dir = family_dirs[family]
    examples = _examples(len(tokenizer))
    model = _ours(model_dir, fused=True).eval()
    prompt = examples[1]["input_ids"][:PROMPT_TOKENS]
    # chosen: example 1's answer; rejected: example 2's answer tokens after the same prompt
    pair = {"prompt_ids": prompt, "chosen_ids": examples[1]["input_ids"][PROMPT_TOKENS:],
            "rejected_ids": examples[2]["input_ids"][PROMPT_TOKENS:]}
    for packing, share in ((True, False), (True, True), (False, False)):
        batch = PairCollator(packing=packing, pad_token_id=tokenizer.pad_token_id, share_prompts=share)([pair])
        with torch.no_grad():
            ours = answer_logps(model, batch)
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        reference = get_peft_model(reference, _lora_config("all-linear"))
        _randomize_adapters(reference)
        expected = []
        for answer in (pair["chosen_ids"], pair["rejected_ids"]):
            ids = prompt + answer
            with torch.no_grad():
                logits = reference.eval()(input_ids=torch.tensor([ids])).logits[0, PROMPT_TOKENS - 1:-1]
            expected.append(logits.log_softmax(-1).gather(1, torch.tensor(answer)[:, None]).sum())
        torch.testing.assert_close(ours[0], torch.stack(expected), atol=2e-3, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_model_generate(family, family_dirs, tokenizer):
    model_dir = family_dirs[family]
    ours = load_model(str(model_dir), torch.float32, VARLEN_SDPA, device="cpu").eval()
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    prompts = [ex["input_ids"][:n] for ex, n in zip(_examples(len(tokenizer)), (9, 5, 7))]
    new_tokens = 2 * WINDOW + 3  # past the sliding window
    # one left-padded batch of three against each prompt alone
    answers = generate_greedy(ours, tokenizer, prompts, new_tokens, stop_ids=[tokenizer.eos_token_id], batch_size=3)
    for prompt, answer in zip(prompts, answers):
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                                      eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)[0, len(prompt):]
        assert answer.new_tokens == len(expected)
        assert answer.text == tokenizer.decode(expected, skip_special_tokens=True).strip()


@pytest.mark.parametrize(("family", "rule"), [
    ("gemma2", LogitRule(softcap=5.0)), ("gemma3_text", LogitRule(softcap=5.0)),
    ("granite", LogitRule(scale=0.25)), ("cohere", LogitRule(scale=0.3)), ("llama", LogitRule()),
])
def test_the_logit_rule_is_read_from_each_config(family, rule, family_dirs):
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32)
    assert rule_from_config(model.config) == rule
    assert logit_rule(model) == rule


def test_an_unknown_logit_transform_falls_back_to_the_models_own_logits(family_dirs, tokenizer, caplog):
    """A family whose logits are transformed in a way no config field announces: the probe sees it
    and the loss takes the model's own logits, the same loss as the reference."""
    model = AutoModelForCausalLM.from_pretrained(family_dirs["llama"], dtype=torch.float32)
    original = type(model).forward

    def forward(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        if outputs.logits is not None and outputs.logits.numel():
            outputs.logits = outputs.logits * 0.5
        return outputs

    model.forward = forward.__get__(model)
    examples = _examples(len(tokenizer))
    with caplog.at_level("WARNING"):
        nll, _, _ = supervised_forward(model, PaddingCollator(tokenizer.pad_token_id)(examples))
    assert logit_rule(model) is None
    assert "not its head's output" in caplog.text
    expected = sum(torch.nn.functional.cross_entropy(
        model(input_ids=torch.tensor([e["input_ids"]])).logits[0], torch.tensor(shifted_labels(e["labels"])),
        reduction="sum") for e in examples)
    torch.testing.assert_close(nll, expected.detach(), atol=1e-3, rtol=1e-5)


def test_the_head_kernel_applies_soft_caps_and_scaling_with_their_gradients():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=generator)
    for rule in (LogitRule(softcap=2.0), LogitRule(scale=0.25), LogitRule(scale=3.0, softcap=4.0)):
        ours = linear_cross_entropy_sum(hidden, weight, targets, chunk_tokens=8, rule=rule)
        grads = torch.autograd.grad(ours, (hidden, weight))
        expected = torch.nn.functional.cross_entropy(rule.apply(hidden @ weight.T), targets, reduction="sum")
        expected_grads = torch.autograd.grad(expected, (hidden, weight))
        torch.testing.assert_close(ours, expected)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_the_fusion_report_names_what_runs_its_own_code(family_dirs):
    llama = fuse(add_lora(AutoModelForCausalLM.from_pretrained(family_dirs["llama"]), _lora_config("all-linear"),
                          "cpu"))
    assert llama.line() == "LoRA fusion: 14 adapted layers run as 8 fused functions (q/k/v and gate/up joined)"
    gemma = fuse(add_lora(AutoModelForCausalLM.from_pretrained(family_dirs["gemma2"]), _lora_config("all-linear"),
                          "cpu"))
    report = gemma.line()
    assert "Gemma2MLP x2 (not Llama's SwiGLU MLP" in report and "Gemma2RMSNorm x9" in report
    phi = fuse(add_lora(AutoModelForCausalLM.from_pretrained(family_dirs["phi3"]), _lora_config("all-linear"), "cpu"))
    assert phi.line().startswith("LoRA fusion: 8 adapted layers run as 8 fused functions")


def _groups(vocab: int) -> list[dict[str, list[int]]]:
    """GRPO's micro-batch: two prompts (longer than the sliding window) with three answers each,
    one answer a single token, one longer than the window."""
    generator = torch.Generator().manual_seed(4)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    sequences = []
    for prompt_length, answer_lengths in ((6, (5, 1, 9)), (9, (7, 3, 2))):
        prompt = ids(prompt_length)
        sequences += [{"prompt_ids": prompt, "answer_ids": ids(n)} for n in answer_lengths]
    return sequences


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_shared_prompts_give_the_log_probs_and_gradients_of_a_copy_per_answer(family, fused, family_dirs, tokenizer):
    """GRPO packs each prompt once before its answers (pack_shared_prompts): every answer token's
    log-prob and the LoRA gradients equal those of the row with one copy of the prompt per answer
    (whose equality with the model's own forward the test above proves). Fused attention, the
    per-example CPU kernel, the masked path (sliding windows reaching into the prompt) and the
    eager path (soft caps) all read the shared prefixes."""
    sequences = _groups(len(tokenizer))
    model = _ours(family_dirs[family], fused)
    weights = torch.randn(sum(len(s["answer_ids"]) for s in sequences), generator=torch.Generator().manual_seed(6))
    results = []
    for batch in (PackingCollator()([{"input_ids": s["prompt_ids"] + s["answer_ids"],
                                      "labels": [IGNORE_INDEX] * len(s["prompt_ids"]) + s["answer_ids"]}
                                     for s in sequences]),
                  pack_shared_prompts(sequences)):
        model.zero_grad()
        logps = answer_token_logps(model, batch)
        (logps * weights).sum().backward()
        results.append((batch["input_ids"].shape[1], logps.detach(),
                        {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}))
    (copied_tokens, copied, copied_grads), (shared_tokens, shared, shared_grads) = results
    # each prompt once but its last token, which starts each of the 3 answers: 2 x (6 - 1 + 9 - 1) fewer
    assert shared_tokens == copied_tokens - 2 * (6 - 1 + 9 - 1)
    torch.testing.assert_close(shared, copied, atol=2e-5, rtol=1e-5)
    for name, grad in shared_grads.items():
        scale = max(1.0, copied_grads[name].abs().max().item())
        torch.testing.assert_close(grad, copied_grads[name], atol=2e-5 * scale, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
