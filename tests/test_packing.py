"""Padding-free packing and the supervised-only loss give the numbers of the plain computation."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, TrainingArguments

import sft.modeling.attention  # registers varlen_sdpa
from sft.data.collate import IGNORE_INDEX, PackingCollator, PaddingCollator
from sft.data.tokenize import encode_records
from sft.modeling.attention import packed_segments
from sft.training.loss import linear_cross_entropy_sum, supervised_forward
from sft.training.trainer import SupervisedTrainer
from tests.tiny import conversation_records

MODEL_INPUTS = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                "packed_boundaries")


@pytest.fixture(scope="module")
def examples(chatml_tokenizer) -> list[dict]:
    encoded, _ = encode_records(chatml_tokenizer, conversation_records(8), 96, None)
    return encoded


def _model(model_dir: Path, attention: str, lora: bool = False) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention, dtype=torch.float32)
    if lora:
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
    return model.eval()


def _target_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) for each position t but the last."""
    return torch.log_softmax(logits[0, :-1].float(), -1).gather(1, input_ids[0, 1:, None]).squeeze(1)


ON_DEVICES = [
    pytest.param("varlen_sdpa", "cpu", torch.float32, id="varlen_sdpa-cpu"),
    pytest.param("sdpa", "cpu", torch.float32, id="sdpa-cpu"),
    pytest.param("eager", "cpu", torch.float32, id="eager-cpu"),
    *(pytest.param(attention, "mps", torch.float32, id=f"{attention}-mps", marks=pytest.mark.skipif(
        not torch.backends.mps.is_available(), reason="no MPS device")) for attention in ("varlen_sdpa", "sdpa")),
    *(pytest.param(attention, "cuda", torch.float32, id=f"{attention}-cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device")) for attention in ("varlen_sdpa", "sdpa")),
    pytest.param("varlen_sdpa", "cuda", torch.bfloat16, id="varlen_sdpa-cuda-bf16", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device")),
    pytest.param("flash_attention_2", "cuda", torch.bfloat16, id="flash_attention_2-cuda",
                 marks=pytest.mark.skipif(not sft.modeling.attention.flash_attention_available("cuda")
                                          or not torch.cuda.is_available(), reason="needs CUDA and flash-attn")),
]
TOLERANCE = {("cpu", torch.float32): 1e-4, ("mps", torch.float32): 5e-4, ("cuda", torch.float32): 5e-4}
"""Float32 reductions on a GPU run in another order than on the CPU (1.07e-4 measured on an H200 where
the CPU bound is 1e-4); half precision differs by its rounding."""


@pytest.mark.parametrize(("attention", "device", "dtype"), ON_DEVICES)
def test_packed_logprobs_equal_separate_logprobs(tiny_model_dir: Path, examples: list[dict], attention: str,
                                                 device: str, dtype: torch.dtype, monkeypatch) -> None:
    if device == "cuda":  # the bound is for float32 matmuls, not TF32 (the trainer's CUDA setting)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False, raising=False)
    tolerance = TOLERANCE.get((device, dtype), 2e-2)
    model = _model(tiny_model_dir, attention).to(device, dtype)
    batch = PackingCollator()(examples)
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad():
        packed = model(**{k: on_device[k] for k in MODEL_INPUTS}, use_cache=False).logits.cpu()
        separate = [model(input_ids=torch.tensor([e["input_ids"]], device=device)).logits.cpu() for e in examples]
    bounds = batch["packed_boundaries"]
    for (start, end), logits, example in zip(zip(bounds[:-1], bounds[1:]), separate, examples):
        ids = torch.tensor([example["input_ids"]])
        expected = _target_logprobs(logits, ids)
        actual = _target_logprobs(packed[:, start:end], ids)
        assert (actual - expected).abs().max() <= tolerance


