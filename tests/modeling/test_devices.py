"""CPU training keeps the memory a step frees for the next step (glibc's allocator)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")

PROGRAM = """
import random, resource, sys, torch
from sft.modeling.devices import keep_freed_cpu_memory
took = keep_freed_cpu_memory() if sys.argv[1] == "keep" else False
usage = lambda: resource.getrusage(resource.RUSAGE_SELF)
random.seed(0)
faults = []
for step in range(8):  # a step's activations: packed rows of a new length each step, all freed at its end
    rows = random.randint(1000, 1800)
    before = usage().ru_minflt
    activations = [torch.ones(rows, width) for _ in range(6) for width in (576, 1536, 3072)]
    del activations
    faults.append(usage().ru_minflt - before)
print(took, sum(faults[4:]), usage().ru_maxrss)
"""


def _run(mode: str, env: dict[str, str] | None = None) -> tuple[bool, int, int]:
    """Whether the setting took, the page faults of steps 5 to 8, the peak resident set (KB)."""
    result = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True,
                            env=env)
    took, faults, peak = result.stdout.split()
    return took == "True", int(faults), int(peak)


def test_later_steps_allocate_their_activations_without_page_faults() -> None:
    """Each step allocates ~340 MB of activations and frees them. With every large tensor mapped
    on its own (glibc's default below its adaptive threshold, set here for a stable reference)
    each step faults ~40,000 pages in again; with the freed memory kept, steps after the first
    two fault almost none (0 to 4,000 in all, as the heap happens to lie), for a peak resident
    set up to ~7 % larger. A user's own allocator
    setting is left to rule."""
    took, kept_faults, kept_peak = _run("keep")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    user_took, mapped_faults, mapped_peak = _run("keep", env)
    assert took and not user_took
    assert mapped_faults > 100_000
    assert kept_faults < mapped_faults / 10
    assert kept_peak < 1.15 * mapped_peak


PHASES_PROGRAM = """
import sys, torch
from sft.modeling.devices import keep_freed_cpu_memory, map_large_cpu_tensors
resident = lambda: int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
kept = keep_freed_cpu_memory()  # as every CPU run starts
took = map_large_cpu_tensors() if sys.argv[1] == "map" else kept
phase, pins = [], []
for _ in range(40):  # a phase's tensors, 320 MB, between small ones that live on
    phase.append(torch.ones(2 << 20))
    pins.append(torch.ones(16))
del phase
print(took, resident())
"""


def test_mapped_large_tensors_leave_nothing_resident_when_a_phase_ends() -> None:
    """Kept for reuse, a phase's freed tensors stay resident (and a next phase of other shapes
    adds its own); with large tensors mapped on their own they go back at once. A user's own
    allocator setting is left to rule."""
    def run(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
        result = subprocess.run([sys.executable, "-c", PHASES_PROGRAM, mode], capture_output=True, text=True,
                                check=True, env=env)
        took, resident = result.stdout.split()
        return took, int(resident)

    (_, kept), (took, mapped) = run("keep"), run("map")
    assert took == "True" and mapped < kept - 250
    user_took, _ = run("map", {**os.environ, "MALLOC_TRIM_THRESHOLD_": str(1 << 30)})
    assert user_took == "False"
