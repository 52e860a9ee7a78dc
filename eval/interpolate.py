"""Interpolation to the gate: mix a tuned model back toward its base until it passes.

    python -m eval.interpolate --base-model B (--adapter A | --model T) --suite S --task T \\
        --max-drop D [--max-format-rigidity P] [--alphas 0,0.25,0.5,0.75,1] [--refine 2] --out DIR

``alpha = 1`` is the tuned model and ``alpha = 0`` the base (WiSE-FT, Wortsman et al. 2022):

- LoRA: every LoRA layer's ``scale`` is multiplied by alpha (``W x + alpha * s * B A x``);
  no weight is copied.
- Full fine-tuning: every parameter becomes ``(1 - alpha) W_base + alpha W_tuned``, written in
  place into the one loaded model, one tensor at a time, with the base's and the tuned
  model's tensor read lazily from their safetensors files: beyond the model, at most those
  two tensors (and a float32 cast of one of them) exist at any moment.

The base is scored once (from eval's score cache when it was scored before); each alpha costs
one scoring of the mixed model (full mixes are cached by weight hash too; LoRA mixes are not,
the scale is not part of the weights). The gate per alpha: no category drops more than
``max_drop`` points and, when given, format rigidity rises at most ``max_format_rigidity``
points over the base. The largest passing alpha is saved: ``OUT/adapter`` (PEFT format; alpha
is folded into ``lora_B``, so the config keeps the trained r and lora_alpha and any PEFT
loader reproduces the mix) or ``OUT/model`` (HF directory, safetensors). Also written:
``OUT/interpolation.json`` + ``.png`` (the curve) and ``OUT/report.json`` + ``.md`` + ``.png``
(the saved model's forgetting report).

Exit codes: 0 a passing alpha was found and saved; 1 none passes; 2 bad input.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .cli_options import add_gate_option, add_scoring_options
from .gate import compare_reports
from .report import CapabilityReport, ReportError
from .suite import Suite, SuiteError, load_suite

SCHEMA = "forgetless.eval.interpolation/1"
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
EXIT_PASSED, EXIT_NONE_PASSES, EXIT_BAD_INPUT = 0, 1, 2

# (model, tokenizer) from a local model directory; eval's own loader unless the caller has one.
ModelLoader = Callable[[str], tuple[nn.Module, object]]


class InterpolationError(ValueError):
    """Input the interpolation cannot use; the message says what and where."""


# ------------------------------------------------------------------------------- the curve


@dataclass
class CurvePoint:
    alpha: float
    task_score: float | None  # points on the task suite
    target_gain: float | None  # task score - base's task score
    mean_forgetting: float
    worst_forgetting: float
    worst_category: str
    format_rigidity: float | None
    format_rigidity_rise: float | None
    passed: bool
    failed: list[str] = field(default_factory=list)  # failing categories, and "format_rigidity"
    refined: bool = False  # scored by the bisection, not on the grid


@dataclass
class InterpolationResult:
    kind: str  # "lora" | "full"
    points: list[CurvePoint]  # by alpha
    chosen_alpha: float | None  # the largest passing alpha; None when none passes
    max_drop: float
    max_format_rigidity: float | None
    base: dict  # {"model", "task_score", "format_rigidity"}
    tuned: dict  # {"model", "adapter"}
    saved_to: str | None = None
    lora_scale_folded_into: str | None = None  # "lora_B" for adapters
    files: dict = field(default_factory=dict)
    gate: str = "significant"  # the rule asked for (eval.gate); each point's report says the one that decided

    @property
    def passed(self) -> bool:
        return self.chosen_alpha is not None

    def to_dict(self) -> dict:
        data = {"schema": SCHEMA}
        data.update(asdict(self))
        data["passed"] = self.passed
        return data

    def summary(self) -> str:
        if self.passed:
            return (f"PASS: largest alpha passing the gate = {self.chosen_alpha:g} "
                    f"(saved to {self.saved_to})")
        zero = next((p for p in self.points if p.alpha == 0.0), None)
        if zero is not None:
            return ("FAIL: no alpha passes, not even alpha 0 (the base's own weights): the base fails its own "
                    f"gate ({', '.join(zero.failed)}); nothing saved")
        return "FAIL: no alpha of the grid passes; add 0 or smaller alphas to the grid; nothing saved"


def gate_point(alpha: float, base: CapabilityReport, report: CapabilityReport, max_drop: float,
               max_format_rigidity: float | None, refined: bool = False, gate: str = "significant") -> CurvePoint:
    """Compare ``report`` (the mix at ``alpha``) with the base under the ``gate`` rule; fills
    ``report.forgetting``."""
    forgetting = compare_reports(base, report, max_drop, max_format_rigidity, gate=gate)
    report.forgetting = forgetting
    failed = list(forgetting.failed_categories)
    if forgetting.format_rigidity_failed:
        failed.append("format_rigidity")
    return CurvePoint(
        alpha=alpha, task_score=report.task.accuracy if report.task else None,
        target_gain=forgetting.target_gain, mean_forgetting=forgetting.mean_forgetting,
        worst_forgetting=forgetting.worst_forgetting, worst_category=forgetting.worst_category,
        format_rigidity=report.format_rigidity.rate if report.format_rigidity else None,
        format_rigidity_rise=forgetting.format_rigidity_rise, passed=not failed, failed=failed, refined=refined)


def scan_alphas(
    score_at: Callable[[float], CapabilityReport],
    base: CapabilityReport,
    alphas: Sequence[float],
    max_drop: float,
    max_format_rigidity: float | None = None,
    refine: int = 0,
    on_point: Callable[[CurvePoint], None] | None = None,
    gate: str = "significant",
) -> tuple[list[CurvePoint], dict[float, CapabilityReport]]:
    """Score every alpha of the grid, then ``refine`` bisection steps between the largest
    passing alpha and the smallest failing alpha above it. Returns the points (by alpha) and
    each alpha's report. The chosen alpha is the largest passing one (:func:`chosen_alpha`);
    the gate need not be monotone in alpha, so every point counts, not only the bisection's."""
    points: dict[float, CurvePoint] = {}
    reports: dict[float, CapabilityReport] = {}

    def score(alpha: float, refined: bool) -> CurvePoint:
        reports[alpha] = score_at(alpha)
        point = gate_point(alpha, base, reports[alpha], max_drop, max_format_rigidity, refined, gate)
        points[alpha] = point
        if on_point is not None:
            on_point(point)
        return point

    for alpha in alphas:
        score(float(alpha), refined=False)
    passing = [a for a, p in points.items() if p.passed]
    if refine > 0 and passing:
        lo = max(passing)
        above = [a for a, p in points.items() if not p.passed and a > lo]
        if above:
            hi = min(above)
            for _ in range(refine):
                mid = (lo + hi) / 2
                if score(mid, refined=True).passed:
                    lo = mid
                else:
                    hi = mid
    ordered = [points[a] for a in sorted(points)]
    return ordered, reports


