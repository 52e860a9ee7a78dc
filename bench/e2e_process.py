"""Measure end-to-end sides the way users run them: one fresh process per side and round.

:func:`measure_sides` starts ``python -m bench.e2e_runners`` for every side of a comparison,
``rounds`` times, the order of the sides reversed every other round (A B C, C B A, ...), reads
each child's ``E2E_RESULT`` line and records, per side:

* per round (CSV ``mode = round<i>``): ``throughput`` (tokens / the median of steps
  ``warmup + 1`` .. N, p20 / p80 from that process's 80th / 20th percentile step time), ``time``
  (ms per step, the same steps), ``rss`` (the process's VmHWM, MiB) and ``first_loss`` (the
  training loss of step 1, before any update: every side trains the same model on the same
  rows, so these agree up to precision - a check that the comparison is like for like);
* over the rounds (``mode = full``): ``throughput``, ``time`` and ``rss`` with p50 = the mean
  over rounds and p20 / p80 = the min / max over rounds, and ``memory``: the peak tensor memory
  (CUDA: the allocator's peak in the timed processes; CPU: one extra short process under the
  tensor-memory tracker, model loading included).

It prints each case's table and the comparison the issue asks for: ours against the *fastest*
peer (ratio of mean tokens/s, with the min-max of the per-round ratios) and against the
*leanest* peer (ratio of mean peak RSS, likewise). Micro-benchmarks keep the in-process
interleaving of ``bench.harness.measure``; this module is for whole trainers only.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench.e2e_runners import SideResult, SideSpec, parse_result
from bench.harness import OURS, BenchContext, Quantiles

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROUNDS = 2
DEFAULT_TIMED_STEPS = 8
DEFAULT_WARMUP_STEPS = 2  # steps 1-2 warm up; the median is over steps 3 .. N
MEMORY_STEPS = 2  # the CPU tensor-memory process: model loading and two steps
CHILD_TIMEOUT_S = 4 * 3600


@dataclass
class RunPlan:
    """How many processes and steps a comparison takes."""

    rounds: int = DEFAULT_ROUNDS
    timed_steps: int = DEFAULT_TIMED_STEPS
    warmup_steps: int = DEFAULT_WARMUP_STEPS
    tensor_memory: bool = True  # CPU: one extra tracked process per side

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.timed_steps


@dataclass
class SideRounds:
    """Everything measured for one side over the rounds."""

    name: str
    results: list[SideResult] = field(default_factory=list)
    tensor_peak_mib: float | None = None
    error: str | None = None

    def tokens_per_s(self, tokens: int, warmup: int) -> list[float]:
        return [tokens / _median(r.step_ms(warmup)) * 1e3 for r in self.results]

    def rss(self) -> list[float]:
        return [r.vmhwm_mib for r in self.results]


def _median(values: list[float]) -> float:
    return Quantiles.of(values).p50


def child_command(spec: SideSpec) -> list[str]:
    """The command line of one side's process (``sys.executable``: the same environment)."""
    return [sys.executable, "-m", "bench.e2e_runners", "--spec", json.dumps(asdict(spec))]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        env.setdefault(key, value)
    return env


def run_child(spec: SideSpec) -> SideResult:
    """One side in a fresh process; a failure raises with the tail of the child's output."""
    proc = subprocess.run(child_command(spec), cwd=REPO_ROOT, env=_child_env(), capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S, check=False)
    if proc.returncode == 0:
        try:
            return parse_result(proc.stdout)
        except ValueError:
            pass
    tail = (proc.stdout[-800:] + "\n" + proc.stderr[-1500:]).strip()
    raise RuntimeError(f"exit {proc.returncode}: {tail}")


def measure_sides(ctx: BenchContext, kernel: str, config: str, tokens: int, sides: dict[str, SideSpec],
                  plan: RunPlan, row_sides: Collection[str] | None = None) -> dict[str, SideRounds]:
    """Run every side ``plan.rounds`` times, each in its own process, alternating the order;
    record the rows of the sides in ``row_sides`` (default: all; see the module doc) under
    ``kernel``; a side that fails is noted and left out. Returns every side's numbers."""
    if not sides:
        ctx.note(f"{kernel} {config}: no side selected (--only names none of this case's sides)")
        return {}
    measured = {name: SideRounds(name) for name in sides}
    for round_index in range(plan.rounds):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
        for name in order:
            side = measured[name]
            if side.error is not None:
                continue
            spec = replace(sides[name], steps=plan.steps, tensor_memory=False,
                           output_dir=f"{sides[name].output_dir}-r{round_index + 1}")
            try:
                result = run_child(spec)
            except Exception as exc:  # noqa: BLE001 - one side failing must not stop the others
                side.error = f"{type(exc).__name__}: {str(exc)[-600:]}"
                what = "ours not ready" if name.startswith(OURS) or name == "padded" else "failed"
                ctx.note(f"{kernel} {config}: {name} {what}, left out ({side.error})")
                continue
            side.results.append(result)
            if result.tensor_peak_mib is not None:  # CUDA: the timed process's own allocator peak
                side.tensor_peak_mib = max(side.tensor_peak_mib or 0.0, result.tensor_peak_mib)
            ms = _median(result.step_ms(plan.warmup_steps))
            print(f"    round {round_index + 1} {name:<16} {tokens / ms * 1e3:>9,.1f} tok/s  {ms:>9,.1f} ms/step  "
                  f"peak RSS {result.vmhwm_mib:>8,.0f} MiB  step-1 loss {result.losses[0]:.5f}  "
                  f"({result.threads} threads, process {result.wall_s:,.0f} s"
                  + "".join(f", {k}={v}" for k, v in result.info.items()) + ")", flush=True)
    if plan.tensor_memory:
        for name, side in measured.items():
            if side.error is None and side.tensor_peak_mib is None and sides[name].device == "cpu":
                spec = replace(sides[name], steps=MEMORY_STEPS, tensor_memory=True,
                               output_dir=f"{sides[name].output_dir}-mem")
                try:
                    side.tensor_peak_mib = run_child(spec).tensor_peak_mib
                except Exception as exc:  # noqa: BLE001
                    ctx.note(f"{kernel} {config}: {name} tensor-memory run failed ({str(exc)[-300:]})")
    live = {n: s for n, s in measured.items() if s.error is None and s.results}
    add_rows(ctx, kernel, config, tokens, {n: s for n, s in live.items() if row_sides is None or n in row_sides},
             plan.warmup_steps)
    print_comparison(kernel, config, tokens, live, plan.warmup_steps)
    return measured


