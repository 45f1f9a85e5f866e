"""Fused LoRA projections compute what PEFT's layers compute, and step aside where they cannot."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from sft.modeling.fusion import FusedLinear, Unfused, fuse
from sft.modeling.lora import add_lora
from sft.modeling.models import load_model

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _pair(model_dir: Path, dropout: float, dtype: torch.dtype = torch.float32, targets: list[str] = ALL_PROJECTIONS,
          gradient_checkpointing: bool = False, device: str = "cpu",
          attention: str = "sdpa") -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same base and the same (random, nonzero) adapters, PEFT's layers and fused, built on
    ``device`` (moving a fused model afterwards would give each layer its own weight again)."""
    models = []
    for fused in (False, True):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attention).to(device)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        torch.manual_seed(3)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False, target_modules=targets)
        model = add_lora(model, config, device)
        if fused:
            fuse(model)
        models.append(model.train())
    return models[0], models[1]


def _loss_and_grads(model: torch.nn.Module, input_ids: torch.Tensor, seed: int = 7) -> tuple[float, dict]:
    torch.manual_seed(seed)  # the same dropout masks for both
    input_ids = input_ids.to(model.device)
    loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _fused_groups_ran(model: torch.nn.Module) -> int:
    """How many groups ran their fused function."""
    groups = {id(m._fused_group): m._fused_group for m in model.modules() if isinstance(m, FusedLinear)}
    return sum(group.fused_calls > 0 for group in groups.values())


INPUT = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]])


@pytest.mark.parametrize("dropout", [0.0, 0.1, 0.5])
def test_fused_layers_give_peft_loss_and_gradients(tiny_model_dir: Path, dropout: float) -> None:
    plain, fused = _pair(tiny_model_dir, dropout)
    assert sum(isinstance(m, FusedLinear) for m in fused.modules()) == 2 * len(ALL_PROJECTIONS)
    assert [type(layer.mlp).__name__ for layer in fused.base_model.model.model.layers] == ["FusedLlamaMLP"] * 2
    assert sum(type(m).__name__ == "FusedLlamaRMSNorm" for m in fused.modules()) == 2 * 2 + 1
    plain_loss, plain_grads = _loss_and_grads(plain, INPUT)
    fused_loss, fused_grads = _loss_and_grads(fused, INPUT)
    assert _fused_groups_ran(fused) == 2 * 4  # per layer: q/k/v, o, gate/up, down
    assert fused_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain_grads.keys() == fused_grads.keys() and len(plain_grads) == 2 * 2 * len(ALL_PROJECTIONS)
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_gate_up_backward_reads_the_swiglu_gradients_in_place(tiny_model_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused MLP hands gate's and up's gradients over as column blocks of one tensor, so the
    gate/up group's backward reads them without a concatenation (as o's reads its one gradient);
    q/k/v's gradients come apart from attention and are joined."""
    from sft.modeling.kernels import lora_linear

    found = []
    original = lora_linear.side_by_side

    def recording(grads, rows, dtype):
        joined = original(grads, rows, dtype)
        found.append((tuple(g.shape[-1] for g in grads), joined is not None))
        return joined

    monkeypatch.setattr(lora_linear, "side_by_side", recording)
    _, fused = _pair(tiny_model_dir, 0.1)
    _loss_and_grads(fused, INPUT)
    config = fused.base_model.model.config
    gate_up = (config.intermediate_size, config.intermediate_size)
    layers = config.num_hidden_layers
    assert sorted(shapes for shapes, joined in found if joined) == [(config.hidden_size,)] * layers + [gate_up] * layers
    assert [len(shapes) for shapes, joined in found if not joined] == [3] * layers


