"""llama.cpp's k-quants for `sft export --precision q4_k_m|q5_k_m|q6_k`, written by llama.cpp's
own quantizer through llama-cpp-python where it is installed (it is not a dependency: it compiles
llama.cpp from source, about 20 minutes).

A k-quant file mixes types by tensor (q4_k_m keeps the output layer and half of the attention
value and feed-forward down projections at q6_k) in blocks of 256, choices that belong to
llama.cpp: sft writes the f16 file, as llama.cpp's converter does before ``llama-quantize``, and
hands it to ``llama_model_quantize``. Rows that are not a multiple of 256 long get llama.cpp's
fallback types.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
from pathlib import Path

from sft.config import ConfigError

K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
            "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
"""--precision name -> llama.cpp's file type constant (``enum llama_ftype``)."""

K_QUANT_SOURCE = "f16"


def llama_cpp_module(precision: str):
    """The llama_cpp module, or a one-line error saying how to get it and what needs none."""
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:  # OSError: installed, but its shared library does not load
        reason = "is not installed" if isinstance(exc, ImportError) else f"does not load ({exc})"
        raise ConfigError(f"--precision {precision}: k-quants are written by llama.cpp's quantizer, and "
                          f"llama-cpp-python {reason}: `pip install llama-cpp-python` (it compiles llama.cpp, "
                          f"about 20 minutes), or choose q8_0 or q4_0, which sft writes without it") from None
    return llama_cpp


def quantize(source: Path, out: Path, precision: str) -> list[str]:
    """Rewrite the GGUF file ``source`` as ``out`` in the k-quant ``precision``; return llama.cpp's
    summary warnings (tensors that got fallback types). Its log, which llama-cpp-python prints to
    ``sys.stderr``, is captured: a failure is one error quoting llama.cpp's reason."""
    llama_cpp = llama_cpp_module(precision)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[precision])
    logger = logging.getLogger("llama-cpp-python")  # gates what llama-cpp-python prints of llama.cpp's log
    level, log = logger.level, io.StringIO()
    logger.setLevel(logging.DEBUG)  # its level names are off by one from llama.cpp's: capture everything
    try:
        with contextlib.redirect_stderr(log):
            status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    finally:
        logger.setLevel(level)
    lines = [line.strip() for line in log.getvalue().splitlines() if line.strip()]
    if status != 0:
        reason = next((line for line in reversed(lines) if "fail" in line.lower()), f"status {status}")
        raise ConfigError(f"--precision {precision}: llama.cpp's quantizer failed on {source.name}: {reason}")
    return [line.split("WARNING: ", 1)[-1] for line in lines if "WARNING: " in line]
