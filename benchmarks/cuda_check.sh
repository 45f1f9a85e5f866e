#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run: the CUDA tests (SFT and DPO), then the training benchmark on the
# TinyLlama-1.1B architecture in bfloat16 at batch 8 and 32 (sft vs the plain transformers Trainer
# vs TRL's defaults vs TRL padding-free, on FlashAttention where flash-attn is installed), with peak
# GPU memory and the losses. Writes logs and JSON into OUT_DIR.
#
#   bash benchmarks/cuda_check.sh OUT_DIR              # tests, then batch 8, then batch 32
#   bash benchmarks/cuda_check.sh OUT_DIR b32          # only some of them: tests, b8, b32
#   ROUNDS=1 bash benchmarks/cuda_check.sh OUT_DIR b8  # one round per contender instead of 2
#
# Each benchmark runs 5 contenders x 2 rounds, each in a fresh process that loads the 1.1B model
# and trains 12 steps: expect minutes per batch size. Under a per-command time
# limit, run the stages in separate calls; each prints when it ended.
#
# It runs with no network, on a machine whose Python already has torch: the model is built from
# its config, and the tokenized examples and a tokenizer are read from benchmarks/assets/. Before
# going to such a machine, on one with network and the project installed, run once:
#
#   bash benchmarks/cuda_check.sh --prepare
#
# which writes benchmarks/assets/ (examples and tokenizer, about 5 MB) and downloads into .whl/
# the wheels of the pinned packages that such a Python may lack or hold in another version
# (transformers, peft, trl, datasets and theirs; about 25 MB). Carry both folders; this script
# installs .whl/ into /tmp/site when it is there.
set -uo pipefail
cd "$(dirname "$0")/.."
# The versions the project is tested with (pyproject.toml, and what TRL's benchmark contender needs).
# huggingface-hub 2 talks HTTP through httpx2 (not the httpx 0.x such images hold), hence its
# closure down to the packages those images have; --no-deps installs nothing a list leaves out.
WHEELS=(transformers==5.23.0 peft==0.21.2 accelerate==1.15.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1
        multiprocess==0.70.19 gguf==0.19.0 tokenizers==0.23.3 huggingface-hub==2.4.0 hf-xet==1.8.0
        httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 anyio==4.16.0 h11==0.16.0 idna==3.20)
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
if [ "${1:-}" = "--prepare" ]; then
    py=python; [ -x .venv/bin/python ] && py=.venv/bin/python  # the project's (make install), else the active one
    "$py" benchmarks/throughput.py --export-assets benchmarks/assets || exit 1
    "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}" || exit 1
    exit 0
fi
out=${1:?usage: bash benchmarks/cuda_check.sh OUT_DIR [tests] [b8] [b32]   (or --prepare)}
shift
stages=" ${*:-tests b8 b32} "  # all three by default; name some to split the check over calls
for stage in $stages; do
    case $stage in tests|b8|b32) ;; *) echo "cuda_check.sh: unknown stage '$stage' (stages: tests, b8, b32)" >&2; exit 2;; esac
done
mkdir -p "$out"
SECONDS=0
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
python3 - <<'PY' 2>&1 | tee "$out/gpu.txt"
import importlib.util, torch, transformers, peft
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
print("transformers", transformers.__version__, "peft", peft.__version__)
for name in ("flash_attn", "bitsandbytes", "trl"):
    print(name, "installed" if importlib.util.find_spec(name) else "missing")
PY
if [[ $stages == *" tests "* ]]; then
    # The tests that take a CUDA path (the CPU-only ones run everywhere else): precision policy and fused
    # adapters after the move, packed against separate log-probs, DPO's packed pair log-probs and its
    # first step at ln 2 in the device policy's precision.
    python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_packing.py tests/modeling/test_fused_lora.py \
        tests/training/test_preference.py tests/recipes/test_dpo_recipe.py -k "cuda or gpu" 2>&1 | tee "$out/tests.txt"
    echo "tests done at ${SECONDS} s"
fi
for batch in 8 32; do
    [[ $stages == *" b$batch "* ]] || continue
    python3 benchmarks/throughput.py --assets benchmarks/assets --device cuda --models tinyllama-arch \
        --contenders sft,sft_unfused,trl,trl_padding_free,hf_trainer --batch-size "$batch" --tinyllama-steps 10 --warmup 2 \
        --rounds "${ROUNDS:-2}" --out "$out/throughput-cuda-b$batch.json" 2>&1 | tee "$out/throughput-b$batch.txt"
    echo "batch $batch done at ${SECONDS} s"
done
