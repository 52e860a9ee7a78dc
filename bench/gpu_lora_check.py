"""GPU check of the fused LoRA layer against PEFT at Llama-8B-like shapes (issue 2, item 5).

    python -m bench.gpu_lora_check [--tokens 8192] [--r 16] [--dropouts 0 0.05] [--out FILE.json]

For each shape (4096->4096, 4096->14336; bf16; r=16, alpha=32) and dropout:
1. checks first: at dropout 0, ours (Triton) against PEFT on the same weights: y and every
   gradient within a norm-wise relative error of 2e-2 (bf16 storage: a few roundings of
   2^-8 each, far below a wrong term's O(1)); a failing shape is not timed and the exit is 1;
2. times one forward+backward (CUDA events, providers interleaved round by round, median):
   ``peft`` (its LoRA Linear), ``ours`` (fused Triton kernels, u pre-kernel), ``ours-u-in-loop``
   (the other forward variant, to settle the choice in kernels/lora_triton.py) and
   ``ours-torch-path`` (our torch path on cuBLAS: three GEMMs, in-place LoRA add);
3. peak CUDA memory of one step above what was allocated before it.

Prints one line per (shape, dropout, provider) with the speed ratio against PEFT (>1 = faster).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn


@dataclasses.dataclass
class Row:
    shape: str
    dropout: float
    provider: str
    ms: float
    tokens_per_s: float
    peak_mib: float
    speedup_vs_peft: float = float("nan")


class _OneLinear(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _build(in_f: int, out_f: int, r: int, p: float, dtype: torch.dtype, device: str):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    model = get_peft_model(_OneLinear(base), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["lin"]))
    layer = model.base_model.model.lin
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        B.normal_(0.0, 0.02)  # PEFT's zero B would make the LoRA branch invisible to the check
    return model, layer.base_layer.weight, A, B, float(layer.scaling["default"])


def _providers(model, W, A, B, scale, p, x, dy) -> dict[str, Callable[[], None]]:
    from kernels import backend, lora_triton
    from kernels.lora import lora_linear

    def clear():
        x.grad = A.grad = B.grad = None

    def peft():
        clear()
        model(x).backward(dy)

    def ours(which="triton", blocks=None):
        def step():
            clear()
            with backend.forced(which):
                if blocks is None:
                    lora_linear(x, W, None, A, B, scale, p).backward(dy)
                else:
                    with lora_triton.use_blocks(blocks):
                        lora_linear(x, W, None, A, B, scale, p).backward(dy)

        return step

    u_in_loop = dataclasses.replace(lora_triton.GPU_BLOCKS_16BIT, u_in_k_loop=True)
    return {
        "peft": peft,
        "ours": ours(),
        "ours-u-in-loop": ours(blocks=u_in_loop),
        "ours-torch-path": ours("torch"),
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _check_against_peft(model, W, A, B, scale, x, dy) -> list[str]:
    """Dropout 0: y and every gradient of both Triton variants against PEFT on the same weights."""
    from kernels import backend, lora_triton
    from kernels.lora import lora_linear

    def run(fn):
        x.grad = A.grad = B.grad = None
        y = fn()
        y.backward(dy)
        return [y.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone()]

    reference = run(lambda: model(x))
    u_in_loop = dataclasses.replace(lora_triton.GPU_BLOCKS_16BIT, u_in_k_loop=True)
    problems = []
    for name, blocks in (("ours", lora_triton.GPU_BLOCKS_16BIT), ("ours-u-in-loop", u_in_loop)):
        with backend.forced("triton"), lora_triton.use_blocks(blocks):
            got = run(lambda: lora_linear(x, W, None, A, B, scale))
        for label, a, b in zip(("y", "dx", "dA", "dB"), got, reference, strict=True):
            err = _rel(a, b)
            if not err < 2e-2:
                problems.append(f"{name} {label}: relative error {err:.2e} vs PEFT")
    return problems


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(providers: dict[str, Callable[[], None]], rounds: int, iters: int) -> dict[str, float]:
    """Median ms per call; providers interleaved, order reversed every other round."""
    times: dict[str, list[float]] = {n: [] for n in providers}
    for fn in providers.values():  # warm-up (and Triton compilation)
        fn()
        fn()
    _sync()
    for round_ in range(rounds):
        order = list(providers) if round_ % 2 == 0 else list(reversed(providers))
        for name in order:
            _sync()
            started = time.perf_counter()
            for _ in range(iters):
                providers[name]()
            _sync()
            times[name].append((time.perf_counter() - started) * 1e3 / iters)
    return {n: statistics.median(t) for n, t in times.items()}


def _peak_mib(fn: Callable[[], None]) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x14336"], help="INxOUT")
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU under TRITON_INTERPRET=1: checks this script, times nothing real")  # fmt: skip
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.tokens, args.shapes, args.rounds, args.iters = 40, ["48x80"], 1, 1
    elif device != "cuda":
        print("gpu_lora_check: no CUDA device (use --smoke to check the script on CPU)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)"
    print(f"device: {name} | torch {torch.__version__} | tokens {args.tokens} | r {args.r} | bf16")
    rows: list[Row] = []
    failed = False
    for shape in args.shapes:
        in_f, out_f = (int(v) for v in shape.split("x"))
        for p in args.dropouts:
            model, W, A, B, scale = _build(in_f, out_f, args.r, p, torch.bfloat16, device)
            x = torch.randn(args.tokens, in_f, device=device, dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn(args.tokens, out_f, device=device, dtype=torch.bfloat16)
            providers = _providers(model, W, A, B, scale, p, x, dy)
            if p == 0.0:
                problems = _check_against_peft(model, W, A, B, scale, x, dy)
                if problems:
                    print(f"{shape} CHECK FAILED: " + "; ".join(problems))
                    failed = True
                    continue
                print(f"{shape} check vs PEFT: ok (y, dx, dA, dB within 2e-2 relative, both variants)")
            medians = _time(providers, args.rounds, args.iters)
            for name, fn in providers.items():
                ms = medians[name]
                row = Row(shape, p, name, ms, args.tokens / (ms / 1e3), _peak_mib(fn), medians["peft"] / ms)
                rows.append(row)
                print(f"{shape:>10} p={p:<5} {name:<16} {ms:8.3f} ms  {row.tokens_per_s:12.0f} tok/s  "
                      f"peak {row.peak_mib:8.1f} MiB  speedup vs peft {row.speedup_vs_peft:5.2f}x")  # fmt: skip
            del model, W, A, B, x, dy, providers
            if device == "cuda":
                torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"device": name, "rows": [dataclasses.asdict(r) for r in rows]}, fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
