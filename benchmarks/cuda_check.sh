#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run: the CUDA tests, then the training benchmark on the
# TinyLlama-1.1B architecture in bfloat16 (sft vs the HF Trainer baseline vs TRL, TRL padding-free
# with FlashAttention where flash-attn is installed). Writes logs and JSON into OUT_DIR.
#   bash benchmarks/cuda_check.sh OUT_DIR
# Needs the project installed with a CUDA build of torch, trl==1.16.0 for the TRL contenders, and
# bitsandbytes ('.[cuda]') for the QLoRA test; the model is built from its config, so no download.
set -uo pipefail
out=${1:?usage: bash benchmarks/cuda_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python - <<'PY' 2>&1 | tee "$out/gpu.txt"
import importlib.util, torch
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
for name in ("flash_attn", "bitsandbytes", "trl"):
    print(name, "installed" if importlib.util.find_spec(name) else "missing")
PY
python -m pytest -q -rs tests/test_cuda.py tests/test_packing.py tests/test_distributed.py 2>&1 | tee "$out/tests.txt"
python benchmarks/throughput.py --models tinyllama-arch --contenders sft,trl,trl_padding_free,hf_trainer \
    --batch-size 8 --tinyllama-steps 10 --warmup 2 --rounds 2 --out "$out/throughput-cuda.json" 2>&1 \
    | tee "$out/throughput.txt"
