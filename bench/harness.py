"""The measuring machinery every benchmark shares: timing, peak memory, CSV, tables, plots.

Timing.  Providers of one comparison run **interleaved** (A B C A B C ...), after a few
warm-up rounds, so that a burst of load from other processes on a shared machine hits all
of them alike rather than whichever happened to run during it.  Each provider may have an
untimed ``setup`` (e.g. the forward pass before a timed backward) whose result is passed
to the timed ``run``.  We report the median and the 20th / 80th percentiles of the rounds.
This in-process interleaving is for micro-benchmarks; whole trainers run one fresh process per
side and round (``bench/e2e_process.py``), whose ``round<i>`` rows this module keeps out of the
ratio table, the targets and the plots (:func:`is_round_row`).

Peak memory.  On CUDA: ``torch.cuda.max_memory_allocated()`` minus what was allocated when
the measured call began.  On CPU torch keeps no allocator statistics, so
:class:`TensorMemoryTracker` (a ``TorchDispatchMode``) sees every tensor that every aten op
creates, counts the bytes of each *new* storage (views and in-place results share their
input's storage and are not counted), and subtracts them again when the storage is freed
(a weak reference callback).  The high-water mark of that count is the CPU analogue of the
CUDA number: peak bytes of tensor memory above what was live at the start.  It is exact for
everything that goes through the torch dispatcher (which includes Triton's host-side
allocations and every peer library used here) and deterministic, unlike RSS, which the
allocator's caching and the OS blur.  It excludes the Python heap and the allocator's
slack.

Output.  Rows with the Liger-style columns of :data:`CSV_COLUMNS` are appended to
``bench/results/<device>-<date>.csv`` (quick runs: a temp folder, see :func:`default_results_dir`); :func:`print_ratio_table` prints ours / peer ratios
from the same run; :func:`plot_kernels` draws one PNG per kernel.
"""
from __future__ import annotations

import csv
import datetime as _dt
import math
import platform
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CSV_COLUMNS = (
    "kernel", "provider", "mode", "metric", "x_name", "x_value",
    "p50", "p20", "p80", "config", "device", "timestamp", "version",
)
# Units of each metric, as written in the CSV (documented in bench/README.md).
METRIC_UNITS = {"time": "ms", "memory": "MiB", "throughput": "tokens/s", "rel_error": "|F-F*|/|F*|",
                "gflops": "GFLOP/s", "peak_share": "share of the GEMM peak", "rss": "MiB peak RSS",
                "first_loss": "nats"}
# For these metrics a larger value is better; for the others a smaller one.
HIGHER_IS_BETTER = {"throughput", "gflops", "peak_share"}
OURS = "ours"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- rows
@dataclass
class Quantiles:
    p50: float
    p20: float
    p80: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Quantiles:
        if not samples:
            raise ValueError("no samples to summarise")
        ordered = sorted(samples)
        return cls(_quantile(ordered, 0.5), _quantile(ordered, 0.2), _quantile(ordered, 0.8))

    @classmethod
    def single(cls, value: float) -> Quantiles:
        return cls(value, value, value)


def _quantile(ordered: Sequence[float], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default), on a sorted list.
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Row:
    kernel: str
    provider: str
    mode: str
    metric: str
    x_name: str
    x_value: str
    p50: float
    p20: float
    p80: float
    config: str
    device: str
    timestamp: str
    version: str

    def as_csv(self) -> dict[str, Any]:
        return {c: (f"{getattr(self, c):.6g}" if c in ("p50", "p20", "p80") else getattr(self, c))
                for c in CSV_COLUMNS}