def test_the_packing_test_detects_attention_across_examples(tiny_model_dir: Path, examples: list[dict]) -> None:
    """Negative control: the same row with position ids that do not restart (one long sequence)
    lets later examples attend to earlier ones, and the comparison above would catch it."""
    model = _model(tiny_model_dir, "sdpa")
    batch = PackingCollator()(examples)
    continuous = torch.arange(batch["input_ids"].shape[1])[None]
    with torch.no_grad():
        leaked = model(input_ids=batch["input_ids"], position_ids=continuous).logits
        alone = model(input_ids=torch.tensor([examples[1]["input_ids"]])).logits
    start, end = batch["packed_boundaries"][1:3]
    ids = torch.tensor([examples[1]["input_ids"]])
    assert (_target_logprobs(leaked[:, start:end], ids) - _target_logprobs(alone, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_packed_attention_gives_each_examples_attention_and_gradients(dtype: torch.dtype) -> None:
    """The CPU path (one FlashAttention call per example into one output) against SDPA run on each
    example alone: outputs and query/key/value gradients, grouped-query heads, an example of one token."""
    heads, kv_heads, dim = 4, 2, 8
    boundaries = [0, 5, 6, 15, 18]  # lengths 5, 1, 9, 3
    torch.manual_seed(0)
    # laid out as a model gives them: [1, tokens, heads, dim] viewed as [1, heads, tokens, dim]
    q, k, v = (torch.randn(1, 18, h, dim).to(dtype).transpose(1, 2) for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(1, 18, heads, dim).to(dtype)
    results = []
    for packed in (True, False):
        inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        if packed:
            out = sft.modeling.attention.varlen_sdpa_attention(None, *inputs, None, scaling=0.3,
                                                               packed_boundaries=boundaries)[0]
        else:
            out = torch.cat([F.scaled_dot_product_attention(*(t[:, :, a:b] for t in inputs), is_causal=True, scale=0.3,
                                                            enable_gqa=True).transpose(1, 2)
                             for a, b in itertools.pairwise(boundaries)], dim=1)
        out.backward(grad)
        results.append((out, *(t.grad for t in inputs)))
    assert results[0][0].shape == (1, 18, heads, dim) and results[0][0].is_contiguous()
    for ours, alone in zip(*results):
        assert ours.abs().max() > 0
        torch.testing.assert_close(ours, alone, rtol=0, atol=0)


def test_packing_collator_layout(examples: list[dict]) -> None:
    batch = PackingCollator()(examples[:3])
    lengths = [len(e["input_ids"]) for e in examples[:3]]
    assert batch["packed_boundaries"] == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert batch["cu_seq_lens_q"].tolist() == batch["packed_boundaries"]
    assert batch["max_length_q"] == max(lengths)
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert batch["input_ids"].shape == (1, sum(lengths))  # not one padding token
    # Each example's last position has no target: the next example's first token is not trained.
    for end in batch["packed_boundaries"][1:]:
        assert batch["shift_labels"][0, end - 1] == IGNORE_INDEX
    n_supervised = sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in examples[:3])
    assert int((batch["shift_labels"] != IGNORE_INDEX).sum()) == n_supervised


@pytest.mark.parametrize("needs_weight_grad", [False, True])
def test_chunked_linear_cross_entropy_equals_full_logits(needs_weight_grad: bool) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=needs_weight_grad)
    targets = torch.randint(0, 50, (37,))
    ours = linear_cross_entropy_sum(hidden, weight, targets, chunk_tokens=8)
    (ours * 0.5).backward()
    ours_grads = (hidden.grad.clone(), None if weight.grad is None else weight.grad.clone())
    hidden.grad = None
    weight.grad = None
    reference = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (reference * 0.5).backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_grads[0], hidden.grad, rtol=1e-5, atol=1e-5)
    if needs_weight_grad:
        torch.testing.assert_close(ours_grads[1], weight.grad, rtol=1e-5, atol=1e-5)


