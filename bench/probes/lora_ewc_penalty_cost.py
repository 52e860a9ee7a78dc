"""What ``lora_ewc``'s penalty costs a step at SmolLM2-135M's shape (torch path, CPU).

``kernels.ewc.lora_ewc_step``'s work for the 210 adapted projections of SmolLM2-135M (30 layers
x q, k, v, o, gate, up, down; r = 16, fp32 factors and Fisher): the Fisher-weighted
``(s B A)^2`` and its gradients, chunk by chunk. Median of 5 calls.

Run: ``python -m bench.probes.lora_ewc_penalty_cost`` (under a minute).

Seen on the 2-core EPYC, idle, 2 threads, 2026-12-05: 162 ms a call with the default 16 MiB
chunks (4 MiB 168 ms, 1 MiB 222 ms, 256 KiB 337 ms), about 1% of a 12 s LoRA bf16 step at 8 x 512.
"""
from __future__ import annotations

import statistics
import time

import torch

from kernels.ewc import _lora_fisher_torch

BLOCK = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in)


def main() -> None:
    torch.manual_seed(0)
    terms = [(torch.randn(16, i), torch.randn(o, 16), torch.rand(o, i)) for o, i in BLOCK * 30]
    for chunk in (16 << 20, 4 << 20, 1 << 20, 256 << 10):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for A, B, F in terms:
                _lora_fisher_torch(A, B, F, 2.0, 0.5, True, chunk_bytes=chunk)
            times.append(time.perf_counter() - start)
        print(f"chunk {chunk >> 10:>6} KiB: {statistics.median(times) * 1e3:.0f} ms a step", flush=True)


if __name__ == "__main__":
    main()