@dataclass
class BenchContext:
    """One invocation of ``python -m bench``: settings plus everything measured so far."""

    device: torch.device
    quick: bool
    warmup: int = 2
    repeats: int = 7
    shape: str | None = None  # e2e only: which model shape (None = the suite's default)
    seqs: tuple[int, ...] | None = None  # e2e smollm2-135m only: sequence lengths (None = 512 and 256)
    cases: tuple[str, ...] | None = None  # e2e smollm2-135m only: METHOD-PRECISION cases (None = all four)
    # e2e only (one process per side and round, bench/e2e_process.py): None = the suite's default.
    rounds: int | None = None
    timed_steps: int | None = None
    only: tuple[str, ...] | None = None  # side names to run (None = every side)
    tensor_memory: bool = True  # CPU: one extra tracked process per side for the tensor-memory figure
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timestamp: str = field(default_factory=lambda: _dt.datetime.now().isoformat(timespec="seconds"))
    version: str = field(default_factory=lambda: project_version())

    @property
    def device_name(self) -> str:
        return device_description(self.device)

    def add(self, kernel: str, provider: str, mode: str, metric: str, x_name: str, x_value: Any,
            q: Quantiles, config: str) -> None:
        self.rows.append(Row(kernel, provider, mode, metric, x_name, str(x_value), q.p50, q.p20, q.p80,
                             config, self.device_name, self.timestamp, self.version))

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.notes.append(text)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def project_version() -> str:
    """``<package version>+g<git sha>[.dirty]``, so a CSV row says what code produced it."""
    try:
        from importlib.metadata import version

        pkg = version("forgetless")
    except Exception:
        pkg = "0+unknown"
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return pkg
    return f"{pkg}+g{sha}{'.dirty' if dirty else ''}" if sha else pkg


def cpu_model_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown cpu"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{cpu_model_name()} x{torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------- timing
@dataclass
class Provider:
    """One contender.  ``run(state)`` is timed; ``setup()`` (untimed) produces ``state``."""

    name: str
    run: Callable[[Any], Any]
    setup: Callable[[], Any] | None = None


def time_interleaved(ctx: BenchContext, providers: Sequence[Provider], warmup: int | None = None,
                     repeats: int | None = None) -> dict[str, Quantiles]:
    """Milliseconds per call of each provider, measured in interleaved rounds."""
    warmup = ctx.warmup if warmup is None else warmup
    repeats = ctx.repeats if repeats is None else repeats
    samples: dict[str, list[float]] = {p.name: [] for p in providers}
    for round_index in range(warmup + repeats):
        # Alternate the order every round so no provider always runs right after another.
        ordered = providers if round_index % 2 == 0 else list(reversed(providers))
        for p in ordered:
            state = p.setup() if p.setup is not None else None
            ctx.sync()
            start = time.perf_counter()
            p.run(state)
            ctx.sync()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                samples[p.name].append(elapsed * 1e3)
            del state
    return {name: Quantiles.of(s) for name, s in samples.items()}


# ----------------------------------------------------------------------------- memory
class TensorMemoryTracker(TorchDispatchMode):
    """Counts bytes of tensor storages created inside the ``with`` block; see module doc."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, weakref.ref] = {}

    def _release(self, key: int, nbytes: int) -> None:
        if self._tracked.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            # A view or an in-place result shares an input's storage: nothing new allocated.
            if nbytes == 0 or key in inputs or key in self._tracked:
                continue
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self._tracked[key] = weakref.ref(storage, lambda _ref, k=key, n=nbytes: self._release(k, n))
        return out


def peak_memory_mib(ctx: BenchContext, run: Callable[[Any], Any], setup: Callable[[], Any] | None = None) -> float:
    """Peak tensor memory (MiB) allocated by ``run(setup())`` above what was live before it."""
    state = setup() if setup is not None else None
    if ctx.device.type == "cuda":
        ctx.sync()
        torch.cuda.reset_peak_memory_stats(ctx.device)
        base = torch.cuda.memory_allocated(ctx.device)
        run(state)
        ctx.sync()
        peak = torch.cuda.max_memory_allocated(ctx.device) - base
    else:
        tracker = TensorMemoryTracker()
        with tracker:
            run(state)
        peak = tracker.peak
    del state
    return peak / 2**20


def measure(ctx: BenchContext, kernel: str, mode: str, x_name: str, x_value: Any, config: str,
            providers: Sequence[Provider], memory: bool = False) -> dict[str, Quantiles]:
    """Time ``providers`` side by side (and measure their memory) and record the rows."""
    times = time_interleaved(ctx, providers)
    for p in providers:
        ctx.add(kernel, p.name, mode, "time", x_name, x_value, times[p.name], config)
    if memory:
        for p in providers:
            ctx.add(kernel, p.name, mode, "memory", x_name, x_value,
                    Quantiles.single(peak_memory_mib(ctx, p.run, p.setup)), config)
    return times


# ----------------------------------------------------------------------------- output
def default_results_dir(quick: bool) -> Path:
    """Full runs: ``bench/results`` (what docs/benchmarks.md quotes). Quick runs: a folder in
    the system's temp directory, so that checking the harness never adds files to the repo."""
    return Path(tempfile.gettempdir()) / "forgetless-bench-quick" if quick else RESULTS_DIR