def _trainer(model: torch.nn.Module, tmp_path: Path) -> SupervisedTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    return SupervisedTrainer(model=model, args=args)


def _lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_supervised_loss_and_gradients_equal_the_full_logits_loss(tiny_model_dir: Path, examples: list[dict],
                                                                  tmp_path: Path) -> None:
    model = _model(tiny_model_dir, "varlen_sdpa", lora=True).train()
    trainer = _trainer(model, tmp_path)
    packed = PackingCollator()(examples)
    ours = trainer.compute_loss(model, packed)
    ours.backward()
    ours_grads = _lora_grads(model)
    model.zero_grad()
    padded = PaddingCollator(pad_token_id=0)(examples)
    reference = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                      labels=padded["labels"]).loss  # transformers: full logits, mean over supervised tokens
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for name, grad in _lora_grads(model).items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("collate", ["packed", "padded"])
def test_logits_in_forward_gives_the_chunked_head_loss_and_gradients(tiny_model_dir: Path, examples: list[dict],
                                                                    collate: str) -> None:
    """The FSDP path (logits computed by the model's forward, supervised positions only when
    packed) equals the default path (head run on supervised hidden states, in chunks)."""
    model = _model(tiny_model_dir, "varlen_sdpa" if collate == "packed" else "sdpa", lora=True).train()
    batch = PackingCollator()(examples) if collate == "packed" else PaddingCollator(pad_token_id=0)(examples)
    results = []
    for logits_in_forward in (False, True):
        model.zero_grad()
        nll, count, outputs = supervised_forward(model, batch, logits_in_forward=logits_in_forward)
        nll.backward()
        results.append((nll.detach(), int(count), _lora_grads(model), outputs.logits.shape))
    (chunked, n, chunked_grads, no_logits), (in_forward, n_forward, forward_grads, kept_logits) = results
    assert n == n_forward == sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples)
    assert no_logits[1] == 0
    assert kept_logits[1] == (n if collate == "packed" else batch["input_ids"].shape[1])
    torch.testing.assert_close(in_forward, chunked, rtol=1e-5, atol=1e-5)
    # gradients reach 6 in size: float32 rounding of the two head computations differs by ~3e-6
    for name, grad in forward_grads.items():
        torch.testing.assert_close(grad, chunked_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_gradient_accumulation_equals_one_large_batch(tiny_model_dir: Path, examples: list[dict],
                                                      tmp_path: Path) -> None:
    model = _model(tiny_model_dir, "varlen_sdpa", lora=True).train()
    trainer = _trainer(model, tmp_path)
    collate = PackingCollator()
    micro_batches = [collate(examples[i:i + 2]) for i in range(0, 8, 2)]
    counts = [int((b["shift_labels"] != IGNORE_INDEX).sum()) for b in micro_batches]
    assert len(set(counts)) > 1, "micro-batches should hold different numbers of supervised tokens"
    total = sum(counts)

    accumulated_loss = 0.0
    for batch in micro_batches:
        loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(total))
        loss.backward()
        accumulated_loss += float(loss.detach())
    accumulated = _lora_grads(model)
    model.zero_grad()

    whole = trainer.compute_loss(model, collate(examples), num_items_in_batch=torch.tensor(total))
    whole.backward()
    assert accumulated_loss == pytest.approx(float(whole), rel=1e-5)
    for name, grad in _lora_grads(model).items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_fast_dropout_drops_the_right_fraction_and_scales_gradients() -> None:
    from sft.modeling.lora import FastDropout

    torch.manual_seed(0)
    dropout = FastDropout(0.05).train()
    x = torch.ones(400, 1000, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert abs(1 - float(kept.float().mean()) - 0.05) < 0.002
    torch.testing.assert_close(y.detach()[kept], torch.full_like(y.detach()[kept], 1 / 0.95))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d(sum)/dx = mask / (1 - p)
    assert torch.equal(dropout.eval()(x), x)


def test_add_lora_uses_fast_dropout_on_cpu_and_keeps_peft_layout(tiny_model_dir: Path) -> None:
    from sft.modeling.lora import FastDropout, add_lora

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    fast = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config, "cpu")
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    dropouts = [m for m in fast.modules() if isinstance(m, FastDropout)]
    assert len(dropouts) == 4 and all(d.p == 0.1 for d in dropouts)
    assert {k for k, _ in fast.named_parameters()} == {k for k, _ in plain.named_parameters()}


