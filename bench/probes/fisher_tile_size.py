"""How big the torch path's per-sample tile should be (``kernels.fisher.TORCH_TILE_BYTES``).

A side measurement for the constant's comment and docs/benchmarks.md: the in-place,
Fisher-only form that ``estimate_fisher`` calls (persistent accumulator, no weight gradient),
at several tile sizes, against the plain weight gradient ``dyᵀx`` of the same x and dy
(written into a preallocated output), on the 4-layer, 512-wide Llama's layer shapes with the
sequence lengths of the Fisher benchmarks. Interleaved rounds; the minimum of each, since the
question is which tile is fastest, not how noisy the machine is.

Run: ``python -m bench.probes.fisher_tile_size`` (about a minute on 2 cores).
"""
from __future__ import annotations

import time

import torch

import kernels.fisher as fisher_mod
from kernels import backend

TILES = (256 << 10, 1 << 20, 2 << 20, 4 << 20, 16 << 20)
SHAPES = [  # (N, T, in, out)
    (8, 48, 512, 1376), (8, 48, 1376, 512), (8, 48, 512, 4096), (8, 48, 512, 512),
    (8, 64, 512, 1376), (8, 256, 512, 1376),
]


def main(rounds: int = 21) -> None:
    saved = fisher_mod.TORCH_TILE_BYTES
    print(f"ratio to the plain weight gradient (min of {rounds} rounds); columns: tile size")
    print(f"{'N x T, in->out':<22}{'wgrad ms':>9}" + "".join(f"{t >> 10:>9}K" for t in TILES))
    try:
        with backend.forced("torch"):
            for n, t, i, o in SHAPES:
                gen = torch.Generator().manual_seed(0)
                x, dy = torch.randn(n, t, i, generator=gen), torch.randn(n, t, o, generator=gen)
                x2, dy2 = x.reshape(-1, i), dy.reshape(-1, o)
                fisher, wgrad = torch.zeros(o, i), torch.empty(o, i)
                ops = {"wgrad": lambda x2=x2, dy2=dy2, wgrad=wgrad: torch.mm(dy2.t(), x2, out=wgrad)}
                for tile in TILES:
                    def run(tile=tile, x=x, dy=dy, fisher=fisher):  # bound now: ops run in this iteration only
                        fisher_mod.TORCH_TILE_BYTES = tile
                        fisher_mod.linear_grad_and_fisher_(x, dy, None, fisher)
                    ops[tile] = run
                best = {k: float("inf") for k in ops}
                for r in range(rounds):
                    for k in (list(ops) if r % 2 == 0 else list(reversed(ops))):
                        start = time.perf_counter()
                        ops[k]()
                        best[k] = min(best[k], time.perf_counter() - start)
                print(f"{f'{n} x {t}, {i}->{o}':<22}{best['wgrad'] * 1e3:>9.2f}"
                      + "".join(f"{best[tile] / best['wgrad']:>10.2f}" for tile in TILES))
    finally:
        fisher_mod.TORCH_TILE_BYTES = saved


if __name__ == "__main__":
    main()