def results_path(ctx: BenchContext, results_dir: Path | None = None) -> Path:
    date = ctx.timestamp.split("T", 1)[0]
    # Quick runs (tiny shapes, harness checks) get their own file, so they never mix into a
    # full run's CSV even when both are written to the same folder.
    suffix = "-quick" if ctx.quick else ""
    return (results_dir or default_results_dir(ctx.quick)) / f"{ctx.device.type}-{date}{suffix}.csv"


def write_csv(rows: Iterable[Row], path: Path) -> Path:
    """Append rows (with a header when the file is new), as Liger's benchmarks do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(row.as_csv())
    return path


def _group_key(row: Row) -> tuple:
    return (row.kernel, row.mode, row.metric, row.x_name, row.x_value, row.config)


def is_round_row(row: Row) -> bool:
    """One process's number of a separate-process e2e run (``mode = round<i>``): in the CSV,
    left out of the ratio table and the targets, which use the over-rounds ``full`` rows."""
    return row.mode.startswith("round")


def ratio_lines(rows: Sequence[Row], verdicts: bool = True) -> list[str]:
    """One line per (comparison, peer): ours p50, peer p50, ours/peer, and (``verdicts``)
    which way is better."""
    groups: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        if not is_round_row(row):
            groups.setdefault(_group_key(row), {})[row.provider] = row
    header = f"{'kernel':<14} {'mode':<9} {'metric':<10} {'x':<22} {'config':<34} {'peer':<22} " \
             f"{'ours':>10} {'peer p50':>10} {'ours/peer':>9}" + ("  verdict" if verdicts else "")
    lines = [header, "-" * len(header)]
    for key, by_provider in groups.items():
        ours = by_provider.get(OURS)
        if ours is None:
            continue
        kernel, mode, metric, x_name, x_value, config = key
        for peer_name, peer in by_provider.items():
            if peer_name == OURS:
                continue
            ratio = ours.p50 / peer.p50 if peer.p50 else float("inf")
            better = ratio > 1 if metric in HIGHER_IS_BETTER else ratio < 1
            verdict = "ours better" if better else ("equal" if ratio == 1 else "peer better")
            if metric not in HIGHER_IS_BETTER and ratio > 0 and metric == "time":
                verdict += f" ({1 / ratio:.2f}x speed)"
            lines.append(f"{kernel:<14} {mode:<9} {metric:<10} {x_name + '=' + x_value:<22} {config[:34]:<34} "
                         f"{peer_name:<22} {ours.p50:>10.4g} {peer.p50:>10.4g} {ratio:>9.3f}"
                         + (f"  {verdict}" if verdicts else ""))
    return lines


# Why a quick run judges nothing: printed with its tables.
QUICK_CAVEAT = ("quick run: tiny shapes and a few rounds check that the harness works; its timings and "
                "ratios say nothing about speed, so no verdicts are printed (run without --quick for them)")


def print_ratio_table(rows: Sequence[Row], notes: Sequence[str] = (), verdicts: bool = True) -> str:
    lines = ["", "== ours / peer, p50, measured side by side in this run "
                 f"(units: {', '.join(f'{k} {v}' for k, v in METRIC_UNITS.items())})"]
    if not verdicts:
        lines.append(f"   ({QUICK_CAVEAT})")
    lines += ratio_lines(rows, verdicts)
    errors = [r for r in rows if r.metric == "rel_error"]
    if errors:
        lines += ["", "== estimator error against the exact Fisher (same run)"]
        lines += [f"{r.kernel:<14} {r.provider:<20} {r.x_name}={r.x_value:<20} rel_error {r.p50:.4f}  ({r.config})"
                  for r in errors]
    if notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in notes]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


@dataclass
class Target:
    """A performance goal from an issue, as a bound on ours_p50 / peer_p50 of one row pair."""

    label: str
    kernel: str
    metric: str
    peer: str
    x_value: str | None = None
    config_contains: str | None = None
    max_ratio: float | None = None
    min_ratio: float | None = None
    # When set, ``peer`` is only the label: each comparison takes the best of these providers
    # (highest for throughput-like metrics, lowest otherwise), e.g. the fastest / leanest peer.
    best_of: tuple[str, ...] = ()

    def matches(self, row: Row) -> bool:
        return (not is_round_row(row) and row.kernel == self.kernel and row.metric == self.metric
                and (self.x_value is None or row.x_value == self.x_value)
                and (self.config_contains is None or self.config_contains in row.config))

    def goal(self) -> str:
        return f"<= {self.max_ratio:.3g}" if self.max_ratio is not None else f">= {self.min_ratio:.3g}"


def target_lines(rows: Sequence[Row], targets: Sequence[Target], verdicts: bool = True) -> list[str]:
    """One line per target and matching comparison: the ratio, the goal and (``verdicts``)
    met / MISSED."""
    lines = [f"{'target':<84} {'ours/peer':>9} {'goal':>8}" + ("  result" if verdicts else "")]
    for t in targets:
        peers = t.best_of or (t.peer,)
        pairs: dict[tuple, dict[str, Row]] = {}
        for row in rows:
            if t.matches(row) and row.provider in (OURS, *peers):
                pairs.setdefault(_group_key(row), {})[row.provider] = row
        found = [(g[OURS], _best_peer(g, peers, t.metric)) for g in pairs.values()
                 if OURS in g and any(p in g for p in peers)]
        if not found:
            lines.append(f"{t.label:<84} {'-':>9} {t.goal():>8}  not measured in this run")
            continue
        for ours, peer in found:
            ratio = ours.p50 / peer.p50 if peer.p50 else float("inf")
            met = (t.max_ratio is None or ratio <= t.max_ratio) and (t.min_ratio is None or ratio >= t.min_ratio)
            lines.append(f"{t.label:<84} {ratio:>9.3f} {t.goal():>8}" + (f"  {'met' if met else 'MISSED'}"
                                                                         if verdicts else "")
                         + (f"  (peer: {peer.provider})" if t.best_of else ""))
    return lines


def _best_peer(group: dict[str, Row], peers: Sequence[str], metric: str) -> Row:
    present = [group[p] for p in peers if p in group]
    return (max if metric in HIGHER_IS_BETTER else min)(present, key=lambda r: r.p50)


def print_targets(rows: Sequence[Row], targets: Sequence[Target], verdicts: bool = True) -> str:
    head = ["", "== issue targets (ratios of p50 from this run)"]
    if not verdicts:
        head.append(f"   ({QUICK_CAVEAT})")
    text = "\n".join(head + target_lines(rows, targets, verdicts))
    print(text, flush=True)
    return text


def plot_kernels(rows: Sequence[Row], out_dir: Path, prefix: str) -> list[Path]:
    """One PNG per kernel: a panel per (mode, metric), a line per (provider, config variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kernel in dict.fromkeys(r.kernel for r in rows):
        krows = [r for r in rows if r.kernel == kernel and not is_round_row(r)]  # the CSV has those
        panels = list(dict.fromkeys((r.mode, r.metric) for r in krows))
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for ax, (mode, metric) in zip(axes[0], panels, strict=True):
            prow = [r for r in krows if r.mode == mode and r.metric == metric]
            xs = list(dict.fromkeys(r.x_value for r in prow))
            configs = list(dict.fromkeys(_config_variant(r.config) for r in prow))
            for provider in dict.fromkeys(r.provider for r in prow):
                for variant in configs:
                    pts = [(xs.index(r.x_value), r) for r in prow
                           if r.provider == provider and _config_variant(r.config) == variant]
                    if not pts:
                        continue
                    label = provider if len(configs) == 1 else f"{provider} {variant}"
                    ax.errorbar([p for p, _ in pts], [r.p50 for _, r in pts],
                                yerr=[[r.p50 - r.p20 for _, r in pts], [r.p80 - r.p50 for _, r in pts]],
                                marker="o", capsize=3, label=label,
                                linestyle="-" if provider == OURS else "--")
            ax.set_xticks(range(len(xs)), xs, rotation=20, fontsize=8)
            ax.set_xlabel(prow[0].x_name)
            ax.set_ylabel(f"{metric} [{METRIC_UNITS.get(metric, '')}]")
            ax.set_title(f"{kernel}: {mode}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{kernel} on {krows[0].device}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{prefix}-{kernel}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def _config_variant(config: str) -> str:
    # Configs that differ only in the x-axis value share a line; the dropout setting is the
    # one variant that splits lines (lora benchmarks run each shape at two dropout rates).
    parts = [p for p in config.split() if p.startswith("dropout=")]
    return " ".join(parts)
