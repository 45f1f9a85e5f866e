"""Which device to train on, and in which precision.

The policy, from what each backend does well: on CUDA, bfloat16 where the GPU supports it,
otherwise float32 weights with float16 mixed precision and loss scaling; float32 on MPS (float16
there gives NaN losses). On a CPU it is decided by what the CPU has: bfloat16 matmuls are far
slower than float32 without bf16 instructions (each product is converted) and faster with them
(measured: docs/performance.md, CPU precision). Where the CPU has native bf16 dot products (x86's
AVX512-BF16 or AMX-BF16, Arm's BF16 extension), float32 weights train under bf16 autocast; where
it reports none, float32; where its features cannot be read, a short matmul probe decides, its
verdict cached per machine. ``--dtype`` overrides all of it.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sft.errors import ConfigError


@dataclass(frozen=True)
class DevicePolicy:
    device: str
    """cuda, mps or cpu."""
    load_dtype: torch.dtype
    """dtype of the frozen base weights."""
    bf16: bool
    """Trainer bf16 autocast."""
    fp16: bool
    """Trainer fp16 autocast with loss scaling."""
    reason: str = ""
    """Why this precision, for the run's first lines."""

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype matmuls run in: the autocast dtype, else the weights'."""
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else self.load_dtype


def resolve_device(requested: str = "auto") -> str:
    """cuda > mps > cpu for ``auto``; an explicit device that is not there is a configuration
    error, raised before any model loads (a preset for a GPU run on a laptop, say)."""
    mps_available = torch.backends.mps.is_available()
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps_available else "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", requested):
        raise ConfigError(f"device: expected auto, cpu, mps, cuda or cuda:N, got {requested!r} (--device)")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {requested} was requested but torch sees no CUDA GPU here; use --device auto "
                          f"(or cpu), or a preset for this machine")
    if requested.startswith("cuda:") and int(requested[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"device: {requested} was requested but torch sees {torch.cuda.device_count()} CUDA GPUs")
    if requested == "mps" and not mps_available:
        raise ConfigError("device: mps was requested but this torch has no MPS backend here (Apple Silicon with "
                          "macOS 12.3 or newer); use --device auto (or cpu)")
    return requested


def device_policy(requested_device: str = "auto", requested_dtype: str = "auto") -> DevicePolicy:
    device = resolve_device(requested_device)
    kind = device.split(":")[0]
    reason = f"--dtype {requested_dtype}"
    cpu_autocast = False
    if requested_dtype == "auto":
        if kind == "cuda":
            requested_dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
            reason = "this GPU " + ("supports bfloat16" if requested_dtype == "bfloat16" else "lacks bfloat16")
        elif kind == "cpu":
            cpu_autocast, reason = cpu_bf16_verdict()
            requested_dtype = "float32"
        else:
            requested_dtype, reason = "float32", "float16 gives NaN losses on MPS"
    if requested_dtype == "float16" and kind != "cuda":
        raise ConfigError(f"dtype: float16 runs on CUDA only here (on MPS it gives NaN losses, on the CPU it is "
                          f"slow); use --dtype auto or float32 on {kind}")
    if requested_dtype == "bfloat16":
        return DevicePolicy(device, torch.bfloat16, bf16=True, fp16=False, reason=reason)
    if requested_dtype == "float16":
        # float16 weights cannot be trained stably; keep float32 weights and autocast to float16.
        return DevicePolicy(device, torch.float32, bf16=False, fp16=True, reason=reason)
    # a CPU with native bf16: float32 weights (the optimizer's updates stay exact), bf16 matmuls
    return DevicePolicy(device, torch.float32, bf16=cpu_autocast, fp16=False, reason=reason)


def describe_precision(policy: DevicePolicy) -> str:
    """One line: the precision the run computes in and why."""
    if policy.load_dtype == torch.float32 and (policy.bf16 or policy.fp16):
        what = f"float32 weights, {'bfloat16' if policy.bf16 else 'float16'} autocast"
    else:
        what = str(policy.load_dtype).removeprefix("torch.")
    return f"Precision: {what} ({policy.reason}; --dtype overrides)"


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""CPU features with native bfloat16 dot products, as /proc/cpuinfo spells them (x86: AVX512-BF16,
AMX-BF16; Arm: the BF16 extension, FEAT_BF16)."""
PROBE_FILE = "cpu_precision.json"
PROBE_SPEEDUP = 1.25
"""bf16 must beat float32 by this much in the probe: autocast converts activations, which the
probe's matmul alone does not pay for."""


def cpu_features() -> set[str] | None:
    """The CPU's feature flags (Linux's /proc/cpuinfo, macOS's sysctl hw.optional.arm.FEAT_*),
    or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = None
    if text:
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return set(value.split())
        return None
    if sys.platform == "darwin":
        import subprocess

        try:
            answer = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                    timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return {"bf16"} if answer == "1" else set() if answer == "0" else None
    return None


CPU_BF16_VARIABLE = "SFT_CPU_BF16"
"""1 or 0: bf16 autocast on the CPU or not, whatever the CPU reports (a container that hides the
CPU's flags, or a benchmark of both precisions)."""


def cpu_bf16_verdict() -> tuple[bool, str]:
    """Whether CPU training should autocast to bfloat16, and why (for the run's first lines)."""
    forced = os.environ.get(CPU_BF16_VARIABLE, "").strip()
    if forced in ("0", "1"):
        return forced == "1", f"{CPU_BF16_VARIABLE}={forced}"
    if forced:
        raise ConfigError(f"{CPU_BF16_VARIABLE}: expected 1 or 0, got {forced!r}")
    features = cpu_features()
    if features is not None:
        native = sorted(features.intersection(BF16_CPU_FLAGS))
        if native:
            return True, f"this CPU has native bfloat16 dot products ({', '.join(native)})"
        return False, ("this CPU has no native bfloat16 dot products (no avx512_bf16, amx_bf16 or Arm bf16 "
                       "flag), so bfloat16 matmuls would run slower than float32")
    return probe_bf16_speedup()


def probe_bf16_speedup(cache_dir: Path | None = None) -> tuple[bool, str]:
    """Time a float32 and a bfloat16 matmul of an MLP's shape on this CPU, once per machine and torch
    (the verdict is cached in the sft cache)."""
    cache_dir = cache_dir or Path(os.environ.get("SFT_CACHE") or Path.home() / ".cache" / "sft")
    key = f"{platform.machine()} {platform.processor() or platform.node()} torch {torch.__version__}"
    path = cache_dir / PROBE_FILE
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(cached, dict) and cached.get("key") == key and isinstance(cached.get("speedup"), float):
            speedup = cached["speedup"]
            return speedup >= PROBE_SPEEDUP, f"bfloat16 matmuls measured {speedup:.2f}x float32 here (cached probe)"
    except (OSError, ValueError):
        pass
    speedup = _matmul_seconds(torch.float32) / _matmul_seconds(torch.bfloat16)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "speedup": speedup}) + "\n", encoding="utf-8")
    except OSError:
        pass  # an unwritable cache only means probing again next time
    return speedup >= PROBE_SPEEDUP, f"bfloat16 matmuls measured {speedup:.2f}x float32 here (probe)"


