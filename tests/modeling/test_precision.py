"""CPU precision by what the CPU has: bf16 autocast with native bf16 dot products, float32 without,
a cached matmul probe where the features cannot be read; --dtype overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sft.modeling import devices
from sft.modeling.devices import describe_precision, device_policy, probe_bf16_speedup
from sft.recipes.sft import main as train_main
from tests.tiny import as_flags, logged, tiny_run_overrides


@pytest.fixture(autouse=True)
def _cpu_precision_unpinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests decide the CPU precision themselves: lift the suite's float32 pin (conftest)."""
    monkeypatch.delenv("SFT_CPU_BF16", raising=False)


@pytest.mark.parametrize(("features", "autocast"), [
    ({"fpu", "avx512f", "avx512_bf16"}, True), ({"fpu", "amx_bf16", "amx_tile"}, True),
    ({"fp", "asimd", "bf16"}, True), ({"fpu", "avx512f", "avx2"}, False),
])
def test_cpu_precision_follows_the_cpus_features(monkeypatch, features, autocast) -> None:
    monkeypatch.setattr(devices, "cpu_features", lambda: features)
    policy = device_policy("cpu", "auto")
    assert policy.load_dtype == torch.float32 and policy.bf16 is autocast and not policy.fp16
    line = describe_precision(policy)
    if autocast:
        assert line.startswith("Precision: float32 weights, bfloat16 autocast (this CPU has native bfloat16")
    else:
        assert line.startswith("Precision: float32 (this CPU has no native bfloat16 dot products")
    # --dtype overrides what the CPU has
    assert device_policy("cpu", "float32").bf16 is False
    assert device_policy("cpu", "bfloat16").load_dtype == torch.bfloat16


def test_the_environment_overrides_what_the_cpu_reports(monkeypatch) -> None:
    monkeypatch.setattr(devices, "cpu_features", lambda: {"avx512_bf16"})
    monkeypatch.setenv("SFT_CPU_BF16", "0")
    assert device_policy("cpu", "auto").bf16 is False
    monkeypatch.setattr(devices, "cpu_features", lambda: {"avx2"})
    monkeypatch.setenv("SFT_CPU_BF16", "1")
    assert describe_precision(device_policy("cpu", "auto")) == (
        "Precision: float32 weights, bfloat16 autocast (SFT_CPU_BF16=1; --dtype overrides)")
    monkeypatch.setenv("SFT_CPU_BF16", "yes")
    with pytest.raises(devices.ConfigError, match="SFT_CPU_BF16: expected 1 or 0"):
        device_policy("cpu", "auto")


def test_unreadable_features_run_the_probe_once_per_machine(monkeypatch, tmp_path: Path) -> None:
    timings = {torch.float32: 3.0, torch.bfloat16: 1.0}
    calls = []

    def seconds(dtype):
        calls.append(dtype)
        return timings[dtype]

    monkeypatch.setattr(devices, "_matmul_seconds", seconds)
    assert probe_bf16_speedup(tmp_path) == (True, "bfloat16 matmuls measured 3.00x float32 here (probe)")
    assert probe_bf16_speedup(tmp_path) == (True, "bfloat16 matmuls measured 3.00x float32 here (cached probe)")
    assert len(calls) == 2  # the second verdict came from the cache
    (tmp_path / devices.PROBE_FILE).write_text("not json")
    timings[torch.bfloat16] = 6.0
    assert probe_bf16_speedup(tmp_path) == (False, "bfloat16 matmuls measured 0.50x float32 here (probe)")


def test_a_run_on_a_bf16_cpu_trains_under_autocast_and_says_so(monkeypatch, tiny_model_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    from tests.tiny import write_prepared_split

    train, val = write_prepared_split(tmp_path / "data")
    losses = {}
    for name, features in (("fp32", {"avx2"}), ("bf16", {"avx512_bf16"})):
        monkeypatch.setattr(devices, "cpu_features", lambda features=features: features)
        out = tmp_path / name
        assert train_main(as_flags(tiny_run_overrides(tiny_model_dir, train, val, out, max_steps=4, eval_steps=4,
                                                      lora_dropout=0.0))) == 0
        printed = capsys.readouterr().out
        assert ("bfloat16 autocast" in printed) is (name == "bf16")
        losses[name] = logged(out, "eval_loss")[4]
    # bf16 matmuls round: close to the float32 run, not equal to it
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=0.05)
    assert losses["bf16"] != losses["fp32"]
