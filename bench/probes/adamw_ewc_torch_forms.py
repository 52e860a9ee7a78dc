"""Which torch form of the AdamW + EWC step to ship as the CPU path of ``kernels.adamw_ewc``.

The step: ``g' = g + lam F (p - p*)`` then AdamW (decoupled weight decay) with ``g'``.  Timed
interleaved in one process on fp32 tensors shaped like a slice of SmolLM2-135M (width 576,
MLP 1536: a few 576x576 / 576x1536 matrices plus norm vectors, about 7 M parameters, all
with an anchor and a Fisher), against the two reference points:

* ``adamw_fused``     torch's ``AdamW(fused=True)`` alone, no EWC: the floor;
* ``today``           ``kernels.ewc.ewc_step`` into ``.grad`` then ``AdamW()`` (on CPU its
                      default is a per-tensor loop): what the trainer runs before this work;
* ``foreach``         the whole step as ``torch._foreach_*`` ops (two param-sized temporaries);
* ``foreach+fused``   ``g'`` into one param-sized temporary list with foreach ops, then
                      ``torch._fused_adamw_`` (one C++ pass for AdamW);
* ``chunked+fused``   ``g'`` per cache-sized chunk into a reused buffer (two ops), then
                      ``torch._fused_adamw_`` on the chunk views: no param-sized temporary
                      (what ``kernels.adamw_ewc`` ships).

Run: ``python -m bench.probes.adamw_ewc_torch_forms`` (under a minute).

Seen while building it (2-core EPYC with AVX512_BF16, shared with other agents: load
average 11, so only the order and rough ratios mean anything), one thread, median over 15
interleaved rounds, 7.1 M parameters:
    adamw_fused 16.3 ms, today 141.7, foreach 240.0, foreach+fused 101.7, chunked+fused 46.2.
(On 2 threads the same run gave 38.9 / 658 / 633 / 404 / 329 ms: the busy second core.)
The fused C++ AdamW pass is what makes the difference; the whole-list foreach forms allocate
and page in parameter-sized temporaries every step, which costs more than their arithmetic.
Cache-sized pieces of g' feeding the fused pass are the fastest form and need no temporary
beyond the 1 MiB buffer; the EWC term then costs about 1.8x the AdamW pass alone here (two
ops of its own over p, p*, F, g), against 8.7x for a separate ``ewc_step`` + torch's default CPU AdamW.
"""
from __future__ import annotations

import statistics
import time

import torch

LAM, LR, WD, BETAS, EPS = 0.5, 1e-3, 0.01, (0.9, 0.999), 1e-8


def _shapes() -> list[tuple[int, ...]]:
    d, ff = 576, 1536
    layer = [(d, d), (d // 3, d), (d // 3, d), (d, d), (ff, d), (ff, d), (d, ff), (d,), (d,)]
    return layer * 2


def _foreach_step(ps, gs, ms, vs, steps, anchors, fishers):
    d = torch._foreach_sub(ps, anchors)
    torch._foreach_mul_(d, fishers)
    torch._foreach_mul_(d, LAM)
    torch._foreach_add_(d, gs)
    torch._foreach_add_(steps, 1)
    step = float(steps[0])
    bc1, bc2 = 1 - BETAS[0] ** step, (1 - BETAS[1] ** step) ** 0.5
    torch._foreach_lerp_(ms, d, 1 - BETAS[0])
    torch._foreach_mul_(vs, BETAS[1])
    torch._foreach_addcmul_(vs, d, d, 1 - BETAS[1])
    torch._foreach_mul_(ps, 1 - LR * WD)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2)
    torch._foreach_add_(denom, EPS)
    torch._foreach_addcdiv_(ps, ms, denom, -LR / bc1)


def _fused(ps, gs, ms, vs, steps):
    torch._fused_adamw_(ps, gs, ms, vs, [], steps, lr=LR, beta1=BETAS[0], beta2=BETAS[1],
                        weight_decay=WD, eps=EPS, amsgrad=False, maximize=False)


def _foreach_fused_step(ps, gs, ms, vs, steps, anchors, fishers):
    d = torch._foreach_sub(ps, anchors)
    torch._foreach_mul_(d, fishers)
    torch._foreach_mul_(d, LAM)
    torch._foreach_add_(d, gs)
    torch._foreach_add_(steps, 1)
    _fused(ps, d, ms, vs, steps)


def main(rounds: int = 15, threads: int = 1) -> None:
    from kernels.adamw_ewc import AdamWEWC
    from kernels.ewc import ewc_step

    # One thread by default: on a shared, busy 2-core machine every parallel region waits for a
    # second thread the OS may not schedule for milliseconds, which swamps forms made of many
    # ops (the 54 ops of the chunked form took 1.2 s on 2 threads, 13 ms on one).
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shapes = _shapes()

    def state():
        ps = [torch.randn(s) for s in shapes]
        return (ps, [torch.randn(s) for s in shapes], [torch.zeros(s) for s in shapes],
                [torch.zeros(s) for s in shapes], [torch.zeros(()) for _ in shapes],
                [p + 0.1 for p in ps], [torch.rand(s) for s in shapes])

    count = sum(torch.Size(s).numel() for s in shapes)
    floor = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in floor:
        p.grad = torch.randn_like(p)
    floor_opt = torch.optim.AdamW(floor, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    today = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    today_anchor, today_fisher = [p.detach() + 0.1 for p in today], [torch.rand(p.shape) for p in today]
    today_opt = torch.optim.AdamW(today, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    shipped = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in (*today, *shipped):
        p.grad = torch.randn_like(p)
    shipped_opt = AdamWEWC(shipped, LAM, {p: p.detach() + 0.1 for p in shipped},
                           {p: torch.rand(p.shape) for p in shipped}, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    fe, ff = state(), state()

    def today_step():
        ewc_step(today, today_anchor, today_fisher, LAM)
        today_opt.step()

    ops = {
        "adamw_fused": floor_opt.step,
        "today": today_step,
        "foreach": lambda: _foreach_step(*fe),
        "foreach+fused": lambda: _foreach_fused_step(*ff),
        "chunked+fused": shipped_opt.step,
    }
    with torch.no_grad():
        for op in ops.values():
            op()
        times: dict[str, list[float]] = {k: [] for k in ops}
        for r in range(rounds):
            for name in (list(ops) if r % 2 == 0 else list(reversed(ops))):
                start = time.perf_counter()
                ops[name]()
                times[name].append(time.perf_counter() - start)
    print(f"{count} fp32 parameters, {torch.get_num_threads()} threads, {rounds} interleaved rounds; medians")
    floor_ms = statistics.median(times["adamw_fused"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:14s} {med * 1e3:7.2f} ms   {med / floor_ms:4.2f}x the fused AdamW alone")


if __name__ == "__main__":
    main()
