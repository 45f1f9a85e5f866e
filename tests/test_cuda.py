"""The CUDA paths: precision policy, QLoRA's refusals, and training runs that need a GPU.

The policy and refusal tests run anywhere; the training runs skip without a CUDA GPU (and QLoRA
without bitsandbytes, and DDP without two GPUs).
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft.config import ConfigError, build_config
from sft.modeling import devices
from sft.modeling.devices import DevicePolicy, device_policy
from sft.modeling.fusion import FusedLinear
from sft.modeling.models import check_4bit_supported
from sft.recipes.sft import train
from sft.training.loss import linear_cross_entropy_sum
from tests.tiny import as_flags, logged, tiny_run_overrides

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="bitsandbytes not installed (pip install -e '.[cuda]')")


@pytest.mark.parametrize(("bf16_supported", "load_dtype", "bf16", "fp16", "compute"), [
    (True, torch.bfloat16, True, False, torch.bfloat16),   # Ampere and newer
    (False, torch.float32, False, True, torch.float16),    # T4, V100: float32 weights, fp16 autocast + loss scaling
])
def test_cuda_precision_is_bf16_where_supported_else_fp16_with_loss_scaling(
        monkeypatch: pytest.MonkeyPatch, bf16_supported: bool, load_dtype: torch.dtype, bf16: bool, fp16: bool,
        compute: torch.dtype) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    policy = device_policy("auto", "auto")
    assert (policy.device, policy.load_dtype, policy.bf16, policy.fp16, policy.compute_dtype) == \
        ("cuda", load_dtype, bf16, fp16, compute)


def test_a_cpu_without_native_bf16_stays_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    # (a CPU with native bf16 autocasts to it: tests/modeling/test_precision.py)
    monkeypatch.delenv("SFT_CPU_BF16", raising=False)
    monkeypatch.setattr(devices, "cpu_features", lambda: {"avx2", "fma"})
    policy = device_policy("cpu", "auto")
    assert (policy.load_dtype, policy.bf16, policy.fp16, policy.compute_dtype) == (torch.float32, False, False,
                                                                                   torch.float32)


def test_4bit_on_cpu_is_refused_before_anything_is_loaded_or_deleted(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "trainer_state.json").write_text("{}")  # a previous run that --overwrite would delete
    config = build_config(None, tiny_run_overrides(tiny_model_dir, *data, output_dir, load_in_4bit=True))
    with pytest.raises(ConfigError, match="load_in_4bit: QLoRA runs on CUDA GPUs only.*this run is on cpu"):
        train(config, overwrite_output_dir=True)
    assert (output_dir / "trainer_state.json").is_file()


def test_4bit_without_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "bitsandbytes" else real_find_spec(name, *args))
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[cuda\]'"):
        check_4bit_supported("cuda")


def test_4bit_under_fsdp_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: object() if name == "bitsandbytes" else real_find_spec(name, *args))
    check_4bit_supported("cuda")  # bitsandbytes "installed", one GPU: fine
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets for the FSDP preset
    with pytest.raises(ConfigError, match="FSDP.*ddp.yaml"):
        check_4bit_supported("cuda")


def test_qlora_preset_asks_for_4bit_on_cuda() -> None:
    config = build_config(Path(__file__).resolve().parents[1] / "configs" / "tinyllama-cuda-qlora.yaml")
    assert config.model.load_in_4bit and config.training.device == "cuda"


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_chunked_head_loss_under_bf16_autocast(hidden_dtype: torch.dtype) -> None:
    """Mixed precision as on a GPU (here CPU autocast): bf16 or float32 hidden states against the
    float32 head QLoRA's preparation leaves; loss and gradient match the plain computation."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=hidden_dtype, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (37,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy_sum(hidden, weight, targets, chunk_tokens=8)
    ours.backward()
    ours_grad, hidden.grad = hidden.grad.clone(), None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hidden @ weight.T
    reference = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    reference.backward()
    assert ours.dtype == torch.float32 and ours_grad.dtype == hidden_dtype
    torch.testing.assert_close(ours, reference, rtol=2e-3, atol=1e-2)
    torch.testing.assert_close(ours_grad.float(), hidden.grad.float(), rtol=2e-2, atol=2e-2)


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16], ids=["no-autocast", "bf16", "fp16"])
@pytest.mark.parametrize("weight_dtype", DTYPES, ids=lambda d: f"head-{str(d)[6:]}")
@pytest.mark.parametrize("hidden_dtype", DTYPES, ids=lambda d: f"hidden-{str(d)[6:]}")
def test_head_loss_takes_any_mix_of_dtypes(hidden_dtype: torch.dtype, weight_dtype: torch.dtype,
                                           autocast: torch.dtype | None) -> None:
    """Every mix a precision policy can produce (LoRA layers in float32 over a bfloat16 base give
    float32 hidden states against a bfloat16 head): the loss is float32 and near the float64 one,
    and each gradient comes back in its input's dtype."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16).to(hidden_dtype).requires_grad_()
    weight = torch.randn(50, 16).to(weight_dtype).requires_grad_()
    targets = torch.randint(0, 50, (37,))
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        ours = linear_cross_entropy_sum(hidden, weight, targets, chunk_tokens=8)
    ours.backward()
    exact_hidden, exact_weight = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    reference = torch.nn.functional.cross_entropy(exact_hidden @ exact_weight.T, targets, reduction="sum")
    reference.backward()
    low_precision = {hidden_dtype, weight_dtype, autocast} & {torch.bfloat16, torch.float16}
    tolerance = 3e-2 if low_precision else 1e-5
    assert ours.dtype == torch.float32
    assert (hidden.grad.dtype, weight.grad.dtype) == (hidden_dtype, weight_dtype)
    torch.testing.assert_close(ours.double(), reference.detach(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(hidden.grad.double(), exact_hidden.grad, rtol=10 * tolerance, atol=10 * tolerance)
    torch.testing.assert_close(weight.grad.double(), exact_weight.grad, rtol=10 * tolerance, atol=10 * tolerance)


CUDA_POLICIES_ON_CPU = {
    "bf16-weights": DevicePolicy("cpu", torch.bfloat16, bf16=True, fp16=False),
    "fp32-weights-fp16-autocast": DevicePolicy("cpu", torch.float32, bf16=False, fp16=True),
}


@pytest.mark.parametrize("policy", list(CUDA_POLICIES_ON_CPU))
def test_each_cuda_precision_policy_trains_on_cpu(tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, policy: str) -> None:
    """The CUDA policies' weights and autocast, run on the CPU so CI catches dtype bugs without a
    GPU (a bfloat16 base crashed the head loss on every GPU run while autocast-only tests passed):
    a few steps train, the losses are finite and track float32's."""
    import sft.training.stages

    settings = dict(lora_dropout=0.0, max_steps=3)
    train(build_config(None, tiny_run_overrides(tiny_model_dir, *data, tmp_path / "fp32", **settings)))
    monkeypatch.setattr(sft.training.stages, "device_policy", lambda *args: CUDA_POLICIES_ON_CPU[policy])
    run = train(build_config(None, tiny_run_overrides(tiny_model_dir, *data, tmp_path / policy, **settings)))
    assert (run.trainer.args.bf16, run.trainer.args.fp16) == (policy == "bf16-weights", policy != "bf16-weights")
    losses = _losses(tmp_path / policy)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert losses == pytest.approx(_losses(tmp_path / "fp32"), rel=5e-2)
    assert (tmp_path / policy / "adapter_model.safetensors").is_file()