def chosen_alpha(points: Sequence[CurvePoint]) -> float | None:
    passing = [p.alpha for p in points if p.passed]
    return max(passing) if passing else None


# ------------------------------------------------------------------------------- the mixes


class LoRAInterpolation:
    """The adapter scaled by alpha: each LoRA layer's ``scale`` times alpha (no weight copy)."""

    kind = "lora"

    def __init__(self, model: nn.Module) -> None:
        from kernels.lora_layers import lora_modules

        self.model = model
        self.layers = [layer for _, layer in lora_modules(model)]
        if not self.layers:
            raise InterpolationError("the model has no LoRA layers to scale (load the adapter first)")
        self.trained_scales = [layer.scale for layer in self.layers]
        self.alpha = 1.0

    def set_alpha(self, alpha: float) -> None:
        for layer, scale in zip(self.layers, self.trained_scales, strict=True):
            layer.scale = scale * alpha
        self.alpha = alpha

    @torch.no_grad()
    def save(self, alpha: float, out_dir: Path, tokenizer) -> Path:
        """A PEFT adapter computing the mix: ``lora_B * alpha`` with the trained scale, so the
        config (r, lora_alpha, rank/alpha patterns) is the trained one and loaders need no
        knowledge of alpha. The model is left as it was."""
        from kernels.peft_format import save_adapter

        trained_b = [layer.lora_B.detach().clone() for layer in self.layers]  # rank-r: small
        current = self.alpha
        try:
            self.set_alpha(1.0)
            for layer in self.layers:
                layer.lora_B.mul_(alpha)
            path = save_adapter(self.model, out_dir)
        finally:
            for layer, b in zip(self.layers, trained_b, strict=True):
                layer.lora_B.copy_(b)
            self.set_alpha(current)
        tokenizer.save_pretrained(str(path))
        return path