def add_rows(ctx: BenchContext, kernel: str, config: str, tokens: int, sides: dict[str, SideRounds],
             warmup: int) -> None:
    for name, side in sides.items():
        for i, result in enumerate(side.results, start=1):
            q = Quantiles.of(result.step_ms(warmup))
            ctx.add(kernel, name, f"round{i}", "throughput", "tokens", tokens,
                    Quantiles(tokens / q.p50 * 1e3, tokens / q.p80 * 1e3, tokens / q.p20 * 1e3), config)
            ctx.add(kernel, name, f"round{i}", "time", "tokens", tokens, q, config)
            ctx.add(kernel, name, f"round{i}", "rss", "tokens", tokens, Quantiles.single(result.vmhwm_mib), config)
            if result.losses and math.isfinite(result.losses[0]):
                ctx.add(kernel, name, f"round{i}", "first_loss", "tokens", tokens,
                        Quantiles.single(result.losses[0]), config)
        tps = side.tokens_per_s(tokens, warmup)
        ms = [tokens / t * 1e3 for t in tps]
        ctx.add(kernel, name, "full", "throughput", "tokens", tokens, mean_min_max(tps), config)
        ctx.add(kernel, name, "full", "time", "tokens", tokens, mean_min_max(ms), config)
        ctx.add(kernel, name, "full", "rss", "tokens", tokens, mean_min_max(side.rss()), config)
        if side.tensor_peak_mib is not None:
            ctx.add(kernel, name, "full", "memory", "tokens", tokens, Quantiles.single(side.tensor_peak_mib), config)


def mean_min_max(values: list[float]) -> Quantiles:
    """Over-rounds summary in the CSV's columns: p50 = mean, p20 = min, p80 = max."""
    return Quantiles(sum(values) / len(values), min(values), max(values))


@dataclass
class Comparison:
    """Ours against the best peer on one metric: ratio of means, min-max of per-round ratios."""

    peer: str
    ratio: float
    low: float
    high: float


def compare(ours: list[float], peers: dict[str, list[float]], higher_is_better: bool) -> Comparison | None:
    """Ours against the peer with the best mean (highest tokens/s, or lowest RSS); the spread is
    over the per-round ratios (round i of ours against round i of that peer)."""
    if not ours or not peers:
        return None
    means = {name: sum(v) / len(v) for name, v in peers.items() if v}
    best = (max if higher_is_better else min)(means, key=means.__getitem__)
    per_round = [o / p for o, p in zip(ours, peers[best], strict=False)]
    ratio = (sum(ours) / len(ours)) / means[best]
    return Comparison(best, ratio, min(per_round), max(per_round))


def print_comparison(kernel: str, config: str, tokens: int, sides: dict[str, SideRounds], warmup: int) -> None:
    lines = [f"    {kernel} {config}: separate processes, {max((len(s.results) for s in sides.values()), default=0)}"
             f" round(s)", f"    {'side':<18} {'tok/s per round':<26} {'mean':>9} {'peak RSS MiB':>13} "
             f"{'tensor MiB':>11}"]
    for name, side in sides.items():
        tps = side.tokens_per_s(tokens, warmup)
        tensor = f"{side.tensor_peak_mib:,.0f}" if side.tensor_peak_mib is not None else "-"
        lines.append(f"    {name:<18} {', '.join(f'{t:,.1f}' for t in tps):<26} {sum(tps) / len(tps):>9,.1f} "
                     f"{max(side.rss()):>13,.0f} {tensor:>11}")
    peers = {n: s for n, s in sides.items() if not n.startswith(OURS)}
    if OURS in sides and peers:
        speed = compare(sides[OURS].tokens_per_s(tokens, warmup),
                        {n: s.tokens_per_s(tokens, warmup) for n, s in peers.items()}, higher_is_better=True)
        rss = compare(sides[OURS].rss(), {n: s.rss() for n, s in peers.items()}, higher_is_better=False)
        for label, c in (("tokens/s: ours / fastest peer", speed), ("peak RSS: ours / leanest peer", rss)):
            if c is not None:
                lines.append(f"    {label} ({c.peer}) = {c.ratio:.2f}x (rounds {c.low:.2f}-{c.high:.2f})")
    print("\n".join(lines), flush=True)