def _fused_groups(run) -> list:
    model = run.trainer.accelerator.unwrap_model(run.trainer.model)
    return list({id(m._fused_group): m._fused_group for m in model.modules() if isinstance(m, FusedLinear)}.values())


@pytest.mark.parametrize("policy", ["float32", *CUDA_POLICIES_ON_CPU])
def test_fused_projections_survive_the_trainer_moving_the_model(tiny_model_dir: Path, data: tuple[Path, Path],
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture, policy: str) -> None:
    """The stages add the fused adapters on the CPU; on a GPU the Trainer then moves the model,
    which copies each weight on its own. Played here by a move that copies every tensor, also in
    the CUDA policies' precision: each q/k/v and gate/up group still runs fused, on its weights
    joined again."""
    from transformers import Trainer

    import sft.training.stages

    if policy in CUDA_POLICIES_ON_CPU:
        monkeypatch.setattr(sft.training.stages, "device_policy", lambda *args: CUDA_POLICIES_ON_CPU[policy])

    def move(self: Trainer, model: torch.nn.Module, device: torch.device) -> None:
        model._apply(lambda t: t.clone())

    monkeypatch.setattr(Trainer, "_move_model_to_device", move)
    run = train(build_config(None, tiny_run_overrides(tiny_model_dir, *data, tmp_path / "run", max_steps=2)))
    groups = _fused_groups(run)
    assert len(groups) == 8 and all(group.fused_calls > 0 for group in groups)
    attention = run.trainer.accelerator.unwrap_model(run.trainer.model).base_model.model.model.layers[0].self_attn
    q, v = attention.q_proj.base_layer.weight, attention.v_proj.base_layer.weight
    assert q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert "fused LoRA groups" not in capsys.readouterr().out