class SafetensorsFiles:
    """The tensors of a model directory's safetensors files, read one at a time on demand."""

    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
        elif (directory / "model.safetensors").is_file():
            files = [directory / "model.safetensors"]
        else:
            files = sorted(p for p in directory.glob("*.safetensors") if p.name != "adapter_model.safetensors")
        if not files:
            raise InterpolationError(f"{directory}: no *.safetensors weights (interpolation reads weights only "
                                     "from safetensors: save with model.save_pretrained(dir))")
        self.directory = directory
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    self.where[key] = path
                    self.shapes[key] = tuple(fh.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.where[key]), framework="pt") as fh:
            return fh.get_tensor(key)


class FullInterpolation:
    """``(1 - alpha) W_base + alpha W_tuned`` written into ``model``'s parameters in place."""

    kind = "full"

    def __init__(self, model: nn.Module, base_dir: str | Path, tuned_dir: str | Path) -> None:
        self.model = model
        self.base, self.tuned = SafetensorsFiles(base_dir), SafetensorsFiles(tuned_dir)
        # Tied weights appear once in named_parameters(); the file may hold any of their names.
        aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        self.keys: list[tuple[nn.Parameter, str, str]] = []
        for name, p in model.named_parameters():
            names = aliases[id(p)]
            base_key = next((n for n in names if n in self.base.where), None)
            tuned_key = next((n for n in names if n in self.tuned.where), None)
            for files, key in ((self.base, base_key), (self.tuned, tuned_key)):
                if key is None:
                    raise InterpolationError(f"{files.directory}: no tensor {name!r} in its safetensors (is it a "
                                             f"checkpoint of the same architecture as the tuned model?)")
                if files.shapes[key] != tuple(p.shape):
                    raise InterpolationError(f"{files.directory}: {key} has shape {files.shapes[key]}, the model's "
                                             f"{name} {tuple(p.shape)}; base and tuned must be the same architecture")
            self.keys.append((p, base_key, tuned_key))
        self.alpha: float | None = None

    @torch.no_grad()
    def set_alpha(self, alpha: float) -> None:
        for param, base_key, tuned_key in self.keys:
            # In float32 (or the parameter's own wider dtype): 1*W + 0*T and 0*W + 1*T are exact,
            # so alpha 0 and 1 give back the two checkpoints bit for bit.
            where = {"device": param.device, "dtype": torch.promote_types(param.dtype, torch.float32)}
            mixed = self.base.get(base_key).to(**where)
            mixed.mul_(1.0 - alpha)
            mixed.add_(self.tuned.get(tuned_key).to(**where), alpha=alpha)
            param.copy_(mixed)
            del mixed
        self.alpha = alpha

    def save(self, alpha: float, out_dir: Path, tokenizer) -> Path:
        """An HF model directory (safetensors) of the mix, built beside ``out_dir`` and renamed."""
        if self.alpha != alpha:
            self.set_alpha(alpha)
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            self.model.save_pretrained(str(staging), safe_serialization=True)
            tokenizer.save_pretrained(str(staging))
            _replace_dir(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return out_dir


def _replace_dir(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an old ``target`` is moved aside and removed only after."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------- outputs


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def draw_curve(result: InterpolationResult, path: Path) -> None:
    """Task score, mean and worst forgetting and format rigidity against alpha; the gate's bound
    dashed, failing points crossed, the chosen alpha as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    pts = result.points
    xs = [p.alpha for p in pts]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if any(p.task_score is not None for p in pts):
        ax.plot(xs, [p.task_score if p.task_score is not None else float("nan") for p in pts], "o-",
                color="tab:green", label="task score")
    ax.plot(xs, [p.mean_forgetting for p in pts], "o-", color="tab:blue", label="mean forgetting")
    ax.plot(xs, [p.worst_forgetting for p in pts], "s-", color="tab:orange", label="worst drop")
    if any(p.format_rigidity is not None for p in pts):
        ax.plot(xs, [p.format_rigidity if p.format_rigidity is not None else float("nan") for p in pts], "^-",
                color="tab:purple", label="format rigidity")
    failed = [p for p in pts if not p.passed]
    if failed:
        ax.scatter([p.alpha for p in failed], [p.worst_forgetting for p in failed], marker="x", s=80,
                   color="tab:red", zorder=3, label="fails the gate")
    ax.axhline(result.max_drop, color="tab:orange", linestyle="--", linewidth=1, label=f"max drop {result.max_drop:g}")
    if result.chosen_alpha is not None:
        ax.axvline(result.chosen_alpha, color="black", linestyle=":", linewidth=1,
                   label=f"chosen alpha {result.chosen_alpha:g}")
    ax.set_xlabel("alpha (0 = base, 1 = tuned)")
    ax.set_ylabel("points")
    ax.set_xlim(-0.03, 1.03)
    ax.set_title(f"interpolation to the gate ({result.kind})")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_curve(result: InterpolationResult, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "interpolation.json", "chart": out_dir / "interpolation.png"}
    result.files.update({k: str(v) for k, v in paths.items()})
    _atomic_write(paths["json"], json.dumps(result.to_dict(), indent=2) + "\n")
    draw_curve(result, paths["chart"])
    return paths


# ------------------------------------------------------------------------------- the run


def parse_alphas(text: str) -> list[float]:
    try:
        alphas = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InterpolationError(f"--alphas {text!r}: expected comma-separated numbers such as 0,0.5,1") from None
    return check_alphas(alphas)


def check_alphas(alphas: Sequence[float]) -> list[float]:
    if not alphas:
        raise InterpolationError("the alpha grid is empty")
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise InterpolationError(f"alphas must lie in [0, 1] (0 = base, 1 = tuned), got {bad}")
    return sorted(set(float(a) for a in alphas))


def interpolate_to_gate(
    base_model: str | Path,
    suite: Suite | str | Path,
    out_dir: str | Path,
    max_drop: float,
    *,
    adapter: str | Path | None = None,
    tuned_model: str | Path | None = None,
    task: Suite | str | Path | None = None,
    max_format_rigidity: float | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    refine: int = 0,
    load_model: ModelLoader | None = None,
    cache: bool = True,
    log: Callable[[str], None] = print,
    gate: str = "significant",
    **score_kwargs,
) -> InterpolationResult:
    """Score the alpha grid for ``adapter`` on ``base_model`` (LoRA) or for the full checkpoint
    ``tuned_model``, save the largest passing alpha's model under ``out_dir``, write the curve.

    ``load_model(path) -> (model, tokenizer)`` loads a local model directory (default: eval's
    loader, float32 on CPU); ``score_kwargs`` go to ``eval.capability.score_model`` (limit,
    batch_size, max_new_tokens, task_format, text, progress...). Raises InterpolationError,
    SuiteError or ReportError on bad input. One model is loaded at a time. ``gate``: the rule
    of the gate ("significant" or "point", eval.gate).
    """
    from .capability import score_model
    from .gate import check_gate_rule

    try:
        check_gate_rule(gate)
    except ReportError as exc:
        raise InterpolationError(str(exc)) from None

    if (adapter is None) == (tuned_model is None):
        raise InterpolationError("give exactly one of an adapter (LoRA) or a tuned model directory (full)")
    if max_drop is None or max_drop < 0:
        raise InterpolationError(f"max_drop must be >= 0 points, got {max_drop}")
    if max_format_rigidity is not None and max_format_rigidity < 0:
        raise InterpolationError(f"max_format_rigidity must be >= 0 points, got {max_format_rigidity}")
    if refine < 0:
        raise InterpolationError(f"refine must be >= 0 bisection steps, got {refine}")
    alphas = check_alphas(list(alphas))
    for what, path in (("base model", base_model), ("tuned model", tuned_model)):
        if path is not None and not Path(path).is_dir():
            raise InterpolationError(f"{what} {path}: not a directory")
    device, dtype = score_kwargs.pop("device", None), score_kwargs.pop("dtype", None)
    if load_model is None:
        load_model = _eval_loader(device, dtype)
    lm_eval_tasks = isinstance(suite, str) and suite.startswith("lm-eval:")  # scored by score_model as is
    suite = suite if isinstance(suite, Suite) or lm_eval_tasks else load_suite(suite)
    task = task if task is None or isinstance(task, Suite) else load_suite(task)
    out_dir = Path(out_dir)
    score_kwargs.pop("cache", None)

    model, tokenizer = load_model(str(base_model))
    base = score_model(model, tokenizer, suite, task=task, cache=cache, run_name="base",
                       model_path=str(base_model), **score_kwargs)
    if max_format_rigidity is not None and base.format_rigidity is None:
        raise InterpolationError("a format-rigidity bound needs the task's answer format: set _meta.task_format "
                                 "in the suite (or pass task_format)")
    if adapter is not None:
        from kernels.peft_format import load_adapter

        try:
            load_adapter(model, adapter)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise InterpolationError(f"adapter {adapter}: cannot apply it to {base_model} ({exc})") from None
        mix: LoRAInterpolation | FullInterpolation = LoRAInterpolation(model)
    else:
        del model  # one model at a time: the base's tensors are read from its files from here on
        gc.collect()
        model, tokenizer = load_model(str(tuned_model))
        mix = FullInterpolation(model, base_model, tuned_model)
    log(f"interpolation ({mix.kind}): base scored{' (cached)' if base.timing.get('cached') else ''}; "
        f"{len(alphas)} alphas{f' + {refine} bisection steps' if refine else ''}")

    def score_at(alpha: float) -> CapabilityReport:
        mix.set_alpha(alpha)
        # A LoRA mix differs from the tuned model only in `scale`, which the weight hash does not see.
        return score_model(model, tokenizer, suite, task=task, cache=cache and mix.kind == "full",
                           run_name=f"alpha={alpha:g}", model_path=str(tuned_model or base_model),
                           adapter_path=str(adapter) if adapter else None, **score_kwargs)

    def show(p: CurvePoint) -> None:
        task_text = f"task {p.task_score:.1f}, " if p.task_score is not None else ""
        fr = f", format rigidity {p.format_rigidity:.1f}" if p.format_rigidity is not None else ""
        verdict = "pass" if p.passed else "FAIL (" + ", ".join(p.failed) + ")"
        log(f"  alpha {p.alpha:.4g}: {task_text}mean forgetting {p.mean_forgetting:+.1f}, worst "
            f"{p.worst_category} {p.worst_forgetting:+.1f}{fr} -> {verdict}")

    points, reports = scan_alphas(score_at, base, alphas, max_drop, max_format_rigidity, refine, show, gate)
    best = chosen_alpha(points)
    result = InterpolationResult(
        kind=mix.kind, points=points, chosen_alpha=best, max_drop=max_drop,
        max_format_rigidity=max_format_rigidity,
        base={"model": str(base_model), "task_score": base.task.accuracy if base.task else None,
              "format_rigidity": base.format_rigidity.rate if base.format_rigidity else None},
        tuned={"model": str(tuned_model) if tuned_model else None, "adapter": str(adapter) if adapter else None},
        lora_scale_folded_into="lora_B" if mix.kind == "lora" else None, gate=gate)
    if best is not None:
        from .render import write_report

        target = out_dir / ("adapter" if mix.kind == "lora" else "model")
        result.saved_to = str(mix.save(best, target, tokenizer))
        chosen = reports[best]
        chosen.run_name = f"interpolated alpha={best:g}"
        result.files.update({f"report_{k}": str(v) for k, v in write_report(chosen, out_dir / "report.json").items()})
    write_curve(result, out_dir)
    log(result.summary())
    return result


def _eval_loader(device: str | None, dtype: str | None) -> ModelLoader:
    from .__main__ import BadInput, load_model

    def load(path: str):
        try:
            return load_model(path, None, device, dtype)
        except BadInput as exc:
            raise InterpolationError(str(exc)) from None

    return load


# ------------------------------------------------------------------------------- the CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.interpolate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Mix a tuned model back toward its base (alpha 1 = tuned, 0 = base), score each alpha, and "
                    "save the largest alpha that passes the forgetting gate.",
        epilog="exit codes: 0 a passing alpha was found and saved, 1 none passes, 2 bad input\n"
               "see eval/README.md, 'Interpolation to the gate'")
    p.add_argument("--base-model", required=True, help="base model directory (config, safetensors, tokenizer)")
    tuned = p.add_mutually_exclusive_group(required=True)
    tuned.add_argument("--adapter", help="PEFT-format LoRA adapter of the base: it is scaled by alpha")
    tuned.add_argument("--model", help="fully fine-tuned model directory: mixed with the base tensor by tensor")
    p.add_argument("--suite", required=True, help="capability suite, JSONL")
    p.add_argument("--task", help="target-task suite, JSONL (its accuracy is the task score on the curve)")
    p.add_argument("--max-drop", type=float, required=True, help="gate: no category may drop more than this many points")
    p.add_argument("--max-format-rigidity", type=float,
                   help="gate: format rigidity may rise at most this many points over the base")
    add_gate_option(p)
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="grid of mixing weights in [0, 1] (default %(default)s)")
    p.add_argument("--refine", type=int, default=0,
                   help="bisection steps between the largest passing and the smallest failing alpha (default 0)")
    p.add_argument("--out", required=True, help="output directory: adapter/ or model/, interpolation.json/.png, report.*")
    p.add_argument("--text", help="held-out general text (UTF-8) for perplexity (reported, not gated)")
    add_scoring_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for name in ("batch_size", "max_new_tokens", "limit"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise InterpolationError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
            raise InterpolationError(f"--adapter {args.adapter}: no adapter_config.json (expected a PEFT adapter dir)")
        if args.text is not None and not Path(args.text).is_file():
            raise InterpolationError(f"--text {args.text}: file not found")
        if Path(args.out).is_file():
            raise InterpolationError(f"--out {args.out}: is a file; give a directory")
        result = interpolate_to_gate(
            args.base_model, args.suite, args.out, args.max_drop, adapter=args.adapter, tuned_model=args.model,
            task=args.task, max_format_rigidity=args.max_format_rigidity, alphas=parse_alphas(args.alphas),
            refine=args.refine, cache=not args.no_cache, device=args.device, dtype=args.dtype, text=args.text,
            task_format=args.task_format, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            limit=args.limit, progress=not args.quiet, gate=args.gate)
    except (InterpolationError, SuiteError, ReportError) as exc:
        print(f"forgetless-interpolate: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {result.files['json']}, {result.files['chart']}")
    return EXIT_PASSED if result.passed else EXIT_NONE_PASSES


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
