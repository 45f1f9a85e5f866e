"""sft: LoRA supervised fine-tuning for small chat models (see README.md)."""

import logging

# bitsandbytes, when installed (the [cuda] and dev extras), warns on import on CPUs with AVX-512
# BF16 that an optional CPU kernel package is missing; sft runs 4-bit on CUDA only, so it is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
