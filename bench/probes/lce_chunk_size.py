"""Which chunk size the torch path of ``kernels.linear_cross_entropy`` should default to.

SmolLM2-135M's head at the bench's batch: hidden ``[4096, 576]`` (8 x 512 tokens), tied weight
``[49152, 576]``, under CPU bf16 autocast; loss and backward (the torch path computes the
gradients in its forward). For each ``chunk_bytes``: median time of 5 interleaved calls and the
minor page faults of a call. Each chunk runs three GEMMs against the whole weight, and the
library's scratch for them is fresh memory every call, so fewer, taller chunks fault less.

Run: ``python -m bench.probes.lce_chunk_size`` (about a minute on this 2-core CPU).

Seen on the 2-core EPYC, idle, 2 threads (2026-12-05, two runs): 32 MiB 4.40 / 4.63 s and
1.41 M faults, 64 MiB 3.18 / 3.29 s and 0.75 M, 128 MiB 2.64 / 2.72 s and 0.43 M, 256 MiB
2.58 / 2.67 s and 0.30 M. 128 MiB (341 rows of 49k logits in bf16 + fp32) takes most of the
gain for half the memory of 256.

``--fresh`` adds a row with 64 MiB chunks and a fresh ``[rows, V]`` tensor per chunk instead of
the reused buffers (``_Scratch``), what the code did before: seen 3.63 s a call and 1.13 M faults
against 3.22 s and 0.76 M reused (medians of 6, same machine and day).
"""
from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

import kernels.linear_cross_entropy as lce
from kernels.linear_cross_entropy import linear_cross_entropy

SIZES_MIB = (32, 64, 128, 256)


def _fresh_take(self, name, m, dtype):
    return torch.empty((m, self.vocab), dtype=dtype, device=self.device)


def main() -> None:
    torch.manual_seed(0)
    h = (torch.randn(4096, 576) * 0.1).requires_grad_()
    w = (torch.randn(49152, 576) * 0.02).requires_grad_()
    labels = torch.randint(0, 49152, (4096,))
    rows = [(mib, False) for mib in SIZES_MIB] + ([(64, True)] if "--fresh" in sys.argv else [])
    times: dict[tuple, list[float]] = {r: [] for r in rows}
    faults: dict[tuple, list[int]] = {r: [] for r in rows}
    reused_take = lce._Scratch.take
    for _ in range(5):
        for mib, fresh in rows:
            lce._Scratch.take = _fresh_take if fresh else reused_take
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = linear_cross_entropy(h, w, labels, chunk_bytes=mib << 20)
            loss.backward()
            times[mib, fresh].append(time.perf_counter() - start)
            faults[mib, fresh].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            h.grad = w.grad = None
    lce._Scratch.take = reused_take
    for mib, fresh in rows:
        print(f"chunk {mib:>3} MiB{', fresh buffers' if fresh else ''}: {statistics.median(times[mib, fresh]):.2f} s "
              f"a call, {statistics.median(faults[mib, fresh]) / 1e6:.2f} M minor page faults", flush=True)


if __name__ == "__main__":
    main()