def test_wrapping_and_loading_an_adapter_warn_nothing_a_user_cannot_act_on(tiny_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    """PEFT's read of ``is_gradient_checkpointing`` is deprecated in transformers 5; not our users' concern."""
    import warnings

    from peft import PeftModel

    from sft.modeling.lora import add_lora, peft_wrapping

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings(record=True) as plain_warnings:
        warnings.simplefilter("always")
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config, "cpu")
        with peft_wrapping():
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path))
    deprecation = [w for w in plain_warnings if "is_gradient_checkpointing" in str(w.message)]
    assert deprecation or not hasattr(type(AutoModelForCausalLM.from_pretrained(tiny_model_dir)),
                                      "is_gradient_checkpointing"), "the filter has nothing left to hide"
    assert not [w for w in ours if "is_gradient_checkpointing" in str(w.message)]


def test_adapters_reading_one_input_share_one_dropout_mask(tiny_model_dir: Path) -> None:
    from sft.modeling.lora import add_lora

    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                     LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]),
                     "cpu").train()
    seen: dict[str, torch.Tensor] = {}
    layer = model.base_model.model.model.layers[0]
    def record(name: str):  # noqa: ANN202
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            seen.setdefault(name, args[0])
        return hook

    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"):
        module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
        module.lora_A["default"].register_forward_hook(record(name))
    model(input_ids=torch.tensor([[1, 5, 9, 13, 17, 21]]))
    assert seen["q_proj"] is seen["k_proj"] is seen["v_proj"]
    assert seen["gate_proj"] is seen["up_proj"]
    assert seen["o_proj"] is not seen["q_proj"] and seen["gate_proj"] is not seen["q_proj"]
    assert (seen["q_proj"] == 0).any()  # dropped out, not the plain input


def _packed_qkv(lengths: list[int], heads: int = 4, kv_heads: int = 2, dim: int = 8):
    torch.manual_seed(0)
    tokens = sum(lengths)
    boundaries = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    return (torch.randn(1, heads, tokens, dim), torch.randn(1, kv_heads, tokens, dim),
            torch.randn(1, kv_heads, tokens, dim), boundaries)


def test_block_diagonal_attention_equals_per_example_attention() -> None:
    """The one-call masked path (MPS, CUDA float32) against the per-example loop (CPU), GQA included."""
    from sft.modeling.attention import _block_diagonal, _per_example

    query, key, value, boundaries = _packed_qkv([5, 1, 9, 3])
    assert torch.allclose(_block_diagonal(query, key, value, boundaries, 0.0, None),
                          _per_example(query, key, value, packed_segments(boundaries), 0.0, None), atol=1e-6)


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **options):  # noqa: ANN001, ANN202
    """A CPU stand-in for FlashAttention's varlen kernel: [tokens, heads, dim], causal per sequence."""
    causal = options.get("is_causal") or options.get("window_size") == (-1, 0)
    assert causal and k.shape[1] in (q.shape[1], *([1, 2] if options.get("enable_gqa") else []))
    outputs = []
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        outputs.append(F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
            is_causal=True, scale=options.get("scale"), enable_gqa=k.shape[1] != q.shape[1]).transpose(0, 1))
    return torch.cat(outputs)


