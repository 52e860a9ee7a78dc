"""oneDNN-packed bf16 linear against torch.mm at SmolLM2-135M's decoding GEMM shapes, one thread.

For each shape ``[in -> out]`` and row count, CPU microseconds per call (``time.process_time``) of
torch.mm in fp32 and bf16 and of ``torch.ops.mkldnn._linear_pointwise`` on a weight packed once by
``_reorder_linear_weight`` (what eval.fast_decode uses for bf16 models on CPUs with native bf16),
the sides interleaved round by round in this one process, medians over ``--rounds``; and whether the
packed products equal torch.mm's bit for bit.

Run: ``OMP_NUM_THREADS=1 taskset -c 1 python -m bench.probes.packed_bf16_gemm [--rounds 5]``
(only meaningful on a CPU with native bf16, e.g. AVX512_BF16).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

# q/k/v stacked, gate/up stacked, gate, down, the tied LM head
SHAPES = ((576, 960), (576, 3072), (576, 1536), (1536, 576), (576, 49152))


def _us(fn, calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probes.packed_bf16_gemm")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    for k, n in SHAPES:
        w32 = torch.randn(n, k, generator=generator) * 0.05
        w16 = w32.bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w16, None)
        for rows in (1, 16):
            x32 = torch.randn(rows, k, generator=generator)
            x16 = x32.bfloat16()
            sides = {"fp32 mm": lambda: torch.mm(x32, w32.t()), "bf16 mm": lambda: torch.mm(x16, w16.t()),
                     "bf16 packed": lambda: torch.ops.mkldnn._linear_pointwise(x16, packed, None, "none", [], "")}
            times = {name: [] for name in sides}
            for r in range(args.rounds):
                for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
                    sides[name]()  # warm
                    times[name].append(_us(sides[name], args.calls))
            same = all(torch.equal(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                                   torch.mm(x, w16.t()))
                       for x in (torch.randn(m, k, generator=generator).bfloat16() for m in (1, 2, 3, 7, 16, 32)))
            med = {name: statistics.median(v) for name, v in times.items()}
            print(f"[{k} -> {n}] rows {rows:2d}: " + ", ".join(f"{name} {us:8.1f} us" for name, us in med.items())
                  + f"; packed / bf16 mm {med['bf16 packed'] / med['bf16 mm']:.2f}x; packed == mm (1-32 rows): {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
