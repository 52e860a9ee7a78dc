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
"""
from __future__ import annotations

import resource
import statistics
import time

import torch

from kernels.linear_cross_entropy import linear_cross_entropy

SIZES_MIB = (32, 64, 128, 256)


def main() -> None:
    torch.manual_seed(0)
    h = (torch.randn(4096, 576) * 0.1).requires_grad_()
    w = (torch.randn(49152, 576) * 0.02).requires_grad_()
    labels = torch.randint(0, 49152, (4096,))
    times: dict[int, list[float]] = {s: [] for s in SIZES_MIB}
    faults: dict[int, list[int]] = {s: [] for s in SIZES_MIB}
    for _ in range(5):
        for mib in SIZES_MIB:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = linear_cross_entropy(h, w, labels, chunk_bytes=mib << 20)
            loss.backward()
            times[mib].append(time.perf_counter() - start)
            faults[mib].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            h.grad = w.grad = None
    for mib in SIZES_MIB:
        print(f"chunk {mib:>3} MiB: {statistics.median(times[mib]):.2f} s a call, "
              f"{statistics.median(faults[mib]) / 1e6:.2f} M minor page faults", flush=True)


if __name__ == "__main__":
    main()
