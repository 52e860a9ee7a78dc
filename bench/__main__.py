"""``python -m bench [lora|fisher|ewc|e2e|all] [--device cpu|cuda] [--quick] [--shape smollm2-135m]``

Runs the chosen benchmarks, appends their rows to ``bench/results/<device>-<date>.csv``,
prints the ours / peer ratio table and the issue targets, and draws one PNG per kernel.
``--quick`` (tiny shapes: checks the harness) writes to a temp folder instead and prints
ratios without verdicts; ``--out-dir`` chooses the folder.
See bench/README.md for what each provider is and how memory is measured.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from bench import harness

SUITES = ("ewc", "fisher", "lora", "e2e")  # cheap first: a cut-short run keeps the most


def _suite(name: str) -> tuple[Callable[[harness.BenchContext], None], list[harness.Target]]:
    # Imported lazily so one suite's missing dependency does not stop the others.
    if name == "lora":
        from bench import bench_lora as mod
    elif name == "fisher":
        from bench import bench_fisher as mod
    elif name == "ewc":
        from bench import bench_ewc as mod
    else:
        from bench import bench_e2e as mod
    return mod.run, mod.TARGETS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("suite", nargs="?", default="all", choices=(*SUITES, "all"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: checks the harness (< 2 min)")
    parser.add_argument("--out-dir", "--results-dir", dest="out_dir", type=Path, default=None,
                        help="where the CSV and PNGs go (default: bench/results; with --quick a folder "
                             "in the temp directory, printed)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--shape", default=None, choices=("llama-4x512", "smollm2-135m"),
                        help="e2e only: the model shape (default llama-4x512, issue 4's; smollm2-135m: issue 13's)")
    parser.add_argument("--seq", type=int, action="append", default=None,
                        help="e2e --shape smollm2-135m only: a sequence length to run (repeatable; default 512 "
                             "and 256). The issue targets are at 512, so --seq 512 halves the run")
    parser.add_argument("--case", action="append", default=None,
                        choices=("lora-bf16", "lora-fp32", "full-bf16", "full-fp32", "packing"),
                        help="e2e --shape smollm2-135m only: a case to run (repeatable; default all four "
                             "method-precision cases and packing)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="e2e: rounds of separate processes per side, order alternating (default 2)")
    parser.add_argument("--steps", type=int, default=None,
                        help="e2e: timed steps per process after 2 warm-up steps (default 8)")
    parser.add_argument("--only", action="append", default=None,
                        help="e2e: run only these sides (comma-separated or repeated), e.g. "
                             "--only ours,hf_peft,trl_sft,trl_sft_fast")
    parser.add_argument("--no-tensor-memory", action="store_true",
                        help="e2e on CPU: skip the extra tracked process per side (peak RSS is still measured)")
    args = parser.parse_args(argv)
    for name, value in (("--rounds", args.rounds), ("--steps", args.steps)):
        if value is not None and value < 1:
            parser.error(f"{name} must be at least 1 (got {value})")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["generate"]:  # the sampler benchmark has its own options: bench/bench_generate.py
        from bench.bench_generate import main as generate_main
        return generate_main(argv[1:])
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch sees no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    ctx = harness.BenchContext(device=torch.device(args.device), quick=args.quick,
                               warmup=1 if args.quick else 2, repeats=args.repeats or (3 if args.quick else 7),
                               shape=args.shape, seqs=tuple(args.seq) if args.seq else None,
                               cases=tuple(args.case) if args.case else None, rounds=args.rounds,
                               timed_steps=args.steps, tensor_memory=not args.no_tensor_memory,
                               only=tuple(n.strip() for v in args.only for n in v.split(",") if n.strip())
                               if args.only else None)
    print(f"bench: {ctx.device_name}, torch {torch.__version__}, version {ctx.version}, "
          f"{'quick' if args.quick else 'full'} run, started {ctx.timestamp}", flush=True)
    targets: list[harness.Target] = []
    out_dir = args.out_dir or harness.default_results_dir(args.quick)
    csv_path = harness.results_path(ctx, out_dir)
    if args.quick and args.out_dir is None:
        print(f"bench: quick run, results go to {out_dir} (not bench/results; --out-dir DIR to choose)", flush=True)
    started = time.perf_counter()
    for name in SUITES if args.suite == "all" else (args.suite,):
        print(f"== {name}", flush=True)
        suite_start = time.perf_counter()
        try:
            run, suite_targets = _suite(name)
        except ImportError as exc:
            ctx.note(f"{name}: not run, a dependency is missing ({exc})")
            continue
        targets += suite_targets
        written = len(ctx.rows)
        run(ctx)
        # Written suite by suite, so an interrupted long run keeps what it measured.
        harness.write_csv(ctx.rows[written:], csv_path)
        print(f"   {name} took {time.perf_counter() - suite_start:.1f} s", flush=True)
    verdicts = not args.quick
    if not ctx.rows:
        harness.print_ratio_table(ctx.rows, ctx.notes, verdicts)
        print("bench: nothing was measured", file=sys.stderr)
        return 1
    harness.print_ratio_table(ctx.rows, ctx.notes, verdicts)
    harness.print_targets(ctx.rows, targets, verdicts)
    print(f"\nbench: {len(ctx.rows)} rows appended to {csv_path}", flush=True)
    if not args.no_plots:
        prefix = csv_path.stem  # already ends in -quick for quick runs
        for png in harness.plot_kernels(ctx.rows, out_dir, prefix):
            print(f"bench: plot {png}")
    print(f"bench: total {time.perf_counter() - started:.1f} s")
    return 0


def prepare_environment() -> None:
    """Only for ``python -m bench`` (never on import: a test process keeps its own settings)."""
    # The Triton interpreter is for tests; a CPU benchmark times the torch path, and kernels
    # decorated for the interpreter would make any forced-Triton call crawl.
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench: ignoring TRITON_INTERPRET (benchmarks time the torch path on CPU)", file=sys.stderr)
        os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Library deprecation chatter would bury the table.
    warnings.filterwarnings("ignore", category=FutureWarning)


if __name__ == "__main__":
    prepare_environment()
    sys.exit(main())
