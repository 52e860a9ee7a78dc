"""The scoring options ``python -m eval`` and ``python -m eval.interpolate`` share, so the two
commands spell and default them alike."""
from __future__ import annotations

import argparse


def add_scoring_options(p: argparse.ArgumentParser) -> None:
    """How a suite is scored: task format, batch, generation budget, row limit, device, dtype, cache."""
    p.add_argument("--task-format", help="regex of the task's answer format (overrides the suite's _meta.task_format)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per forward pass (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation budget of rows without their own (default 32)")
    p.add_argument("--limit", type=int, help="score only the first N rows of each suite (quick checks)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (default: float32 on CPU, the checkpoint's own on CUDA)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the score cache")