def _matmul_seconds(dtype: torch.dtype, rows: int = 256, width: int = 576, hidden: int = 1536) -> float:
    """The best of a few timings of one [rows, width] x [width, hidden] matmul in ``dtype``."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, width, generator=generator).to(dtype)
    b = torch.randn(width, hidden, generator=generator).to(dtype)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, time.perf_counter() - start)
    return best


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
_ALLOCATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def keep_freed_cpu_memory() -> bool:
    """Have glibc's allocator keep the memory a training step frees for the next step's tensors.

    By default glibc serves each large allocation with a fresh mapping of its own and returns
    heap memory above a few tens of MB to the system when it is freed: every CPU training step
    then pays for its activations' pages again (page faults measured in docs/performance.md,
    Memory). With allocations up to 512 MB served from the heap and up to 1 GB of freed heap
    kept, a step reuses the previous step's pages: faster (same section), and the peak resident set
    is no larger (the allocator keeps what the step needs at its peak anyway, and fragments less).

    Returns whether the setting took: not off glibc (macOS, musl), and not where the user tuned
    the allocator through its environment variables, which are left to rule."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _ALLOCATOR_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # older glibc releases refuse mmap thresholds above 32 MB: take that where 512 MB is refused
    if not (mallopt(_M_MMAP_THRESHOLD, 512 << 20) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


_MADV_PAGEOUT = 21  # Linux 5.4+ (asm-generic/mman-common.h)


def release_mapped_pages(tensors: list[torch.Tensor]) -> int:
    """Hand back to the system the resident pages of CPU tensors that lie in a memory-mapped file
    and are no longer needed: a safetensors checkpoint in the dtype it is loaded in is mapped, not
    copied, so weights copied elsewhere (fused into one tensor, say) would otherwise stay resident
    beside their copy for the rest of the run. ``madvise(MADV_PAGEOUT)`` loses no data: a page read
    again is read back from its file. Returns the bytes advised; 0 off Linux, on kernels older
    than 5.4, and for tensors in ordinary (heap) memory, which is left to the allocator."""
    tensors = [tensor for tensor in tensors if tensor.device.type == "cpu" and tensor.numel()]
    if not sys.platform.startswith("linux") or not tensors:
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    mapped_files = []  # (start, end) of mappings of a file
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            mapped_files.append((start, end))
    page = os.sysconf("SC_PAGE_SIZE")
    released = 0
    for tensor in tensors:
        first, last = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
        if not any(start <= first and last <= end for start, end in mapped_files):
            continue
        start, end = -(-first // page) * page, last // page * page  # whole pages only
        if end > start and madvise(start, end - start, _MADV_PAGEOUT) == 0:
            released += end - start
    return released
