"""benchmarks/throughput.py --profile: the step profiler counts what a step launches and where the
host waits, from the profiler's own events."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _throughput_module():
    spec = importlib.util.spec_from_file_location("throughput_under_test", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reads_back(x: torch.Tensor) -> float:
    return float((x * 2).sum().item())  # one aten::_local_scalar_dense


def test_the_profiler_counts_the_host_waits_per_step_with_their_python_lines() -> None:
    throughput = _throughput_module()
    profiler = throughput.StepProfiler("cpu")
    x = torch.randn(64, 64)
    profiler.start()
    for _ in range(2):  # two "steps", three reads each
        for _ in range(3):
            _reads_back(x)
        x = x @ x.T / 64
    profiler.stop([0.5, 0.25])
    report = profiler.report()
    lines = report.splitlines()
    assert lines[0] == "steps profiled: 2, wall per step 0.3750 s (under the profiler)"
    assert "aten::_local_scalar_dense per step: 3.0" in lines
    waits = [line for line in lines if "_reads_back" in line]
    assert len(waits) == 1 and waits[0].split()[0] == "3.0"  # per step, attributed to the line that read
    assert "host time by operator:" in report and "aten::mm" in report
    assert "device time by operator:" not in report  # no device kernels on the CPU
