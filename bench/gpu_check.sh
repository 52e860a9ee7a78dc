#!/usr/bin/env bash
# GPU check of the kernels and the trainer on one CUDA GPU:
#   1. the kernel tests, compiled: `interpret`-marked tests run the Triton kernels compiled when
#      CUDA is present (tests/conftest.py only sets TRITON_INTERPRET without CUDA), plus the
#      `gpu`-marked tests (production tile sizes, Triton vs torch path);
#   2. bench/gpu_lora_check.py: fused layer forward+backward vs PEFT's LoRA at Llama-8B shapes
#      (8192 tokens, 4096->4096 and 4096->14336, r=16, bf16), correctness first, then the ratio;
#   3. issues 13 and 23's e2e on CUDA: `python -m bench e2e --shape smollm2-135m --device cuda`
#      (bf16, batch 8 x 512, LoRA and full; every side in its own process, 2 rounds in alternating
#      order, 2 warm-up + 8 timed steps): ours against HF Trainer (+ PEFT), TRL SFTTrainer (+ PEFT)
#      with its default gradient checkpointing (trl_sft) and without (trl_sft_fast), and, when
#      `pip install liger-kernel` works here, HF Trainer and TRL with use_liger_kernel=True
#      (*_liger; HF: Liger's fused linear cross-entropy among its kernels; TRL 1.16: Liger's layer
#      kernels beside TRL's own chunked LM-head loss, which takes the fused cross-entropy's place);
#      ewc / lora_ewc beside them. E2E_ROUNDS / E2E_STEPS / E2E_ONLY override rounds, timed steps
#      and the sides (e.g. E2E_ONLY=ours,trl_sft_liger);
#   4. bench/gpu_head_optim_check.py: the Triton linear cross-entropy against full logits (and
#      Liger's) at SmolLM2's and Llama-3-8B's heads, and AdamW+EWC against fused AdamW plus the
#      penalty, correctness first; a kernel not in this checkout is skipped with a line.
# Each step has its own timeout (170 + 60 + 540 + 120 s at most; run `STEPS=3` alone on a machine with a 600 s limit per command); STEPS picks some, e.g.
# `STEPS="3 4" bench/gpu_check.sh`.
# Usage: bench/gpu_check.sh [--out bench/results/gpu-lora-check.json]   (args go to step 2)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET FORGETLESS_BACKEND
STEPS="${STEPS:-1 2 3 4}"
python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA device")'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

want() { [[ " $STEPS " == *" $1 "* ]]; }

if want 1; then
  echo "== 1/4 kernel tests, compiled on CUDA =="
  start=$SECONDS
  timeout 170 python -m pytest -q -m "interpret or gpu" tests/
  echo "(tests took $((SECONDS - start)) s)"
fi

if want 2; then
  echo "== 2/4 fused LoRA vs PEFT, forward+backward =="
  timeout 60 python -m bench.gpu_lora_check "$@"
fi

if want 3 || want 4; then
  # Liger-Kernel is an optional peer: the machine may have no route to PyPI.
  if ! python -c 'import liger_kernel' 2>/dev/null; then
    timeout 60 pip install -q liger-kernel >/dev/null 2>&1 \
      && echo "(liger-kernel installed: it runs as a peer)" \
      || echo "(liger-kernel did not install: no Liger peer)"
  fi
fi

if want 3; then
  echo "== 3/4 e2e at SmolLM2-135M's shape, bf16, 8 x 512, one process per side and round =="
  start=$SECONDS
  e2e_args=(--rounds "${E2E_ROUNDS:-2}" --steps "${E2E_STEPS:-8}")
  if [[ -n "${E2E_ONLY:-}" ]]; then e2e_args+=(--only "$E2E_ONLY"); fi
  timeout 540 python -m bench e2e --shape smollm2-135m --device cuda --case lora-bf16 --case full-bf16 \
    "${e2e_args[@]}" --no-plots --results-dir bench/results/gpu || echo "(e2e stopped: exit $?)"
  echo "(e2e took $((SECONDS - start)) s)"
fi

if want 4; then
  echo "== 4/4 linear cross-entropy and AdamW+EWC kernels =="
  timeout 120 python -m bench.gpu_head_optim_check --out bench/results/gpu-head-optim-check.json
fi