@pytest.mark.parametrize("release", ["is_causal, no gqa", "window_size, enable_gqa, scale"])
def test_torch_varlen_kernel_is_called_right_for_each_torch_release(monkeypatch, release: str) -> None:
    """The kernel runs on CUDA only; here a stand-in with each release's signature checks the glue:
    layout, causality, grouped-query heads and the scale."""
    import torch.nn.attention.varlen as varlen

    from sft.modeling import attention

    if release.startswith("is_causal"):
        def kernel(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False):  # noqa: ANN001, ANN202
            return _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=is_causal)
    else:
        def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),  # noqa: ANN001, ANN202
                   enable_gqa=False):
            return _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size,
                                     enable_gqa=enable_gqa)
    monkeypatch.setattr(varlen, "varlen_attn", kernel)
    attention.torch_varlen_attention.cache_clear()
    try:
        query, key, value, boundaries = _packed_qkv([4, 7, 2])
        kwargs = {"cu_seq_lens_q": torch.tensor(boundaries, dtype=torch.int32), "max_length_q": 7}
        scale = 0.3 if "scale" in release else None
        actual = attention._flash_varlen(query, key, value, kwargs, boundaries, scale)
        expected = attention._per_example(query, key, value, packed_segments(boundaries), 0.0, scale)
        assert torch.allclose(actual, expected, atol=1e-6)
    finally:
        attention.torch_varlen_attention.cache_clear()


def _windowed_reference(query, key, value, boundaries, window, softcap=None):  # noqa: ANN001, ANN202
    """Attention within each example written out: scores, soft cap, causal mask within ``window``."""
    outputs = []
    groups = query.shape[1] // key.shape[1]
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        q = query[0, :, start:end]
        k = key[0, :, start:end].repeat_interleave(groups, 0)
        v = value[0, :, start:end].repeat_interleave(groups, 0)
        scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        i, j = torch.arange(end - start)[:, None], torch.arange(end - start)[None, :]
        allowed = (j <= i) & (j > i - window if window is not None else True)
        outputs.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v)
    return torch.cat(outputs, dim=1).transpose(0, 1).unsqueeze(0)


@pytest.mark.parametrize("window", [None, 1, 3])
def test_every_packed_attention_path_honours_a_sliding_window(monkeypatch, window) -> None:
    """Per-example (CPU), block-diagonal (MPS, CUDA float32) and the varlen kernel's glue (CUDA half
    precision, a CPU stand-in honouring flash's window_size) against attention written out."""
    import torch.nn.attention.varlen as varlen

    from sft.modeling import attention

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):  # noqa: ANN001, ANN202
        left, right = window_size
        assert right == 0
        rows = []
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            i, j = torch.arange(end - start)[:, None], torch.arange(end - start)[None, :]
            allowed = (j <= i) & ((j >= i - left) if left >= 0 else True)
            rows.append(F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
                attn_mask=allowed, enable_gqa=enable_gqa).transpose(0, 1))
        return torch.cat(rows)

    monkeypatch.setattr(varlen, "varlen_attn", kernel)
    attention.torch_varlen_attention.cache_clear()
    try:
        query, key, value, boundaries = _packed_qkv([5, 1, 9, 3])
        expected = _windowed_reference(query, key, value, boundaries, window)
        kwargs = {"cu_seq_lens_q": torch.tensor(boundaries, dtype=torch.int32), "max_length_q": 9}
        for actual in (attention._per_example(query, key, value, packed_segments(boundaries), 0.0, None, window),
                       attention._block_diagonal(query, key, value, boundaries, 0.0, None, window),
                       attention._flash_varlen(query, key, value, kwargs, boundaries, None, window)):
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    finally:
        attention.torch_varlen_attention.cache_clear()


