"""Report dataclasses and their JSON form (the schema is documented in eval/README.md).

All scores are in points (percent, 0-100) so that a drop reads the same way as the gate's
``--max-drop``.  ``CapabilityReport`` is one model on one suite; its optional
``forgetting`` field holds the comparison against a baseline report.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA = "forgetless.eval.report/1"
GATE_RULES = ("significant", "point")  # the gate rules of eval.gate (report.forgetting.gate)


class ReportError(ValueError):
    """A report file that cannot be read or compared; the message says which and why."""


@dataclass
class CategoryScore:
    n: int
    correct: int
    accuracy: float  # points


@dataclass
class TaskScore:
    name: str
    path: str
    hash: str
    n: int
    correct: int
    accuracy: float  # points


@dataclass
class PerplexityScore:
    path: str
    perplexity: float
    nll_per_token: float
    tokens: int
    window: int


@dataclass
class FormatRigidity:
    task_format: str  # the regex
    n: int  # generated answers to non-task prompts
    in_format: int
    rate: float  # points


@dataclass
class Safety:
    n: int  # refusal rows
    refused: int
    refusal_rate: float  # points


@dataclass
class RowResult:
    category: str
    kind: str
    line: int
    prompt: str
    correct: bool
    output: str | None = None  # generated text (exact and refusal rows)
    logliks: list[float] | None = None  # per choice (choice rows)
    predicted_index: int | None = None
    match: str | None = None  # generation rows: the match rule (written only when not "exact")
    chat: bool = False  # the prompt was rendered with the chat template (written only when true)


@dataclass
class CategoryChange:
    before: float
    after: float
    drop: float  # forgetting: before - after, points; positive = worse, negative = improved
    failed: bool
    # Paired statistics over the category's rows (eval.paired; None when the reports hold no
    # per-row outcomes that pair up, e.g. reports written before they were added):
    drop_ci95: list[float] | None = None  # [low, high], points, percentile bootstrap over rows
    mcnemar_p: float | None = None  # exact two-sided McNemar, 0/1 scores only
    n_pairs: int | None = None
    min_detectable_drop: float | None = None  # points, 80% power, two-sided alpha 0.05


@dataclass
class ForgettingReport:
    baseline_run: str
    baseline_model_hash: str
    max_drop: float | None
    categories: dict[str, CategoryChange]
    mean_forgetting: float  # mean drop over the categories, points
    worst_forgetting: float  # largest drop, points
    worst_category: str
    target_before: float | None = None
    target_after: float | None = None
    target_gain: float | None = None  # after - before, points
    format_rigidity_before: float | None = None
    format_rigidity_after: float | None = None
    refusal_rate_before: float | None = None
    refusal_rate_after: float | None = None
    failed_categories: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # The format-rigidity gate (written only when it was asked for, so that reports without
    # it stay readable by readers that predate it): rise = after - before, points; positive =
    # more non-task answers in the task's format = worse; failed when rise > the bound.
    max_format_rigidity: float | None = None
    format_rigidity_rise: float | None = None
    format_rigidity_failed: bool = False
    # The rule that decided the categories: "significant" (drop > max_drop AND the paired 95%
    # interval above 0) or "point" (the drop alone; the rule of reports that do not name one).
    gate: str = "point"
    mean_drop_ci95: list[float] | None = None  # interval of mean_forgetting, categories kept apart
    mean_min_detectable_drop: float | None = None
    n_pairs: int | None = None  # paired rows over all categories
    # Both models' outcome on every paired row, so that anyone can recompute the statistics:
    # {category: {"<suite line>": [before, after]}} (1 = right, 0 = wrong).
    row_outcomes: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    bootstrap: dict = field(default_factory=dict)  # {"resamples", "seed", "confidence"}

    @property
    def passed(self) -> bool:
        return not self.failed_categories and not self.format_rigidity_failed

    @property
    def gated(self) -> bool:
        """True when some gate (per-category drop or format rigidity) was asked for."""
        return self.max_drop is not None or self.max_format_rigidity is not None


@dataclass
class CapabilityReport:
    run_name: str
    model: dict  # {"path", "adapter", "hash"}
    suite: dict  # {"name", "version", "path", "hash", "rows"}
    categories: dict[str, CategoryScore]
    overall_accuracy: float  # micro average over rows, points
    macro_accuracy: float  # mean over categories, points
    task: TaskScore | None = None
    perplexity: PerplexityScore | None = None
    format_rigidity: FormatRigidity | None = None
    safety: Safety | None = None
    settings: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    rows: list[RowResult] = field(default_factory=list)
    forgetting: ForgettingReport | None = None

    def to_dict(self) -> dict:
        data = {"schema": SCHEMA}
        data.update(asdict(self))
        # Fields added after schema /1 was first written are left out while they hold their
        # defaults: a report that does not use them reads in the older reader unchanged.
        for row in data["rows"]:
            if row.get("match") in (None, "exact"):
                row.pop("match", None)
            if not row.get("chat"):
                row.pop("chat", None)
        if self.forgetting is not None:
            if self.forgetting.max_format_rigidity is None:
                for key in _FORMAT_GATE_FIELDS:
                    data["forgetting"].pop(key, None)
            if not self.forgetting.row_outcomes and self.forgetting.gate == "point":
                # no paired statistics and the old rule: the report reads in readers without them
                for key in _PAIRED_FIELDS:
                    data["forgetting"].pop(key, None)
                for change in data["forgetting"]["categories"].values():
                    for key in _PAIRED_CATEGORY_FIELDS:
                        change.pop(key, None)
            data["forgetting"]["passed"] = self.forgetting.passed
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "<report>") -> CapabilityReport:
        return _report_from_dict(data, source)


_FORMAT_GATE_FIELDS = ("max_format_rigidity", "format_rigidity_rise", "format_rigidity_failed")
_PAIRED_FIELDS = ("gate", "mean_drop_ci95", "mean_min_detectable_drop", "n_pairs", "row_outcomes", "bootstrap")
_PAIRED_CATEGORY_FIELDS = ("drop_ci95", "mcnemar_p", "n_pairs", "min_detectable_drop")


def percent(correct: int, n: int) -> float:
    return 100.0 * correct / n if n else 0.0


def _need(data: dict, key: str, kind, source: str):
    if not isinstance(data, dict) or key not in data:
        raise ReportError(f'{source}: missing "{key}" (is this a forgetless eval report?)')
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        raise ReportError(f'{source}: "{key}" must be {kind.__name__}, got {type(value).__name__}')
    if kind is float and not math.isfinite(value):
        raise ReportError(f'{source}: "{key}" is not a finite number')
    return value


def _optional(data: dict, key: str, build, source: str):
    value = data.get(key)
    if value is None:
        return None
    try:
        return build(**value)
    except TypeError as exc:
        raise ReportError(f'{source}: "{key}" has the wrong fields ({exc})') from None


def _report_from_dict(data: dict, source: str) -> CapabilityReport:
    if not isinstance(data, dict):
        raise ReportError(f"{source}: a report must be a JSON object")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise ReportError(f"{source}: schema is {schema!r}, expected {SCHEMA!r}")
    categories = {}
    for name, score in _need(data, "categories", dict, source).items():
        where = f"{source}: categories.{name}"
        categories[name] = CategoryScore(n=_need(score, "n", int, where), correct=_need(score, "correct", int, where),
                                         accuracy=_need(score, "accuracy", float, where))
    if not categories:
        raise ReportError(f"{source}: the report has no categories")
    rows = []
    for i, row in enumerate(data.get("rows") or []):
        try:
            rows.append(RowResult(**row))
        except TypeError as exc:
            raise ReportError(f"{source}: rows[{i}] has the wrong fields ({exc})") from None
    forgetting = None
    if data.get("forgetting") is not None:
        raw = dict(data["forgetting"])
        raw.pop("passed", None)
        try:
            raw["categories"] = {k: CategoryChange(**v) for k, v in raw.get("categories", {}).items()}
            forgetting = ForgettingReport(**raw)
        except TypeError as exc:
            raise ReportError(f'{source}: "forgetting" has the wrong fields ({exc})') from None
        if forgetting.gate not in GATE_RULES:
            raise ReportError(f'{source}: forgetting.gate is {forgetting.gate!r}, expected one of {list(GATE_RULES)}')
    return CapabilityReport(
        run_name=str(data.get("run_name") or Path(source).stem),
        model=_need(data, "model", dict, source),
        suite=_need(data, "suite", dict, source),
        categories=categories,
        overall_accuracy=_need(data, "overall_accuracy", float, source),
        macro_accuracy=_need(data, "macro_accuracy", float, source),
        task=_optional(data, "task", TaskScore, source),
        perplexity=_optional(data, "perplexity", PerplexityScore, source),
        format_rigidity=_optional(data, "format_rigidity", FormatRigidity, source),
        safety=_optional(data, "safety", Safety, source),
        settings=data.get("settings") or {},
        timing=data.get("timing") or {},
        rows=rows,
        forgetting=forgetting,
    )


def read_report(path: str | Path) -> CapabilityReport:
    """Load a REPORT.json written by ``write_report``; ReportError on anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: report file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not valid JSON ({exc})") from None
    return CapabilityReport.from_dict(data, str(path))


def report_json(report: CapabilityReport) -> str:
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"
