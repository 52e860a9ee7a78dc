"""GPU check of issue 13's two kernels against what a user would otherwise run.

    python -m bench.gpu_head_optim_check [--out FILE.json] [--rounds 10]

1. ``linear_cross_entropy`` (kernels/linear_cross_entropy.py: loss and gradients of
   ``CE(h W^T, labels)`` without the full logits) at SmolLM2-135M's head (8 x 512 tokens, 576 ->
   49,152) and Llama-3-8B's (8 x 1024 tokens, 4096 -> 128,256), bf16 h and W, 10% ignored
   labels, ``reduction="sum"``: ``ours`` against ``torch`` (full logits, upcast, ``F.cross_entropy``)
   and, when it is installed, ``liger`` (Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``).
   Checked first against an fp32 reference built from the same bf16 values (loss, dh, dW within
   a relative norm error of 2e-2: bf16 storage of dh and dW is a few roundings of 2^-8); a
   failing provider is not timed.
2. ``AdamWEWC`` (kernels/adamw_ewc.py: AdamW whose step also applies ``lam F (p - p*)``) over
   fp32 tensors of SmolLM2-135M's and of a 1.2B model's parameter shapes: ``ours`` against
   ``torch_fused+penalty`` (the penalty gradient added with ``_foreach`` ops, then
   ``torch.optim.AdamW(fused=True)``) and ``torch_fused`` (AdamW alone: the floor); the
   parameters after 3 steps checked against the reference first (relative 1e-5); the effective
   bandwidth counts 6 reads and 3 writes of 4 bytes per element.

Times are CUDA-event medians of interleaved rounds; memory is the peak allocated above the start.
Either part is skipped, with a line saying why, when its kernel is not in this checkout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class Result:
    part: str
    shape: str
    provider: str
    ms: float
    peak_mib: float
    note: str = ""


# The check is for CUDA; --device cpu --small only dry-runs its logic (wall-clock times, no memory).
DEVICE = "cuda"
SCALE = 1


def _time(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds + 2):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            if DEVICE == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                torch.cuda.synchronize()
                elapsed = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                fns[name]()
                elapsed = (time.perf_counter() - t0) * 1e3
            if r >= 2:
                samples[name].append(elapsed)
    return {name: statistics.median(s) for name, s in samples.items()}


def _peak_mib(fn: Callable[[], None]) -> float:
    if DEVICE != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- linear CE
LINEAR_CE_SHAPES = {"smollm2-135m 8x512": (4096, 576, 49152), "llama3-8b 8x1024": (8192, 4096, 128256)}


def check_linear_ce(rounds: int) -> list[Result]:
    try:
        from kernels.linear_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        print(f"linear_cross_entropy: skipped, not importable in this checkout ({exc})")
        return []
    liger = None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    except ImportError:
        print("linear_cross_entropy: liger-kernel not installed; no Liger peer")
    results: list[Result] = []
    for name, dims in LINEAR_CE_SHAPES.items():
        results += _linear_ce_case(name, *(d // SCALE for d in dims), linear_cross_entropy, liger, rounds)
    return results


def _linear_ce_case(name: str, tokens: int, hidden: int, vocab: int, ours: Callable, liger, rounds: int) -> list[Result]:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    h = (torch.randn(tokens, hidden, device=DEVICE, generator=gen) * 0.5).bfloat16().requires_grad_(True)
    w = (torch.randn(vocab, hidden, device=DEVICE, generator=gen) * hidden ** -0.5).bfloat16().requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), device=DEVICE, generator=gen)
    labels[torch.rand(tokens, device=DEVICE, generator=gen) < 0.1] = -100
    providers = {"ours": lambda: ours(h, w, labels, reduction="sum"),
                 "torch": lambda: F.cross_entropy((h @ w.t()).float(), labels, ignore_index=-100, reduction="sum")}
    if liger is not None:
        providers["liger"] = lambda: liger(w, h, labels)
    # Reference: fp32 from the same bf16 values.
    h32, w32 = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    ref = F.cross_entropy(h32 @ w32.t(), labels, ignore_index=-100, reduction="sum")
    ref.backward()
    results, timed = [], {}
    for pname, fn in providers.items():
        h.grad = w.grad = None
        try:
            loss = fn()
            loss.backward()
            errors = (_rel(loss.detach(), ref.detach()), _rel(h.grad, h32.grad), _rel(w.grad, w32.grad))
        except Exception as exc:
            print(f"  {name} {pname}: FAILED to run ({type(exc).__name__}: {exc})")
            results.append(Result("linear_ce", name, pname, float("nan"), float("nan"), f"error: {exc}"))
            continue
        ok = max(errors) <= 2e-2
        print(f"  {name} {pname}: loss/dh/dW relative error {errors[0]:.2e} / {errors[1]:.2e} / {errors[2]:.2e} "
              f"{'ok' if ok else 'WRONG: not timed'}")
        if not ok:
            results.append(Result("linear_ce", name, pname, float("nan"), float("nan"), f"errors {errors}"))
            continue

        def step(fn=fn):
            h.grad = w.grad = None
            fn().backward()

        timed[pname] = step
    del ref, h32, w32
    ms = _time(timed, rounds)
    for pname, step in timed.items():
        results.append(Result("linear_ce", name, pname, ms[pname], _peak_mib(step)))
        speed = f", {ms['torch'] / ms[pname]:.2f}x torch" if "torch" in ms else ""
        print(f"  {name} {pname}: {ms[pname]:.3f} ms forward+backward{speed}, peak {results[-1].peak_mib:,.0f} MiB")
    return results


# ----------------------------------------------------------------------------- AdamW + EWC
def _shapes(layers: int, hidden: int, inter: int, kv: int, vocab: int) -> list[tuple[int, ...]]:
    block = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
             (hidden, inter), (hidden,), (hidden,)]
    return [(vocab, hidden), *[s for _ in range(layers) for s in block], (hidden,)]


ADAMW_SHAPES = {"smollm2-135m": _shapes(30, 576, 1536, 192, 49152),
                "1.2B (16 x 2048, ff 8192, V 128256)": _shapes(16, 2048, 8192, 512, 128256)}


def check_adamw_ewc(rounds: int) -> list[Result]:
    try:
        from kernels.adamw_ewc import AdamWEWC
    except ImportError as exc:
        print(f"AdamWEWC: skipped, not importable in this checkout ({exc})")
        return []
    results: list[Result] = []
    for name, shapes in ADAMW_SHAPES.items():
        results += _adamw_case(name, [tuple(max(1, d // SCALE) for d in s) for s in shapes], AdamWEWC, rounds)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return results


def _adamw_case(name: str, shapes: list[tuple[int, ...]], adamw_ewc_cls, rounds: int) -> list[Result]:
    lam, hyper = 50.0, dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    n = sum(torch.Size(s).numel() for s in shapes)
    base = [torch.randn(s, device=DEVICE, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(p.shape, device=DEVICE, generator=gen) * 1e-3 for p in base]
    anchors = [p + torch.randn(p.shape, device=DEVICE, generator=gen) * 1e-3 for p in base]
    fishers = [torch.rand(p.shape, device=DEVICE, generator=gen) for p in base]

    def copies() -> list[torch.nn.Parameter]:
        ps = [torch.nn.Parameter(p.clone()) for p in base]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        return ps

    ours_ps, ref_ps, floor_ps = copies(), copies(), copies()
    try:
        ours = adamw_ewc_cls(ours_ps, lam=lam, anchors=dict(zip(ours_ps, anchors, strict=True)),
                             fishers=dict(zip(ours_ps, fishers, strict=True)), **hyper)
    except Exception as exc:
        print(f"AdamWEWC: skipped, its constructor differs from what this check expects ({exc})")
        return []
    fused = DEVICE == "cuda"  # the CPU dry run does not need torch's fused AdamW
    ref = torch.optim.AdamW(ref_ps, fused=fused, **hyper)
    floor = torch.optim.AdamW(floor_ps, fused=fused, **hyper)
    ref_grads = [p.grad for p in ref_ps]
    scratch = [torch.empty_like(p) for p in ref_ps]

    def ref_step() -> None:
        # g' = g + lam F (p - p*), then torch's fused AdamW.
        torch._foreach_copy_(ref_grads, grads)
        torch._foreach_copy_(scratch, [p.detach() for p in ref_ps])
        torch._foreach_sub_(scratch, anchors)
        torch._foreach_mul_(scratch, fishers)
        torch._foreach_add_(ref_grads, scratch, alpha=lam)
        ref.step()

    for _ in range(3):
        for p, g in zip(ours_ps, grads, strict=True):
            p.grad.copy_(g)
        ours.step()
        ref_step()
    err = max(_rel(a.detach(), b.detach()) for a, b in zip(ours_ps, ref_ps, strict=True))
    print(f"  {name} ({n / 1e6:,.1f}M params): AdamWEWC after 3 steps vs AdamW + penalty: relative {err:.2e} "
          f"{'ok' if err <= 1e-5 else 'WRONG: not timed'}")
    if err > 1e-5:
        return [Result("adamw_ewc", name, "ours", float("nan"), float("nan"), f"error {err}")]
    fns = {"ours": ours.step, "torch_fused+penalty": ref_step, "torch_fused": floor.step}
    ms = _time(fns, rounds)
    results = []
    for pname, fn in fns.items():
        results.append(Result("adamw_ewc", name, pname, ms[pname], _peak_mib(fn)))
        gbs = n * 4 * 9 / (ms[pname] * 1e-3) / 1e9
        print(f"  {name} {pname}: {ms[pname]:.3f} ms per step ({gbs:,.0f} GB/s effective, 9 x 4 bytes/element), "
              f"peak {results[-1].peak_mib:,.0f} MiB above the start")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per provider")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of the logic")
    parser.add_argument("--small", action="store_true", help="every dimension / 16 (with --device cpu)")
    args = parser.parse_args(argv)
    global DEVICE, SCALE
    DEVICE, SCALE = args.device, 16 if args.small else 1
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_head_optim_check: no CUDA device", file=sys.stderr)
        return 2
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    print(f"== linear cross-entropy on {where}")
    results = check_linear_ce(args.rounds)
    print("== AdamW + EWC")
    results += check_adamw_ewc(args.rounds)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump([asdict(r) for r in results], fh, indent=1)
        print(f"wrote {args.out}")
    wrong = [r for r in results if r.note]
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
