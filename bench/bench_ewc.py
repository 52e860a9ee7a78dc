"""EWC: the fused step against the penalty built with autograd, over all parameters of the
4-layer, 512-wide Llama (issue 3's target: >= 4x faster).

Kernel ``ewc_step``, mode ``full`` (penalty value and its gradient added into ``p.grad``):

* ``ours``           ``kernels.ewc.ewc_step(params, anchors, fishers, lam)``: one pass per
  dtype group (Triton pointer table on CUDA, ``torch._foreach_*`` on CPU);
* ``autograd``       ``lam/2 * sum_i (F_i * (p_i - p*_i)^2).sum()`` then ``.backward()``: what
  Avalanche and most EWC code do (Avalanche builds the same sum in a Python loop);
* ``inplace_loop``   a careful hand-written loop with no graph: per parameter
  ``d = p - p*; g += lam * F * d; penalty += (F * d * d).sum()``.
"""
from __future__ import annotations

import torch

from bench.bench_lora import StepShape, build_llama
from bench.harness import BenchContext, Provider, Target, measure

KERNEL = "ewc_step"
LAMBDA = 100.0

TARGETS = [
    Target("issue 3: fused EWC step >= 4x faster than the autograd penalty", KERNEL, "time", "autograd",
           max_ratio=0.25),
]


def ewc_state(ctx: BenchContext) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], int]:
    """Parameters (moved a little off their anchors), anchors and positive Fishers."""
    s = (StepShape(layers=2, hidden=64, intermediate=160, heads=4, vocab=512, batch=1, seq=8, r=0) if ctx.quick
         else StepShape(layers=4, hidden=512, intermediate=1376, heads=8, vocab=4096, batch=1, seq=8, r=0))
    model = build_llama(s, ctx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(6)
    anchors = [(p.detach().cpu() + 0.01 * torch.randn(p.shape, generator=gen)).to(ctx.device) for p in params]
    fishers = [torch.rand(p.shape, generator=gen).to(ctx.device) for p in params]
    return params, anchors, fishers, sum(p.numel() for p in params)


def providers(params, anchors, fishers) -> list[Provider]:
    from kernels.ewc import ewc_step

    def zero_grads() -> None:
        # Every provider adds into an existing gradient, as after the task loss's backward.
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()

    def autograd_penalty(_s) -> torch.Tensor:
        penalty = sum((f * (p - a).square()).sum() for p, a, f in zip(params, anchors, fishers, strict=True))
        penalty = penalty * (LAMBDA / 2)
        penalty.backward()
        return penalty.detach()

    def inplace_loop(_s) -> torch.Tensor:
        total = torch.zeros((), device=params[0].device)
        with torch.no_grad():
            for p, a, f in zip(params, anchors, fishers, strict=True):
                d = p - a
                fd = f * d
                p.grad.add_(fd, alpha=LAMBDA)
                total += (fd * d).sum()
        return total * (LAMBDA / 2)

    return [
        Provider("ours", run=lambda _s: ewc_step(params, anchors, fishers, LAMBDA), setup=zero_grads),
        Provider("autograd", run=autograd_penalty, setup=zero_grads),
        Provider("inplace_loop", run=inplace_loop, setup=zero_grads),
    ]


def run(ctx: BenchContext) -> None:
    try:
        import kernels.ewc  # noqa: F401
    except Exception as exc:
        ctx.note(f"ewc: ours (kernels.ewc) not importable, skipped ({exc})")
        return
    params, anchors, fishers, count = ewc_state(ctx)
    config = f"llama {'L=2 d=64' if ctx.quick else 'L=4 d=512 ff=1376 V=4096'} params={count} fp32 lam={LAMBDA:g}"
    print(f"  {KERNEL} ({config})", flush=True)
    measure(ctx, KERNEL, "full", "params", count, config, providers(params, anchors, fishers), memory=True)
