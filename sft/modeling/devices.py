"""Which device to train on, and in which precision.

The policy, from what each backend does well: float32 on CPU (bfloat16 matmuls are about 100x
slower on common CPUs) and on MPS (float16 there gives NaN losses); on CUDA, bfloat16 where the
GPU supports it, otherwise float32 weights with float16 mixed precision and loss scaling.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from dataclasses import dataclass

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
    if requested_dtype == "auto":
        if kind == "cuda":
            requested_dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            requested_dtype = "float32"
    if requested_dtype == "float16" and kind != "cuda":
        raise ConfigError(f"dtype: float16 runs on CUDA only here (on MPS it gives NaN losses, on the CPU it is "
                          f"slow); use --dtype auto or float32 on {kind}")
    if requested_dtype == "bfloat16":
        return DevicePolicy(device, torch.bfloat16, bf16=True, fp16=False)
    if requested_dtype == "float16":
        # float16 weights cannot be trained stably; keep float32 weights and autocast to float16.
        return DevicePolicy(device, torch.float32, bf16=False, fp16=True)
    return DevicePolicy(device, torch.float32, bf16=False, fp16=False)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
_ALLOCATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def keep_freed_cpu_memory() -> bool:
    """Have glibc's allocator keep the memory a training step frees for the next step's tensors.

    By default glibc serves each large allocation with a fresh mapping of its own and returns
    heap memory above a few tens of MB to the system when it is freed: every CPU training step
    then pays for its activations' pages again (about 150,000 page faults per SmolLM2 step at
    batch 8). With allocations up to 512 MB served from the heap and up to 1 GB of freed heap
    kept, a step reuses the previous step's pages: about 2 % faster, and the peak resident set
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