def _saved_bytes_per_token(model: torch.nn.Module, tokens: int) -> float:
    """Bytes one decoder layer keeps for its backward pass on a packed row of ``tokens`` (two
    examples), each storage counted once, the model's parameters not counted."""
    decoder = model.base_model.model.model
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(1, tokens, decoder.config.hidden_size, requires_grad=True)
    positions = torch.cat([torch.arange(tokens // 2), torch.arange(tokens - tokens // 2)])[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        cos_sin = decoder.rotary_emb(x, positions)
        decoder.layers[0](x, position_embeddings=cos_sin, position_ids=positions,
                          packed_boundaries=[0, tokens // 2, tokens])
    return sum(kept.values())


def test_a_fused_layer_keeps_each_activation_once(tiny_model_dir: Path) -> None:
    """What a fused Llama layer keeps per token, counted: the norms' inputs, the rotated q and k, v,
    attention's output (which the output projection reads, so it is kept once), gate and up,
    the rank-r products and one-byte dropout masks. The norm outputs and the dropped-out inputs
    are rebuilt in the backward pass, not kept."""
    _, fused = _pair(tiny_model_dir, 0.1)
    config = fused.base_model.model.config
    h, i, heads, kv, d = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                          config.num_key_value_heads, config.hidden_size // config.num_attention_heads)
    r = 4
    floats = (h + 1  # input norm: its input and 1 / rms
              + 3 * r  # q/k/v's rank-r products
              + 2 * d  # rotary cos and sin
              + h + 2 * kv * d  # rotated q and k, and v
              + h + heads  # attention's output and log-sum-exp
              + r  # o's rank-r product
              + h + 1  # post-attention norm
              + 2 * r + 2 * i + r)  # gate/up's products, gate and up, down's product
    masks = 3 * h + i  # bytes: q/k/v's, o's, gate/up's, down's
    per_token = (_saved_bytes_per_token(fused, 60) - _saved_bytes_per_token(fused, 20)) / 40
    assert per_token == 4 * floats + masks


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_second_backward_pass_gives_the_same_gradients(tiny_model_dir: Path, dropout: float) -> None:
    """The backward passes write into memory of their own (rebuilt inputs, dropped-out copies,
    the SwiGLU activation): none of it may be a tensor the graph keeps, or a second backward pass
    through the same graph (``retain_graph``) would read what the first overwrote."""
    _, fused = _pair(tiny_model_dir, dropout, attention="varlen_sdpa")
    lengths = [7, 1, 12, 4]
    torch.manual_seed(5)
    input_ids = torch.randint(3, 60, (1, sum(lengths)))
    packed = {"position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
              "packed_boundaries": [0, 7, 8, 20, 24]}
    loss = fused(input_ids=input_ids, labels=input_ids, use_cache=False, **packed).loss
    parameters = [p for p in fused.parameters() if p.requires_grad]
    first = torch.autograd.grad(loss, parameters, retain_graph=True)
    second = torch.autograd.grad(loss, parameters)
    assert _fused_groups_ran(fused) == 2 * 4
    for a, b in zip(first, second, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_attention_on_a_packed_row_gives_peft_loss_and_gradients(tiny_model_dir: Path, dropout: float,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A packed row (as the trainer feeds it) through the fused layers, whose attention runs the
    rotary embedding and per-example attention as one function, against PEFT's layers and
    transformers' attention."""
    from sft.modeling import fusion
    from sft.modeling.attention import PackedRotaryAttention
    from sft.modeling.kernels import lora_linear

    calls = []

    class Counting(PackedRotaryAttention):
        @classmethod
        def apply(cls, *args):  # type: ignore[override]
            calls.append([segment.end - segment.start for segment in args[5]])
            return PackedRotaryAttention.apply(*args)

    monkeypatch.setattr(fusion, "PackedRotaryAttention", Counting)
    joined = []
    side_by_side = lora_linear.side_by_side

    def recording(grads, rows, dtype):
        found = side_by_side(grads, rows, dtype)
        joined.append((len(grads), found is not None))
        return found

    monkeypatch.setattr(lora_linear, "side_by_side", recording)
    plain, fused = _pair(tiny_model_dir, dropout, attention="varlen_sdpa")
    assert [type(layer.self_attn).__name__ for layer in fused.base_model.model.model.layers] == [
        "FusedLlamaAttention"] * 2
    lengths = [7, 1, 12, 4]
    torch.manual_seed(5)
    input_ids = torch.randint(3, 60, (1, sum(lengths)))
    packed = {"position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
              "packed_boundaries": [0, 7, 8, 20, 24]}
    results = []
    for model in (plain, fused):
        torch.manual_seed(7)
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False, **packed).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert calls == [lengths, lengths]  # one call per layer
    # every group's backward, q/k/v's included, read its gradients without concatenating them
    assert sorted(joined) == sorted([(3, True), (1, True), (2, True)] * 2)
    (plain_loss, plain_grads), (fused_loss, fused_grads) = results
    assert fused_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_attention_steps_aside_for_generation_with_a_cache(tiny_model_dir: Path) -> None:
    """Generation (a KV cache, no packed row) runs the model's own attention in a fused model and
    gives PEFT's greedy tokens."""
    plain, fused = _pair(tiny_model_dir, 0.1, attention="varlen_sdpa")
    prompt = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        tokens = [model.eval().generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=True)
                  for model in (plain, fused)]
    assert tokens[0].shape == (1, 11)
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rotary_attention_gives_transformers_values_and_gradients(dtype: torch.dtype) -> None:
    """PackedRotaryAttention against transformers' rotary embedding and SDPA run on each example
    alone, grouped-query heads; its input gradients are column blocks of one tensor."""
    import itertools

    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from sft.modeling.attention import PackedRotaryAttention, packed_segments

    heads, kv_heads, dim, lengths = 4, 2, 8, [5, 1, 9, 3]
    tokens = sum(lengths)
    torch.manual_seed(0)
    qkv = torch.randn(1, tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    positions = torch.cat([torch.arange(n) for n in lengths]).float()
    angles = positions[:, None] / 100 ** (torch.arange(0, dim, 2).float() / dim)
    cos, sin = (f(torch.cat([angles, angles], dim=-1))[None].to(dtype) for f in (torch.cos, torch.sin))
    grad = torch.randn(1, tokens, heads * dim).to(dtype)
    results = []
    for ours in (True, False):
        joined = qkv.clone().requires_grad_()
        query, key, value = joined.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        if ours:
            segments = packed_segments([0, *itertools.accumulate(lengths)])
            out = PackedRotaryAttention.apply(query, key, value, cos, sin, segments, 0.3)
            grads = torch.autograd.grad(out, (query, key, value), grad, retain_graph=True)
            assert grads[1].data_ptr() == grads[0].data_ptr() + heads * dim * grads[0].element_size()
            out.backward(grad)
        else:
            q, k, v = (t.view(1, tokens, -1, dim).transpose(1, 2) for t in (query, key, value))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            bounds = [0, *itertools.accumulate(lengths)]
            out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
                q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=0.3, enable_gqa=True)
                for a, b in itertools.pairwise(bounds)], dim=2).transpose(1, 2).flatten(2)
            out.backward(grad)
        results.append((out, joined.grad))
    exact = dtype == torch.float32
    for ours, reference in zip(*results):
        assert ours.dtype == dtype and reference.abs().max() > 0
        torch.testing.assert_close(ours, reference, rtol=1e-5 if exact else 2e-2, atol=1e-5 if exact else 2e-2)


def test_a_norm_output_changed_in_place_is_kept_not_rebuilt(tiny_model_dir: Path) -> None:
    """A fused group rebuilds its input from the RMSNorm's saved tensors only while that input is
    the norm's output as computed: changed in place (by a forward hook, say), it is kept as it is,
    and the gradients stay PEFT's."""
    plain, fused = _pair(tiny_model_dir, 0.1)
    for model in (plain, fused):
        for layer in model.base_model.model.model.layers:
            layer.input_layernorm.register_forward_hook(lambda module, args, output: output.mul_(1.5))
    plain_loss, plain_grads = _loss_and_grads(plain, INPUT)
    fused_loss, fused_grads = _loss_and_grads(fused, INPUT)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_different_dropout_mask_would_be_caught(tiny_model_dir: Path) -> None:
    """The comparison above can fail: other masks (another seed) give another loss."""
    plain, fused = _pair(tiny_model_dir, 0.5)
    assert _loss_and_grads(fused, INPUT, seed=8)[0] != pytest.approx(_loss_and_grads(plain, INPUT)[0], rel=1e-6)


def test_fused_layers_under_gradient_checkpointing(tiny_model_dir: Path) -> None:
    plain, fused = _pair(tiny_model_dir, 0.1, gradient_checkpointing=True)
    plain_loss, plain_grads = _loss_and_grads(plain, INPUT)
    fused_loss, fused_grads = _loss_and_grads(fused, INPUT)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_group_weights_are_views_of_one_tensor_and_files_stay_peft(tiny_model_dir: Path, tmp_path: Path) -> None:
    plain, fused = _pair(tiny_model_dir, 0.0)
    attention = fused.base_model.model.model.layers[0].self_attn
    q, k, v = (getattr(attention, name).base_layer.weight for name in ("q_proj", "k_proj", "v_proj"))
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()
    plain_attention = plain.base_model.model.model.layers[0].self_attn
    torch.testing.assert_close(k, plain_attention.k_proj.base_layer.weight, rtol=0, atol=0)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain.named_parameters()]
    plain.save_pretrained(tmp_path / "plain")
    fused.save_pretrained(tmp_path / "fused")
    plain_file, fused_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("plain", "fused"))
    assert plain_file.keys() == fused_file.keys()
    for key, tensor in plain_file.items():
        assert torch.equal(fused_file[key], tensor), key


def _split_apart(model: torch.nn.Module) -> None:
    """What moving a model to another device does to its weights: a new tensor for each."""
    model._apply(lambda t: t.clone())


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "gradient-checkpointing"])
def test_weights_split_by_a_move_are_joined_again_and_train_alike(tiny_model_dir: Path, checkpointing: bool) -> None:
    """The training stages add the adapters on the CPU and the Trainer then moves the model to
    the GPU, tensor by tensor: q/k/v and gate/up must still run fused there, with PEFT's loss and
    gradients (also when the join happens inside a checkpointed layer), and a call under
    inference_mode must not join them into inference tensors."""
    plain, fused = _pair(tiny_model_dir, 0.1, gradient_checkpointing=checkpointing)
    _split_apart(fused)
    attention = fused.base_model.model.model.layers[0].self_attn
    q, k = attention.q_proj.base_layer.weight, attention.k_proj.base_layer.weight
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    with torch.inference_mode():
        fused(input_ids=INPUT, use_cache=False)
    assert _fused_groups_ran(fused) == 4  # o and down alone: q/k/v and gate/up ran PEFT's forward
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    plain_loss, plain_grads = _loss_and_grads(plain, INPUT)
    fused_loss, fused_grads = _loss_and_grads(fused, INPUT)
    assert _fused_groups_ran(fused) == 8
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()  # the same Parameters, joined
    assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()
    assert fused_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def _resident_file_kb() -> int:
    """This process's resident pages that belong to mapped files (Linux), in KB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status; madvise is Linux's")
def test_fusing_a_mapped_checkpoint_leaves_no_second_resident_copy(tmp_path: Path) -> None:
    """A float32 checkpoint loaded in float32 is memory-mapped, not copied. Fusing copies the q/k/v
    and gate/up weights into one tensor each; the pages of the originals must not stay resident
    beside the copies (about a third more memory for TinyLlama on a CPU), and dropping them loses
    no data."""
    config = LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    model = load_model(str(tmp_path / "model"), torch.float32, device="cpu")
    fusable = [parameter for name, parameter in model.named_parameters()
               if name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]
    fusable_kb = sum(w.numel() * w.element_size() for w in fusable) // 1024
    values = [w.detach().clone() for w in fusable]  # ours, in ordinary memory
    assert all(torch.equal(w, v) for w, v in zip(fusable, values))  # every original page now resident
    before = _resident_file_kb()
    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=ALL_PROJECTIONS)
    fused = add_lora(model, lora, "cpu")
    fuse(fused)
    assert before - _resident_file_kb() > 0.9 * fusable_kb
    assert all(torch.equal(w, v) for w, v in zip(fusable, values))  # the originals read back from the file
    attention = fused.base_model.model.model.layers[1].self_attn
    joined = torch.cat([getattr(attention, name).base_layer.weight for name in ("q_proj", "k_proj", "v_proj")])
    torch.testing.assert_close(joined, torch.cat(values[5:8]), rtol=0, atol=0)


def test_disabled_merged_and_second_adapters_run_peft_forward(tiny_model_dir: Path) -> None:
    plain, fused = _pair(tiny_model_dir, 0.0)
    plain.eval(), fused.eval()
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=INPUT).logits
        with fused.disable_adapter():
            torch.testing.assert_close(fused(input_ids=INPUT).logits, base)
        adapted = plain(input_ids=INPUT).logits
        torch.testing.assert_close(fused(input_ids=INPUT).logits, adapted)
        assert (adapted - base).abs().max() > 1e-3  # the adapters change the output
        fused.merge_adapter()
        torch.testing.assert_close(fused(input_ids=INPUT).logits, adapted, rtol=1e-5, atol=1e-5)
        fused.unmerge_adapter()
        torch.testing.assert_close(fused(input_ids=INPUT).logits, adapted, rtol=1e-5, atol=1e-5)


def test_mlp_without_all_three_adapters_runs_its_own_forward(tiny_model_dir: Path) -> None:
    plain, fused = _pair(tiny_model_dir, 0.0, targets=["q_proj", "v_proj", "gate_proj", "up_proj"])
    assert "Fused" not in type(fused.base_model.model.model.layers[0].mlp).__name__
    plain_loss, plain_grads = _loss_and_grads(plain, INPUT)
    fused_loss, fused_grads = _loss_and_grads(fused, INPUT)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_group_not_called_together_stops_fusing_and_stays_correct(tiny_model_dir: Path) -> None:
    """A model that feeds q, k and v different inputs: the group notices and runs layer by layer."""
    _, fused = _pair(tiny_model_dir, 0.0)
    attention = fused.base_model.model.model.layers[0].self_attn
    layers = [attention.q_proj, attention.k_proj, attention.v_proj]
    inputs = [torch.randn(3, 32) for _ in layers]
    expected = [_peft_forward(layer, x) for layer, x in zip(layers, inputs)]
    for _ in range(3):
        for layer, x, want in zip(layers, inputs, expected):
            torch.testing.assert_close(layer(x), want)
    assert not attention.q_proj._fused_group.enabled


def _peft_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from peft.tuners.lora import Linear

    return Linear.forward(layer, x)


def test_copies_of_a_fused_model_train_alike(tiny_model_dir: Path) -> None:
    _, fused = _pair(tiny_model_dir, 0.1)
    copied = copy.deepcopy(fused)
    assert _loss_and_grads(copied, INPUT)[0] == pytest.approx(_loss_and_grads(fused, INPUT)[0], rel=1e-6)


def test_fused_layers_under_the_cuda_policy_precision(tiny_model_dir: Path) -> None:
    """bfloat16 base weights, float32 adapters (PEFT's default), bfloat16 autocast: the CUDA policy,
    run on the CPU. Gradients come back in each adapter's own dtype and track float32 training
    with the same dropout masks. (PEFT's layers are no reference here: in bfloat16 they cast the
    input for each adapter, so q, k and v each draw their own mask.)"""
    reference = _loss_and_grads(_pair(tiny_model_dir, 0.1)[0], INPUT)
    _, fused = _pair(tiny_model_dir, 0.1, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(fused, INPUT)
    assert loss == pytest.approx(reference[0], rel=1e-2)
    for name, grad in reference[1].items():
        assert grads[name].dtype == grad.dtype == torch.float32, name
        assert torch.nn.functional.cosine_similarity(grads[name].flatten(), grad.flatten(), dim=0) > 0.99, name


def test_quantized_or_custom_base_layers_are_left_to_peft(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]), "cpu")
    attention = model.base_model.model.model.layers[0].self_attn
    attention.v_proj.base_layer = _OtherLinear(32, attention.v_proj.base_layer.out_features)
    report = fuse(model)
    assert report.joined == 1  # layer 1's q, k, v; layer 0's v is not a plain Linear
    assert [module for module in report.unfused if module.reason.endswith("PEFT's layer")] == [
        Unfused("base_model.model.model.layers.0.self_attn.v_proj", "v_proj", "a _OtherLinear base: PEFT's layer")]
    assert type(attention.v_proj) is not FusedLinear
    assert type(attention.q_proj) is FusedLinear and len(attention.q_proj._fused_group.members) == 1


class _OtherLinear(torch.nn.Linear):
    pass


def test_a_group_with_and_without_biases_is_left_to_peft(tiny_model_dir: Path) -> None:
    """q with a bias beside k and v without: the group cannot run as one function with one bias,
    so the build leaves its layers to PEFT, says why, and the model computes PEFT's output."""
    models = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        q = model.model.layers[0].self_attn.q_proj
        q.bias = torch.nn.Parameter(torch.linspace(-1, 1, q.out_features))
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj"])
        torch.manual_seed(3)
        models.append(add_lora(model, config, "cpu"))
    report = fuse(models[1])
    attention = models[1].base_model.model.model.layers[0].self_attn
    assert all(type(getattr(attention, name)) is not FusedLinear for name in ("q_proj", "k_proj", "v_proj"))
    assert report.joined == 1  # layer 1's q, k, v
    assert [(module.module.rsplit(".", 1)[-1], module.reason) for module in report.unfused
            if module.reason.endswith("PEFT's layer")] == [
        (name, "biased and unbiased layers in one group: PEFT's layer") for name in ("q_proj", "k_proj", "v_proj")]
    assert "q_proj x1 (biased and unbiased layers in one group: PEFT's layer)" in report.line()
    with torch.no_grad():
        plain, fused = (model(input_ids=INPUT).logits for model in models)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_the_report_line_counts_what_was_left_and_why() -> None:
    from sft.modeling.fusion import FusionReport

    report = FusionReport(layers=3, functions=2, joined=1, unfused=[
        Unfused("a.q_proj", "q_proj", "a Conv1D base: PEFT's layer"), Unfused("a.mlp", "GeluMLP", "not Llama's"),
        Unfused("b.q_proj", "q_proj", "a Conv1D base: PEFT's layer")])
    assert report.line() == ("LoRA fusion: 3 adapted layers run as 2 fused functions (q/k/v and gate/up joined); "
                             "left to their own code: q_proj x2 (a Conv1D base: PEFT's layer), GeluMLP x1 (not Llama's)")
    assert FusionReport().line() == "LoRA fusion: 0 adapted layers run as 0 fused functions (q/k/v and gate/up joined)"


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layers_on_cuda(tiny_model_dir: Path, dtype: torch.dtype) -> None:
    """float32: PEFT's loss and gradients (no dropout: PEFT draws its masks otherwise on CUDA).
    bfloat16 weights under bfloat16 autocast (the CUDA policy): fused float32 with the same masks."""
    if dtype == torch.float32:
        plain, fused = _pair(tiny_model_dir, 0.0, device="cuda")
        reference = _loss_and_grads(plain, INPUT)
        result = _loss_and_grads(fused, INPUT)
        tolerance = {"rel": 1e-4, "rtol": 1e-3, "atol": 1e-5, "cosine": None}
    else:
        reference = _loss_and_grads(_pair(tiny_model_dir, 0.1, device="cuda")[1], INPUT)
        _, fused = _pair(tiny_model_dir, 0.1, dtype=dtype, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            result = _loss_and_grads(fused, INPUT)
        tolerance = {"rel": 1e-2, "cosine": 0.99}
    assert _fused_groups_ran(fused) == 2 * 4
    assert result[0] == pytest.approx(reference[0], rel=tolerance["rel"])
    for name, grad in reference[1].items():
        assert result[1][name].dtype == grad.dtype == torch.float32, name
        if tolerance["cosine"] is None:
            torch.testing.assert_close(result[1][name], grad, rtol=tolerance["rtol"], atol=tolerance["atol"], msg=name)
        else:
            cosine = torch.nn.functional.cosine_similarity(result[1][name].flatten(), grad.flatten(), dim=0)
            assert cosine > tolerance["cosine"], name


@pytest.mark.parametrize(("x_dtype", "weight_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                       (torch.bfloat16, torch.float32)])
def test_fused_rms_norm_gives_transformers_values_and_gradients(x_dtype: torch.dtype,
                                                                weight_dtype: torch.dtype) -> None:
    """float32; bfloat16 (the CUDA policy); a bfloat16 stream through a float32 norm (QLoRA's)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from sft.modeling.fusion import fuse_rms_norms

    torch.manual_seed(0)
    norms = [LlamaRMSNorm(48, eps=1e-5).to(weight_dtype) for _ in range(2)]
    with torch.no_grad():
        norms[0].weight.uniform_(0.5, 1.5)
        norms[1].weight.copy_(norms[0].weight)
    holder = torch.nn.Sequential(norms[1])
    assert fuse_rms_norms(holder) == 1 and type(norms[1]).__name__ == "FusedLlamaRMSNorm"
    x = (torch.randn(3, 7, 48) * 3).to(x_dtype)
    grad = torch.randn(3, 7, 48)
    results = []
    for norm in norms:
        inp = x.clone().requires_grad_()
        out = norm(inp)
        out.backward(grad.to(out.dtype))
        results.append((out, inp.grad, norm.weight.grad))
    (out, grad_x, grad_w), (fused_out, fused_grad_x, fused_grad_w) = results
    assert fused_out.dtype == out.dtype and fused_grad_x.dtype == x_dtype and fused_grad_w.dtype == weight_dtype
    exact = x_dtype == torch.float32
    torch.testing.assert_close(fused_out, out, rtol=1e-6 if exact else 0, atol=1e-6 if exact else 0)
    torch.testing.assert_close(fused_grad_x.float(), grad_x.float(), rtol=1e-5 if exact else 2e-2,
                               atol=1e-5 if exact else 2e-2)
    torch.testing.assert_close(fused_grad_w.float(), grad_w.float(), rtol=1e-5 if exact else 2e-2,
                               atol=1e-5 if exact else 5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16-weights"])
def test_merged_weights_give_the_adapters_output_and_put_the_base_back_bit_for_bit(tiny_model_dir: Path,
                                                                                  dtype: torch.dtype) -> None:
    """Sampling through a model in training (sft grpo) merges into a copy of the weights: the same
    logits as base + adapter, and afterwards the very same base tensors, fused groups and all."""
    from peft.tuners.lora import LoraLayer

    from sft.modeling.lora import merged_weights

    _, model = _pair(tiny_model_dir, 0.0, dtype)
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    before = [(m.base_layer.weight.data_ptr(), m.base_layer.weight.detach().clone()) for m in layers]
    with torch.no_grad():
        adapted = model(input_ids=INPUT).logits.float()
        with merged_weights(model) as merged:
            assert merged and all(m.merged for m in layers)
            assert all(m.base_layer.weight.data_ptr() != ptr for m, (ptr, _) in zip(layers, before))
            # on the CPU each copy comes laid out for decoding (sft.modeling.generate.decode_layout)
            assert all(m.base_layer.weight.stride() == (1, m.base_layer.weight.shape[0]) for m in layers)
            merged_logits = model(input_ids=INPUT).logits.float()
        base_again = [m.base_layer.weight for m in layers]
        after = model(input_ids=INPUT).logits.float()
    tolerance = 1e-4 if dtype == torch.float32 else 0.1  # bf16 rounds the merged weights
    assert torch.allclose(merged_logits, adapted, atol=tolerance)
    assert torch.equal(after, adapted)
    assert not any(m.merged for m in layers)
    assert all(w.data_ptr() == ptr and torch.equal(w, saved) for w, (ptr, saved) in zip(base_again, before))
    if dtype == torch.float32:  # the groups still run fused: their weights are one tensor again
        assert _fused_groups_ran(model) > 0

    # an error inside puts everything back too; a disabled adapter is not merged
    with pytest.raises(RuntimeError, match="inside"), merged_weights(model):
        raise RuntimeError("inside")
    assert all(m.base_layer.weight.data_ptr() == ptr for m, (ptr, _) in zip(layers, before))
    assert not any(m.merged for m in layers)
    with model.disable_adapter(), merged_weights(model) as merged:
        assert not merged
