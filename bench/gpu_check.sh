#!/usr/bin/env bash
# GPU check for the fused LoRA kernels (issue 2), ready to run on one CUDA GPU in < 4 minutes:
#   1. the kernel tests, compiled: `interpret`-marked tests run the Triton kernels compiled when
#      CUDA is present (tests/conftest.py only sets TRITON_INTERPRET without CUDA), plus the
#      `gpu`-marked tests (production tile sizes, Triton vs torch path);
#   2. bench/gpu_lora_check.py: fused layer forward+backward vs PEFT's LoRA at Llama-8B shapes
#      (8192 tokens, 4096->4096 and 4096->14336, r=16, bf16), correctness first, then the ratio.
# Usage: bench/gpu_check.sh [--out bench/results/gpu-lora-check.json]   (args go to step 2)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET FORGETLESS_BACKEND
python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA device")'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "== 1/2 kernel tests, compiled on CUDA =="
start=$SECONDS
timeout 170 python -m pytest -q -m "interpret or gpu" tests/
echo "(tests took $((SECONDS - start)) s)"

echo "== 2/2 fused LoRA vs PEFT, forward+backward =="
timeout 60 python -m bench.gpu_lora_check "$@"
