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


def add_gate_option(p: argparse.ArgumentParser, default: str | None = "significant", help_extra: str = "") -> None:
    """``--gate significant|point``: the rule that decides a category (eval.gate); argparse's
    choices make an unknown rule exit 2 before any model loads."""
    p.add_argument("--gate", choices=["significant", "point"], default=default,
                   help="significant: a category fails when its drop exceeds --max-drop AND its paired 95%% interval "
                        "lies above 0; point: the drop alone decides" + help_extra
                        + (f" (default {default})" if default else ""))


def add_lm_eval_options(p: argparse.ArgumentParser) -> None:
    """lm-evaluation-harness tasks by name (eval/lm_eval_tasks.py), with or instead of --suite."""
    p.add_argument("--lm-eval-tasks", metavar="TASKS",
                   help="comma-separated lm-evaluation-harness task, group or tag names (e.g. arc_easy,gsm8k): run "
                        "with lm-eval's own definitions, one report category per task (needs the lm-eval extra)")
    p.add_argument("--lm-eval-include", metavar="DIR",
                   help="a folder of your own lm-eval task YAMLs (lm-eval's include_path), for --lm-eval-tasks")
