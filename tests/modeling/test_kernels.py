"""The autograd functions of sft.modeling.kernels against the same formulas in plain autograd:
forward values and the gradients of every input, float32 and bfloat16, dropout with the keep mask
the function draws (drawn again from the same seed for the reference)."""

from __future__ import annotations

import pytest
import torch

from sft.modeling.kernels.dropout import DropoutFunction, apply_keep_mask, random_keep_mask
from sft.modeling.kernels.dtypes import compute_dtype
from sft.modeling.kernels.lora_linear import FusedLoraFunction, offsets, side_by_side
from sft.modeling.kernels.rms_norm import RMSNormFunction, rms_norm_output
from sft.modeling.kernels.swiglu import SwiGLUDownFunction

SEED = 11


def _close(actual: torch.Tensor, expected: torch.Tensor, exact: bool) -> None:
    """float32: element by element, to rounding. bfloat16 (8 bits of mantissa, and a sum of products
    may cancel to a small element): the error's norm within 1 % of the reference's."""
    assert actual.dtype == expected.dtype
    if exact:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        error = (actual.float() - expected.float()).norm() / expected.float().norm()
        assert error < 1e-2, f"relative error {float(error):.4f}"


def _keep(shape: tuple[int, ...], p: float) -> torch.Tensor | None:
    """The mask a kernel draws for ``shape`` right after ``torch.manual_seed(SEED)``."""
    torch.manual_seed(SEED)
    return random_keep_mask(torch.Size(shape), p, torch.device("cpu")) if p > 0 else None


def _dropped(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return x if keep is None else x * keep.view(x.shape)


def test_compute_dtype_is_autocasts_where_on_else_the_weights() -> None:
    x, weight = torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bfloat16)
    assert compute_dtype(x, weight) == torch.bfloat16
    assert compute_dtype(weight, x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x, x) == torch.bfloat16


def test_the_keep_mask_keeps_one_minus_p_and_repeats_with_the_seed() -> None:
    keep = _keep((400, 1000), 0.25)
    assert keep.dtype == torch.bool and keep.shape == (400, 1000)
    assert abs(float(keep.float().mean()) - 0.75) < 0.002
    assert torch.equal(_keep((400, 1000), 0.25), keep)
    assert bool(random_keep_mask(torch.Size([64, 64]), 0.0, torch.device("cpu")).all())
    x = torch.randn(400, 1000)
    torch.testing.assert_close(apply_keep_mask(x, keep), torch.where(keep, x, 0.0), rtol=0, atol=0)
    out = torch.empty_like(x)
    assert apply_keep_mask(x, keep.float(), out=out) is out and torch.equal(out, x * keep)


def test_dropout_function_scales_what_it_keeps_and_its_gradient() -> None:
    x = torch.randn(30, 50, requires_grad=True)
    grad = torch.randn(30, 50)
    keep = _keep((30, 50), 0.3)
    torch.manual_seed(SEED)
    out = DropoutFunction.apply(x, 0.3)
    out.backward(grad)
    torch.testing.assert_close(out, x.detach() * keep / 0.7)
    torch.testing.assert_close(x.grad, grad * keep / 0.7)


def test_offsets_and_side_by_side_gradients() -> None:
    assert offsets([3, 4, 5]) == [0, 3, 7]
    rows = torch.zeros(6, 10)
    left, right = rows[:, :4], rows[:, 4:]
    assert side_by_side([left, right], 6, torch.float32).data_ptr() == rows.data_ptr()
    assert side_by_side([right, left], 6, torch.float32) is None  # out of order
    assert side_by_side([rows[:, :3], rows[:, 4:]], 6, torch.float32) is None  # a gap between them
    assert side_by_side([left, torch.zeros(6, 6)], 6, torch.float32) is None  # apart
    assert side_by_side([left, right], 6, torch.bfloat16) is None
    assert side_by_side([left, None], 6, torch.float32) is None


SIZES, RANKS, WIDTH = (12, 6, 6), (4, 2, 4), 16


