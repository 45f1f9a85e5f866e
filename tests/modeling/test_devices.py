"""CPU training keeps the memory a step frees for the next step (glibc's allocator)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")

PROGRAM = """
import resource, sys, torch
from sft.modeling.devices import keep_freed_cpu_memory
took = keep_freed_cpu_memory() if sys.argv[1] == "keep" else False
size = 100 << 18  # 100 MB of float32
for _ in range(3):
    x = torch.ones(size)
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(size)
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, env: dict[str, str] | None = None) -> tuple[bool, int]:
    result = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True,
                            env=env)
    took, faults = result.stdout.split()
    return took == "True", int(faults)


def test_a_freed_tensor_is_allocated_again_without_page_faults() -> None:
    """100 MB freed and allocated again: 25,600 page faults (one per 4 KB page) with glibc's default
    settings, almost none once the freed memory is kept."""
    took, kept_faults = _faults("keep")
    _, default_faults = _faults("default")
    assert took
    assert default_faults > 20_000
    assert kept_faults < 1_000


def test_the_users_allocator_settings_are_left_to_rule() -> None:
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": str(128 << 10)}
    took, faults = _faults("keep", env)
    assert not took
    assert faults > 20_000
