"""What ``recompute_mlp`` (kernels.gated_mlp) buys and costs at SmolLM2-135M's shape.

Ours against ours: the trainer with ``recompute_mlp=true`` (the default) and ``false``, same
model (SmolLM2-135M's config, random weights), same rows, batch 8 x 512. For each case: peak
tensor memory of a 2-step run (the harness's tracker, model loading included, as in
``bench e2e --shape smollm2-135m``) and step time, runs interleaved A B A B.

Run: ``python -m bench.probes.recompute_mlp [--case lora-bf16 ...] [--layers 30] [--rounds 2]``
(about 4 minutes a case on this 2-core CPU at 30 layers). Results: see docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from bench.e2e_smollm2 import SMOLLM2_135M, Case, interleave, run_ours, write_long_rows, write_model_dir
from bench.harness import BenchContext

CASES = {"lora-bf16": ("lora", "bf16"), "lora-fp32": ("lora", "fp32"), "full-bf16": ("full", "bf16"),
         "full-fp32": ("full", "fp32")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: lora-bf16, lora-fp32, full-bf16")
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M.layers)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timed", type=int, default=3, help="timed steps per run (after one warm-up step)")
    args = parser.parse_args()
    from dataclasses import replace

    shape = replace(SMOLLM2_135M, layers=args.layers)
    ctx = BenchContext(device=torch.device("cpu"), quick=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = write_model_dir(root, shape)
        data = write_long_rows(root / "rows.jsonl", 8 * (args.timed + 2) * 2, args.seq, shape.vocab)
        for name in args.case or ["lora-bf16", "lora-fp32", "full-bf16"]:
            method, precision = CASES[name]
            case = Case(method, precision, 8, args.seq)

            def runner(flag: bool, case: Case = case):
                def run(steps, on_step=None):
                    run_ours(model_dir, data, root / f"out-{flag}", case, steps, ctx.device, on_step,
                             extra={"recompute_mlp": flag})
                return run

            runners = {"recompute": runner(True), "plain": runner(False)}
            from bench.bench_e2e import _run_peak_mib

            mib = {label: _run_peak_mib(ctx, lambda fn=fn: fn(2, None)) for label, fn in runners.items()}
            times = interleave(ctx, name, runners, warm=1, timed=args.timed, rounds=args.rounds)
            med = {label: statistics.median(ms) for label, ms in times.items()}
            print(f"{name} ({args.layers} layers, 8x{args.seq}): peak memory recompute {mib['recompute']:,.0f} MiB, "
                  f"plain {mib['plain']:,.0f} MiB (ratio {mib['recompute'] / mib['plain']:.3f}); step time "
                  f"recompute {med['recompute']:,.0f} ms, plain {med['plain']:,.0f} ms "
                  f"(ratio {med['recompute'] / med['plain']:.3f}, medians of {len(times['plain'])} steps)", flush=True)


if __name__ == "__main__":
    main()