def test_a_run_whose_groups_did_not_fuse_says_so(tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import sft.modeling.fusion

    monkeypatch.setattr(sft.modeling.fusion, "concatenated", lambda weights: None)  # as if they stayed apart
    run = train(build_config(None, tiny_run_overrides(tiny_model_dir, *data, tmp_path / "run", max_steps=1)))
    assert all(group.fused_calls == 0 for group in _fused_groups(run) if len(group.members) > 1)
    assert "Note: 4 of 4 fused LoRA groups (q/k/v, gate/up) ran PEFT's separate layers" in capsys.readouterr().out


def test_bf16_on_cpu_from_the_command_line_trains(tiny_model_dir: Path, data: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    """`--dtype bfloat16 --device cpu`: bfloat16 weights, slow on CPU but correct."""
    run = train(build_config(None, tiny_run_overrides(tiny_model_dir, *data, tmp_path / "bf16", dtype="bfloat16",
                                                      max_steps=2)))
    assert run.trainer.args.bf16
    assert all(math.isfinite(loss) for loss in _losses(tmp_path / "bf16"))


@needs_bitsandbytes
def test_qlora_path_trains_end_to_end_with_bitsandbytes_on_cpu(data: tuple[Path, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The QLoRA code path (NF4 base, QLoRA preparation, LoRA on 4-bit layers, the supervised
    loss, saving, evaluating), run where CI can: bitsandbytes' slow CPU path, with the CUDA-only
    check lifted. Layers need 64 inputs or more for its CPU kernels."""
    from bitsandbytes.nn import Linear4bit

    import sft.training.stages
    from sft.inference.evaluate import evaluate
    from tests.tiny import build_tiny_model_dir, build_tokenizer

    monkeypatch.setattr(sft.training.stages, "check_4bit_supported", lambda device: None)
    model_dir = build_tiny_model_dir(tmp_path / "model", build_tokenizer("chatml"), hidden_size=64)
    config = build_config(None, tiny_run_overrides(model_dir, *data, tmp_path / "qlora", load_in_4bit=True,
                                                   max_steps=6, lora_dropout=0.0, num_generations=1,
                                                   max_new_tokens=4))
    run = train(config)
    base = run.trainer.accelerator.unwrap_model(run.trainer.model).get_base_model()
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    assert base.model.norm.weight.dtype == torch.float32  # QLoRA's preparation
    losses = _losses(tmp_path / "qlora")
    assert len(losses) == 6 and all(loss == loss for loss in losses) and min(losses[3:]) < losses[0]
    # An adapter trained on the 4-bit base loads on the full-precision one (evaluation off the GPU).
    metrics = evaluate(config, tmp_path / "qlora")["metrics"]
    assert math.isfinite(metrics["adapter_val_loss"]) and metrics["answers"] == 1


# --- on a CUDA GPU -------------------------------------------------------------------------------


def _losses(output_dir: Path) -> list[float]:
    return list(logged(output_dir).values())


@needs_cuda
def test_cuda_training_in_the_policy_precision_tracks_float32_on_cpu(tiny_model_dir: Path, data: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    settings = dict(lora_dropout=0.0, max_steps=4)
    train(build_config(None, tiny_run_overrides(tiny_model_dir, *data, tmp_path / "cpu", **settings)))
    run = train(build_config(None, tiny_run_overrides(tiny_model_dir, *data, tmp_path / "cuda", device="cuda",
                                                      **settings)))
    assert torch.backends.cuda.matmul.allow_tf32
    assert run.trainer.args.bf16 == torch.cuda.is_bf16_supported()
    assert run.trainer.args.fp16 == (not torch.cuda.is_bf16_supported())
    assert (tmp_path / "cuda" / "adapter_model.safetensors").is_file()
    assert _losses(tmp_path / "cuda") == pytest.approx(_losses(tmp_path / "cpu"), rel=2e-2)
    groups = _fused_groups(run)  # the Trainer moved the model to the GPU: the groups still ran fused there
    assert len(groups) == 8 and all(group.fused_calls > 0 for group in groups)


@needs_cuda
@needs_bitsandbytes
def test_qlora_trains_and_evaluates_on_cuda(tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    from bitsandbytes.nn import Linear4bit

    from sft.inference.evaluate import evaluate

    config = build_config(None, tiny_run_overrides(tiny_model_dir, *data, tmp_path / "qlora", device="cuda",
                                                   load_in_4bit=True, max_steps=6, num_generations=1,
                                                   max_new_tokens=4))
    run = train(config)
    base = run.trainer.accelerator.unwrap_model(run.trainer.model).get_base_model()
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    losses = _losses(tmp_path / "qlora")
    assert len(losses) == 6 and all(loss == loss for loss in losses)  # finite, no NaN
    assert losses[-1] < losses[0]
    report = evaluate(config, tmp_path / "qlora")
    assert report["metrics"]["adapter_val_loss"] < report["metrics"]["base_val_loss"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_train_what_one_gpu_trains(tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    settings = dict(lora_dropout=0.0, max_steps=4, device="cuda", dtype="float32", seed=7)
    train(build_config(None, tiny_run_overrides(tiny_model_dir, *data, tmp_path / "one", batch_size=4,
                                                gradient_accumulation_steps=1, **settings)))
    flags = tiny_run_overrides(tiny_model_dir, *data, tmp_path / "two", batch_size=2,
                               gradient_accumulation_steps=1, **settings)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "sft.train_sft",
               *as_flags(flags)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)