def test_soft_capped_attention_runs_the_exact_eager_path_on_packed_rows() -> None:
    from sft.modeling.attention import varlen_sdpa_attention

    query, key, value, boundaries = _packed_qkv([5, 1, 9, 3])
    for window in (None, 2):
        output, _ = varlen_sdpa_attention(torch.nn.Module(), query, key, value, None, packed_boundaries=boundaries,
                                          softcap=0.5, sliding_window=window)
        torch.testing.assert_close(output, _windowed_reference(query, key, value, boundaries, window, softcap=0.5),
                                   atol=1e-5, rtol=1e-5)


def test_shared_prompts_pack_each_prompt_once_with_the_same_targets() -> None:
    """pack_shared_prompts: a group's prompt once (less its last token), then per answer that
    token and the answer, positions continuing the prompt's; the scored targets are exactly the
    answers' tokens in order, as with a copy of the prompt per answer."""
    from sft.data.collate import PACKED_PARENTS, pack_shared_prompts

    sequences = [{"prompt_ids": [5, 6, 7], "answer_ids": [20, 21]}, {"prompt_ids": [5, 6, 7], "answer_ids": [22]},
                 {"prompt_ids": [9], "answer_ids": [23, 24, 25]}, {"prompt_ids": [9], "answer_ids": []},
                 {"prompt_ids": [5, 6, 7], "answer_ids": [26]}]
    batch = pack_shared_prompts(sequences)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 20, 21, 7, 22, 9, 23, 24, 25, 9, 5, 6, 7, 26]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 3, 0, 0, 1, 2, 3]]
    assert batch["packed_boundaries"] == [0, 2, 5, 7, 11, 12, 14, 16]
    # a one-token prompt has no segment of its own; a new run of a prompt starts a new group
    assert batch[PACKED_PARENTS] == [-1, 0, 0, -1, -1, -1, 5]
    copied = PackingCollator()([{"input_ids": s["prompt_ids"] + s["answer_ids"],
                                 "labels": [IGNORE_INDEX] * len(s["prompt_ids"]) + s["answer_ids"]}
                                for s in sequences])
    targets = [batch["shift_labels"].flatten()[batch["supervised_positions"]].tolist(),
               copied["shift_labels"].flatten()[copied["supervised_positions"]].tolist()]
    assert targets[0] == targets[1] == [20, 21, 22, 23, 24, 25, 26]
    assert "cu_seq_lens_q" not in batch  # a varlen kernel would take the answers for separate examples


def test_shared_prefix_attention_is_the_same_on_the_masked_and_per_segment_paths() -> None:
    """The masked path (MPS, CUDA) and the CPU's per-segment kernel agree with shared prefixes,
    and both with a reference that gives each answer its own copy of the prompt; GQA included."""
    from sft.modeling.attention import _block_diagonal, _per_example

    query, key, value, boundaries = _packed_qkv([4, 3, 1, 5, 2, 6])
    parents = [-1, 0, 0, -1, 3, -1]
    masked = _block_diagonal(query, key, value, boundaries, 0.0, None, parents=parents)
    per_segment = _per_example(query, key, value, packed_segments(boundaries, parents), 0.0, None)
    torch.testing.assert_close(masked, per_segment, atol=1e-6, rtol=1e-5)
    expected = []
    for start, end, parent in zip(boundaries, boundaries[1:], parents):
        span = [] if parent < 0 else list(range(boundaries[parent], boundaries[parent + 1]))
        keys = span + list(range(start, end))
        out = F.scaled_dot_product_attention(query[:, :, keys], key[:, :, keys], value[:, :, keys], is_causal=True,
                                             enable_gqa=True)
        expected.append(out[:, :, len(span):].transpose(1, 2))
    torch.testing.assert_close(per_segment, torch.cat(expected, dim=1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("parents", "message"), [([-1, 0], "2 entries for 3 segments"),
                                                  ([-1, 0, 1], "segment 2 continues segment 1"),
                                                  ([1, -1, -1], "segment 0 continues segment 1")])
def test_packed_parents_must_point_back_to_a_segment_without_a_parent(parents: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        packed_segments([0, 3, 5, 9], parents)