def _lora_group(dtype: torch.dtype, bias: bool, adapter_dtype: torch.dtype | None = None) -> dict:
    """A group of three layers (q, k, v shaped) with random weights, adapters and scalings."""
    torch.manual_seed(0)
    adapter_dtype = adapter_dtype or dtype
    return {"x": torch.randn(2, 5, WIDTH).to(dtype),
            "weights": [torch.randn(size, WIDTH).div(4).to(dtype) for size in SIZES],
            "biases": [torch.randn(size).to(dtype) for size in SIZES] if bias else None,
            "a": [torch.randn(rank, WIDTH).div(4).to(adapter_dtype).requires_grad_() for rank in RANKS],
            "b": [torch.randn(size, rank).to(adapter_dtype).requires_grad_() for size, rank in zip(SIZES, RANKS)],
            "scalings": (2.0, 0.5, 1.5),
            "grads": [torch.randn(2, 5, size).to(dtype) for size in SIZES]}


def _lora_reference(group: dict, p: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's output in plain autograd, in float32, and the gradients of x, the As, the Bs."""
    x = group["x"].float().requires_grad_()
    a = [t.detach().float().requires_grad_() for t in group["a"]]
    b = [t.detach().float().requires_grad_() for t in group["b"]]
    dropped = _dropped(x, _keep((10, WIDTH), p))
    outputs = []
    for i, weight in enumerate(group["weights"]):
        out = x @ weight.float().T + (0 if group["biases"] is None else group["biases"][i].float())
        outputs.append(out + group["scalings"][i] / (1 - p) * (dropped @ a[i].T) @ b[i].T)
    torch.autograd.backward(outputs, [g.float() for g in group["grads"]])
    return outputs, [x.grad, *(t.grad for t in a), *(t.grad for t in b)]


def _lora_fused(group: dict, p: float, rebuild=None) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    x = group["x"].clone().requires_grad_()
    bias = None if group["biases"] is None else torch.cat(group["biases"])
    alphas = tuple(s / (1 - p) for s in group["scalings"])
    torch.manual_seed(SEED)
    outputs = FusedLoraFunction.apply(x, (False, False, True), rebuild, torch.cat(group["weights"]), bias, p, alphas,
                                      SIZES, RANKS, *group["a"], *group["b"])
    torch.autograd.backward(outputs, group["grads"])
    grads = [x.grad, *(t.grad for t in group["a"]), *(t.grad for t in group["b"])]
    return outputs, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_fused_lora_function_gives_plain_autograd_values_and_gradients(dtype: torch.dtype, p: float,
                                                                       bias: bool) -> None:
    group = _lora_group(dtype, bias)
    outputs, grads = _lora_fused(group, p)
    expected_outputs, expected_grads = _lora_reference(group, p)
    exact = dtype == torch.float32
    for out, expected in zip(outputs, expected_outputs, strict=True):
        _close(out, expected.to(dtype), exact)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert expected.abs().max() > 0
        _close(grad, expected.to(dtype), exact)
    # q and k are views of one tensor, v has storage of its own
    assert outputs[0].untyped_storage().data_ptr() == outputs[1].untyped_storage().data_ptr()
    assert outputs[2].untyped_storage().data_ptr() != outputs[0].untyped_storage().data_ptr()


def test_fused_lora_function_under_autocast_returns_each_inputs_dtype() -> None:
    """bfloat16 input and base, float32 adapters under bfloat16 autocast (the CUDA policy): the
    outputs and x's gradient in bfloat16, the adapters' gradients in float32."""
    group = _lora_group(torch.bfloat16, bias=True, adapter_dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs, grads = _lora_fused(group, 0.3)
    expected_outputs, expected_grads = _lora_reference(group, 0.3)
    for out, expected in zip(outputs, expected_outputs, strict=True):
        _close(out, expected.to(torch.bfloat16), exact=False)
    _close(grads[0], expected_grads[0].to(torch.bfloat16), exact=False)
    for grad, expected in zip(grads[1:], expected_grads[1:], strict=True):
        _close(grad, expected, exact=False)


def test_a_rebuilt_input_is_not_kept_and_gives_the_same_gradients() -> None:
    """With a recipe, the function keeps the tensors x is rebuilt from instead of x."""
    group = _lora_group(torch.float32, bias=False)
    half = group["x"] / 2
    group["x"] = half * 2
    _, expected = _lora_fused(group, 0.3)
    for t in (*group["a"], *group["b"]):
        t.grad = None
    kept = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept.append(tensor.untyped_storage().data_ptr())
        return tensor

    source = half.clone()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, grads = _lora_fused(group, 0.3, rebuild=(lambda t: t * 2, (source,)))
    assert source.untyped_storage().data_ptr() in kept
    for grad, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, want, rtol=0, atol=0)


def _swiglu_inputs(dtype: torch.dtype) -> dict:
    torch.manual_seed(1)
    inner, out, rank = 24, 16, 4
    return {"gate": torch.randn(2, 5, inner).to(dtype), "up": torch.randn(2, 5, inner).to(dtype),
            "weight": torch.randn(out, inner).div(4).to(dtype), "bias": torch.randn(out).to(dtype),
            "a": torch.randn(rank, inner).div(4).to(dtype).requires_grad_(),
            "b": torch.randn(out, rank).to(dtype).requires_grad_(), "scaling": 2.0,
            "grad": torch.randn(2, 5, out).to(dtype)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_swiglu_down_function_gives_plain_autograd_values_and_gradients(dtype: torch.dtype, p: float) -> None:
    inputs = _swiglu_inputs(dtype)
    gate, up = (inputs[name].clone().requires_grad_() for name in ("gate", "up"))
    torch.manual_seed(SEED)
    out = SwiGLUDownFunction.apply(gate, up, inputs["weight"], inputs["bias"], p, (inputs["scaling"] / (1 - p),),
                                   (16,), (4,), inputs["a"], inputs["b"])
    grads = torch.autograd.grad(out, (gate, up, inputs["a"], inputs["b"]), inputs["grad"])

    gate32, up32, a32, b32 = (inputs[name].detach().float().requires_grad_() for name in ("gate", "up", "a", "b"))
    hidden = torch.nn.functional.silu(gate32) * up32
    dropped = _dropped(hidden, _keep((10, 24), p))
    expected = (hidden @ inputs["weight"].float().T + inputs["bias"].float()
                + inputs["scaling"] / (1 - p) * (dropped @ a32.T) @ b32.T)
    expected_grads = torch.autograd.grad(expected, (gate32, up32, a32, b32), inputs["grad"].float())
    exact = dtype == torch.float32
    _close(out, expected.to(dtype), exact)
    for grad, want in zip(grads, expected_grads, strict=True):
        assert want.abs().max() > 0
        _close(grad, want.to(dtype), exact)
    # gate's and up's gradients lie side by side in one tensor, as the gate/up group's output
    assert grads[1].data_ptr() == grads[0].data_ptr() + 24 * grads[0].element_size()


@pytest.mark.parametrize(("x_dtype", "weight_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                       (torch.bfloat16, torch.float32)])
def test_rms_norm_function_gives_plain_autograd_values_and_gradients(x_dtype: torch.dtype,
                                                                     weight_dtype: torch.dtype) -> None:
    """float32; bfloat16 (the CUDA policy); a bfloat16 stream through a float32 norm (QLoRA's)."""
    torch.manual_seed(2)
    x = (torch.randn(3, 7, 48) * 3).to(x_dtype)
    weight = torch.empty(48).uniform_(0.5, 1.5).to(weight_dtype)
    grad = torch.randn(3, 7, 48)
    ours = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    out, rstd = RMSNormFunction.apply(*ours, 1e-5)
    out.backward(grad.to(out.dtype))
    plain = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    x32 = plain[0].float()
    expected_rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)
    expected = plain[1] * (x32 * expected_rstd).to(x_dtype)
    expected.backward(grad.to(expected.dtype))
    exact = x_dtype == torch.float32
    assert out.dtype == expected.dtype and not rstd.requires_grad
    torch.testing.assert_close(out, expected, rtol=1e-6 if exact else 0, atol=1e-6 if exact else 0)
    torch.testing.assert_close(rstd, expected_rstd.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rms_norm_output(x, rstd, weight), out.detach(), rtol=0, atol=0)
    for got, want in zip((ours[0].grad, ours[1].grad), (plain[0].grad, plain[1].grad), strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-5 if exact else 2e-2,
                                   atol=1e-5 if exact else 5e-2)
