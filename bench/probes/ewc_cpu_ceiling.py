"""What limits the fused EWC step on a CPU: torch's op-by-op structure, not memory bandwidth.

A side measurement for docs/benchmarks.md, not part of forgetless (whose code is Python and
Triton): it times, interleaved in one process on the 4-layer, 512-wide Llama of
``bench.bench_ewc`` (16.8 M fp32 parameters),

* ``ours``        ``kernels.ewc.ewc_step`` (torch path: cache-sized chunks, four torch ops each);
* ``autograd``    the penalty built with autograd, as in ``bench.bench_ewc``;
* ``compiled``    the same step through ``torch.compile`` on one flat buffer viewed as rows
                  of 4096, written so that inductor fuses the penalty's row sums and the
                  gradient update into one loop nest (the straightforward form gets two
                  passes over θ, θ*, F and is slower still);
* ``compiled_model`` the same compiled row form over the model's own tensors (each parameter
                  viewed as rows of 1024, the few smaller ones left out): what shipping a
                  compiled CPU path would run, guards and all (one compile, about 10 s);
* ``addcmul``     one torch op reading three of the step's four arrays and writing one
                  (``g.addcmul_(F, θ)``): the bandwidth a single streaming op reaches;
* ``fused_cpp``   the step as one hand-written OpenMP loop (one read of θ, θ*, F, g and one
                  write of g), built with ``torch.utils.cpp_extension.load_inline`` (needs a
                  C++ compiler; about 40 s to build once).

Run: ``python -m bench.probes.ewc_cpu_ceiling`` (about 2 minutes on 2 cores).  Results and
what they mean: docs/benchmarks.md.
"""
from __future__ import annotations

import statistics
import time

import torch

_CPP = r"""
#include <torch/extension.h>
double ewc_fused(torch::Tensor p, torch::Tensor a, torch::Tensor f, torch::Tensor g, double lam) {
  const float* P = p.data_ptr<float>(); const float* A = a.data_ptr<float>();
  const float* F = f.data_ptr<float>(); float* G = g.data_ptr<float>();
  const int64_t n = p.numel(); const float l = (float)lam; double total = 0;
  #pragma omp parallel for reduction(+:total) schedule(static)
  for (int64_t c = 0; c < n; c += 4096) {
    const int64_t e = c + 4096 < n ? c + 4096 : n; float s = 0;
    #pragma omp simd reduction(+:s)
    for (int64_t i = c; i < e; i++) { float d = P[i] - A[i]; float fd = F[i] * d; G[i] += l * fd; s += fd * d; }
    total += s;
  }
  return total * lam / 2;
}
"""


def _rows_step(ps, as_, fs, gs, lam: float):
    # Each tensor viewed as (rows, width). The update uses the row sums (times 0), which makes
    # inductor emit one outer loop per row with the reduction and the update inside
    # (softmax-like) instead of two passes over θ, θ*, F.
    total = ps[0].new_zeros(())
    for p, a, f, g in zip(ps, as_, fs, gs, strict=True):
        d = p - a
        fd = f * d
        rows = (fd * d).sum(-1, keepdim=True)
        g.add_(fd * lam + rows * 0.0)
        total = total + rows.sum()
    return total * (lam / 2)


def _row_views(params, anchors, fishers, width: int = 1024):
    out = ([], [], [], [])
    for p, a, f in zip(params, anchors, fishers, strict=True):
        whole = p.numel() // width * width
        if whole:
            for dst, t in zip(out, (p.detach(), a, f, p.grad), strict=True):
                dst.append(t.reshape(-1)[:whole].view(-1, width))
    return out


def main(rounds: int = 21) -> None:
    from torch.utils.cpp_extension import load_inline

    from bench.bench_ewc import LAMBDA, ewc_state, providers
    from kernels.ewc import ewc_step

    class _Ctx:
        quick, device = False, torch.device("cpu")

    params, anchors, fishers, count = ewc_state(_Ctx)
    for p in params:
        p.grad = torch.zeros_like(p)
    by_name = {p.name: p.run for p in providers(params, anchors, fishers)}
    whole = count // 4096 * 4096  # the compiled form needs whole rows (drops < 4096 elements)
    flat = [torch.cat([t.detach().reshape(-1) for t in ts])[:whole].view(-1, 4096)
            for ts in (params, anchors, fishers)]
    flat_grad = torch.zeros_like(flat[0])
    compiled = torch.compile(_rows_step, dynamic=False)  # two instances: each keeps its own graph
    compiled_model = torch.compile(_rows_step, dynamic=False)
    ext = load_inline("forgetless_ewc_probe", cpp_sources=_CPP, functions=["ewc_fused"],
                      extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    with torch.no_grad():
        for p in params:
            p.grad.zero_()
        want = float(ewc_step(params, anchors, fishers, LAMBDA))
        got = sum(ext.ewc_fused(p.detach(), a, f, p.grad, LAMBDA) for p, a, f in zip(params, anchors, fishers, strict=True))
        assert abs(got - want) <= 1e-4 * abs(want), (got, want)  # the probe computes the same step

    ops = {
        "ours": lambda: ewc_step(params, anchors, fishers, LAMBDA),
        "autograd": lambda: by_name["autograd"](None),
        "compiled": lambda: compiled(*([t] for t in (*flat, flat_grad)), LAMBDA),
        "compiled_model": lambda: compiled_model(*_row_views(params, anchors, fishers), LAMBDA),
        "addcmul": lambda: flat_grad.addcmul_(flat[2], flat[0], value=LAMBDA),
        "fused_cpp": lambda: sum(ext.ewc_fused(p.detach(), a, f, p.grad, LAMBDA)
                                 for p, a, f in zip(params, anchors, fishers, strict=True)),
    }
    for op in ops.values():  # warm-up (and the compile)
        op()
    times: dict[str, list[float]] = {k: [] for k in ops}
    for r in range(rounds):
        order = list(ops) if r % 2 == 0 else list(reversed(ops))
        for name in order:
            start = time.perf_counter()
            ops[name]()
            times[name].append(time.perf_counter() - start)
    step_bytes = 5 * 4 * count  # read θ, θ*, F, g; write g
    print(f"{count} fp32 parameters; {rounds} interleaved rounds; medians")
    auto = statistics.median(times["autograd"])
    for name, ts in times.items():
        med = statistics.median(ts)
        moved = (4 if name == "addcmul" else 5) * 4 * count  # bytes the op must move at least
        print(f"  {name:14s} {med * 1e3:7.2f} ms  {moved / med / 1e9:5.1f} GB/s  autograd/this {auto / med:4.2f}x"
              + ("  (4 arrays, not the step)" if name == "addcmul" else ""))
    print(f"  the step moves {step_bytes / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
