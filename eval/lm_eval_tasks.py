"""lm-evaluation-harness tasks by name, scored into forgetless's report and gate.

    python -m eval --model M --adapter A --base-model M --lm-eval-tasks arc_easy,gsm8k --out r.json
    trainer:  capability_suite=lm-eval:arc_easy,gsm8k        capability_suite=lm-eval:my_tasks/:my_task

lm-eval's own task definitions run through its Python API (``simple_evaluate`` on an
``HFLM`` wrapping the model already loaded, ``log_samples=True``); each logged sample
becomes one :class:`RowResult` (category = the task name, line = doc_id + 1, correct = the
task's primary 0/1 metric), so the report, the paired statistics (keyed by (category, line))
and the gate treat a task exactly like a suite category.  One category per leaf task: a
group such as ``mmlu`` gives one category per subtask.

A spec is ``lm-eval:TASKS`` or ``lm-eval:DIR:TASKS``: TASKS is a comma-separated list of task,
group or tag names; DIR a folder of the user's own task YAMLs (lm-eval's ``include_path``;
the last ``:`` separates it, so DIR may hold colons).  This module is the one place (with
the IFEval checkers in eval/ifeval.py) that imports lm_eval, always lazily: forgetless
runs without it until a spec asks for it.
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import cache as score_cache
from .report import CapabilityReport, CategoryScore, PerplexityScore, RowResult, TaskScore, percent
from .suite import Suite, SuiteError, load_suite, read_utf8

SPEC_PREFIX = "lm-eval:"
INSTALL_HINT = "pip install 'forgetless[lm-eval]'   (or: pip install 'lm-eval>=0.4.9' langdetect immutabledict nltk)"


class LmEvalTaskError(SuiteError):
    """An lm-eval task that cannot be scored (unknown name, dataset not cached, lm-eval missing);
    a SuiteError, so the CLI and the trainer turn it into exit 2 like a bad suite."""


@dataclass(frozen=True)
class LmEvalSpec:
    tasks: tuple[str, ...]
    include_path: str | None = None  # a folder of the user's own task YAMLs

    @property
    def name(self) -> str:
        where = f"{self.include_path}:" if self.include_path else ""
        return f"{SPEC_PREFIX}{where}{','.join(self.tasks)}"


def is_lm_eval_spec(value) -> bool:
    return isinstance(value, str) and value.startswith(SPEC_PREFIX)


def _task_list(text: str, what: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    if not tasks:
        raise LmEvalTaskError(f"{what}: no task names (expected e.g. arc_easy,gsm8k)")
    return tasks


def parse_lm_eval_spec(value: str) -> LmEvalSpec:
    """``lm-eval:arc_easy,gsm8k`` or ``lm-eval:DIR:my_task`` -> LmEvalSpec."""
    body = value[len(SPEC_PREFIX):] if is_lm_eval_spec(value) else value
    include, _, tasks = body.rpartition(":")
    return LmEvalSpec(_task_list(tasks, value), os.path.expanduser(include) if include else None)


def spec_from_options(tasks: str | None, include_path: str | None) -> LmEvalSpec | None:
    """``--lm-eval-tasks`` / ``--lm-eval-include`` -> a spec (None when no tasks were asked for)."""
    if tasks is None:
        if include_path is not None:
            raise LmEvalTaskError("--lm-eval-include needs --lm-eval-tasks (the task names to run from it)")
        return None
    return LmEvalSpec(_task_list(tasks, "--lm-eval-tasks"), include_path)


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401 - the part every path below needs
    except ImportError as exc:
        raise LmEvalTaskError(f"lm-evaluation-harness tasks need the lm-eval package, which cannot be imported "
                              f"({exc}); install it with: {INSTALL_HINT}") from None
    return lm_eval


@functools.lru_cache(maxsize=4)
def _cached_manager(include_path: str | None, include_defaults: bool):
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _referenced(index: dict, names) -> tuple[dict, bool]:
    """The index entries ``names`` reach (groups to their members, tags to the tasks carrying
    them) and whether every reached name is in ``index``."""
    reached, todo, complete = {}, list(names), True
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        entry = index.get(name)
        if entry is None:
            complete = False
            continue
        reached[name] = entry
        children = (entry.cfg or {}).get("task")
        if isinstance(children, list):  # a group: its members
            todo += [c if isinstance(c, str) else str(c.get("task")) for c in children]
        todo += [n for n, e in index.items() if name in (e.tags or ())]
    return reached, complete


def task_manager(spec: LmEvalSpec):
    """lm-eval's TaskManager for ``spec``, built once per process: the user's folder alone when
    it defines everything the names reach (indexing lm-eval's ~15,000 built-in task YAMLs takes
    10-30 s), else the built-in tasks too (the folder's own win on a shared name, as in lm-eval)."""
    if spec.include_path is not None:
        own = _cached_manager(spec.include_path, False)
        if _referenced(own.task_index, spec.tasks)[1]:
            return own
    return _cached_manager(spec.include_path, True)


def check_task_names(spec: LmEvalSpec) -> None:
    """LmEvalTaskError naming the closest known names for every name lm-eval does not know."""
    if spec.include_path is not None and not Path(spec.include_path).is_dir():
        raise LmEvalTaskError(f"lm-eval task folder {spec.include_path}: not a directory (give the folder that "
                              f"holds your task YAMLs)")
    known = task_manager(spec).all_tasks
    unknown = [name for name in spec.tasks if name not in known]
    if not unknown:
        return
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        parts.append(f"{name!r} (closest: {', '.join(close)})" if close else f"{name!r} (no close name)")
    where = f" or in {spec.include_path}" if spec.include_path else ""
    raise LmEvalTaskError(f"lm-eval does not know the task{'s' if len(unknown) > 1 else ''} {'; '.join(parts)}: "
                          f"not among its {len(known)} tasks, groups and tags{where} "
                          f"(list them: lm-eval ls tasks)")


def _dataset_of(spec: LmEvalSpec, name: str) -> str:
    entry = task_manager(spec).task_index.get(name)
    cfg = (entry.cfg or {}) if entry is not None else {}
    if cfg.get("dataset_path") == "json" or "data_files" in (cfg.get("dataset_kwargs") or {}):
        return f"data files {(cfg.get('dataset_kwargs') or {}).get('data_files')}"
    if cfg.get("dataset_path"):
        return f"dataset {cfg['dataset_path']}" + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "")
    return "its datasets"


def check_task_datasets(spec: LmEvalSpec) -> None:
    """Build each task as lm-eval will (its dataset read from the user's datasets cache when
    offline), so a dataset that is not there fails now, named, not after a model loaded."""
    manager = task_manager(spec)
    for name in spec.tasks:
        try:
            manager.load([name])
        except Exception as exc:  # noqa: BLE001 - datasets/hub raise many types; each one is rewrapped, named
            offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
            hint = ("offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE): it is not in your datasets cache; run once "
                    "online to cache it, or point the task at local files" if offline else
                    "check the task's dataset_path / data_files and your network")
            raise LmEvalTaskError(f"lm-eval task {name!r}: cannot load {_dataset_of(spec, name)} ({hint}): "
                                  f"{type(exc).__name__}: {exc}") from None


def check_lm_eval_spec(spec: LmEvalSpec) -> None:
    """Everything knowable before a model loads: lm-eval installed, names known, datasets readable."""
    _import_lm_eval()
    check_task_names(spec)
    check_task_datasets(spec)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def _task_data_hashes(spec: LmEvalSpec) -> list[str]:
    """What the scores depend on besides the model: each named task's config (groups and tags
    expanded through lm-eval's index), the local data files it reads, and the include folder's
    YAML/Python files (a task's ``!function`` helpers live there)."""
    reached, _ = _referenced(task_manager(spec).task_index, spec.tasks)
    configs, files = {}, set()
    for name, entry in reached.items():
        cfg = entry.cfg or {}
        configs[name] = json.dumps(cfg, sort_keys=True, default=str)
        data_files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        for value in (data_files.values() if isinstance(data_files, dict) else [data_files]):
            files.update([value] if isinstance(value, str) else list(value or []))
    hashes = [hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()]
    hashes += [f"{f}:{_file_digest(Path(f))}" for f in sorted(files)]
    if spec.include_path:
        root = Path(spec.include_path)
        hashes += [f"{p.relative_to(root)}:{_file_digest(p)}" for p in sorted(root.rglob("*"))
                   if p.suffix in (".yaml", ".yml", ".py")]
    return hashes


def _prompt_of(sample: dict) -> str:
    """The context lm-eval scored (rendered with the chat template when it was applied)."""
    args = sample.get("arguments")
    first = args[0] if isinstance(args, (list, tuple)) and args else args
    if isinstance(first, dict):  # older lm-eval: {"gen_args_0": {"arg_0": context, "arg_1": ...}}
        first = next(iter(first.values()), {})
        return str(first.get("arg_0", "")) if isinstance(first, dict) else str(first)
    return str(first[0]) if isinstance(first, (list, tuple)) and first else str(first or "")


def _as_zero_one(value, task: str, metric: str, doc_id) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise LmEvalTaskError(f"lm-eval task {task!r}: its primary metric {metric!r} is not a 0/1 score per document "
                          f"(doc {doc_id}: {value!r}); the gate compares 0/1 outcomes row by row, so give a task "
                          f"whose first metric is acc, exact_match or another 0/1 metric")


def rows_from_samples(task: str, samples: list[dict], output_type: str, chat: bool,
                      metric_list: list[dict] | None = None) -> tuple[list[RowResult], str]:
    """One RowResult per document from lm-eval's logged samples; returns the rows and the
    ``metric,filter`` key they were scored by: the task's first metric under its first filter
    (a task with several filters, such as gsm8k's strict and flexible extraction, logs each
    document once per filter)."""
    metric = (samples[0].get("metrics") or [m["metric"] for m in metric_list or []] or ["acc"])[0]
    filter_name = samples[0].get("filter", "none")
    rows = []
    for sample in sorted((s for s in samples if s.get("filter", "none") == filter_name), key=lambda s: s["doc_id"]):
        correct = _as_zero_one(sample[metric], task, metric, sample["doc_id"])
        row = RowResult(category=task, kind="choice" if output_type == "multiple_choice" else "generate",
                        line=int(sample["doc_id"]) + 1, prompt=_prompt_of(sample), correct=correct, chat=chat)
        responses = sample.get("filtered_resps") or []
        if output_type == "multiple_choice":
            row.logliks = [float(r[0]) for r in responses]
            if metric == "acc" and row.logliks:  # acc picks the highest log-likelihood; acc_norm normalises it
                row.predicted_index = max(range(len(row.logliks)), key=row.logliks.__getitem__)
                args = sample.get("arguments") or []
                if row.predicted_index < len(args) and isinstance(args[row.predicted_index], (list, tuple)):
                    row.output = str(args[row.predicted_index][1])
        elif responses:
            raw = (sample.get("resps") or [[None]])[0]
            row.output = str(raw[0] if isinstance(raw, list) and raw else responses[0])
        rows.append(row)
    return rows, f"{metric},{filter_name}"


def _run_simple_evaluate(model, tokenizer, spec: LmEvalSpec, batch_size: int, limit: int | None, chat: bool):
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    lm_eval_log = logging.getLogger("lm_eval")
    level = lm_eval_log.level
    lm_eval_log.setLevel(logging.ERROR)  # its warning that a model object, not a name, was passed: by design here
    try:
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        lm_eval_log.setLevel(level)
    try:
        return lm_eval.simple_evaluate(model=wrapped, tasks=list(spec.tasks), task_manager=task_manager(spec),
                                       limit=limit, log_samples=True, apply_chat_template=chat, bootstrap_iters=0)
    except (OSError, ConnectionError) as exc:  # checked before the model loaded; the cache changed meanwhile
        raise LmEvalTaskError(f"lm-eval tasks {', '.join(spec.tasks)}: a dataset could not be read "
                              f"({type(exc).__name__}: {exc})") from None


def score_lm_eval_tasks(
    model,
    tokenizer,
    spec: LmEvalSpec | str,
    task: Suite | str | Path | None = None,
    text: str | Path | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    apply_chat_template: bool | None = None,
    cache: bool = False,
    run_name: str = "model",
    model_path: str | None = None,
    adapter_path: str | None = None,
    **suite_kwargs,
) -> CapabilityReport:
    """Score ``model`` on lm-eval tasks: a CapabilityReport with one category per leaf task.

    ``task`` / ``text`` (a target-task suite, held-out text) are scored as ``score_model``
    scores them and attached; ``apply_chat_template=True`` renders lm-eval's prompts with the
    tokenizer's chat template (lm-eval's own option); ``cache=True`` reuses the scores keyed by
    the weights' hash, the task definitions and data, the settings and lm-eval's version.
    Other keyword arguments (max_new_tokens, progress, task_format...) go to the suites' scoring.
    """
    from .capability import score_model  # lazy: capability dispatches lm-eval specs to this module

    spec = parse_lm_eval_spec(spec) if isinstance(spec, str) else spec
    lm_eval = _import_lm_eval()
    check_task_names(spec)
    chat = bool(apply_chat_template)
    if chat:
        from .chat import require_chat_template

        require_chat_template(tokenizer, "the chat template was asked for lm-eval tasks (apply_chat_template)")
    dtype = next((p.dtype for p in model.parameters()), None)
    settings = {"scorer": "lm-eval", "lm_eval_version": lm_eval.__version__, "tasks": list(spec.tasks),
                "include_path": spec.include_path, "limit": limit, "apply_chat_template": chat,
                "batch_size": batch_size, "device": str(model.device), "dtype": str(dtype).replace("torch.", "")}
    data_hashes = _task_data_hashes(spec)
    weights = score_cache.model_hash(model) if cache else ""
    key = None
    if cache:
        keyed = {k: v for k, v in settings.items() if k not in ("batch_size", "include_path")}
        keyed["device"] = model.device.type
        if chat:
            keyed["chat_template"] = hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()
        extra = []  # a target-task suite / held-out text scored with the tasks: their content
        if task is not None:
            extra.append((task if isinstance(task, Suite) else load_suite(task)).content_hash)
            keyed["suite_settings"] = {k: suite_kwargs.get(k) for k in ("max_new_tokens", "task_format")}
        if text is not None:
            extra.append(_file_digest(Path(text)))
        key = score_cache.score_key(weights, score_cache.tokenizer_hash(tokenizer), data_hashes + extra, keyed)
        hit = score_cache.load_cached_as(key, run_name, {"path": model_path, "adapter": adapter_path, "hash": weights})
        if hit is not None:
            return hit

    started = time.perf_counter()
    results = _run_simple_evaluate(model, tokenizer, spec, batch_size, limit, chat)
    rows: list[RowResult] = []
    categories: dict[str, CategoryScore] = {}
    metrics: dict[str, str] = {}
    for name in sorted(results["samples"]):
        config = results["configs"][name]
        task_rows, metrics[name] = rows_from_samples(name, results["samples"][name], config.get("output_type", ""),
                                                     chat, config.get("metric_list"))
        hits = sum(r.correct for r in task_rows)
        categories[name] = CategoryScore(n=len(task_rows), correct=hits, accuracy=percent(hits, len(task_rows)))
        theirs = results["results"][name].get(metrics[name])
        if isinstance(theirs, (int, float)) and not math.isclose(100.0 * theirs, categories[name].accuracy,
                                                                  abs_tol=1e-6):
            raise LmEvalTaskError(f"lm-eval task {name!r}: its {metrics[name]} ({theirs}) is not the mean of its "
                                  f"per-document scores ({categories[name].accuracy / 100}); only tasks whose first "
                                  f"metric is a mean of 0/1 outcomes can be gated row by row")
        rows += task_rows
    if not categories:
        raise LmEvalTaskError(f"lm-eval tasks {', '.join(spec.tasks)}: no samples were scored")
    n_correct = sum(r.correct for r in rows)
    seconds = time.perf_counter() - started
    settings["metrics"] = metrics
    settings["n_shot"] = results.get("n-shot", {})
    report = CapabilityReport(
        run_name=run_name,
        model={"path": model_path, "adapter": adapter_path, "hash": weights},
        suite={"name": spec.name, "version": lm_eval.__version__, "path": spec.include_path,
               "hash": hashlib.sha256(json.dumps(data_hashes).encode()).hexdigest(), "rows": len(rows),
               "lm_eval_tasks": list(spec.tasks)},
        categories=categories,
        overall_accuracy=percent(n_correct, len(rows)),
        macro_accuracy=sum(c.accuracy for c in categories.values()) / len(categories),
        settings=settings,
        timing={"seconds": round(seconds, 3), "prompts": len(rows),
                "prompts_per_second": round(len(rows) / seconds, 2) if seconds > 0 else None, "cached": False},
        rows=rows,
    )
    if task is not None:  # the target-task suite, scored as score_model scores a suite
        suite_kwargs.pop("ppl_window", None)
        scored = score_model(model, tokenizer, task, batch_size=batch_size, limit=limit,
                             apply_chat_template=apply_chat_template, **suite_kwargs)
        correct = sum(r.correct for r in scored.rows)
        report.task = TaskScore(name=scored.suite["name"], path=scored.suite["path"], hash=scored.suite["hash"],
                                n=len(scored.rows), correct=correct, accuracy=percent(correct, len(scored.rows)))
        report.rows += scored.rows
    if text is not None:
        report.perplexity = _perplexity(model, tokenizer, text, batch_size, suite_kwargs.get("ppl_window", 256))
    if key is not None:
        score_cache.store_cached(key, report)
    return report


def _perplexity(model, tokenizer, text: str | Path, batch_size: int, window: int) -> PerplexityScore:
    """Held-out text perplexity, as score_model measures it."""
    from .likelihood import text_perplexity

    content = read_utf8(text, "held-out text file")
    if not content.strip():
        raise SuiteError(f"{text}: the held-out text is empty")
    p = text_perplexity(model, tokenizer, content, window=window, batch_size=max(1, batch_size // 4))
    return PerplexityScore(path=str(text), perplexity=p.perplexity, nll_per_token=p.nll_per_token,
                           tokens=p.tokens, window=p.window)


def merge_reports(suite_report: CapabilityReport, tasks_report: CapabilityReport) -> CapabilityReport:
    """A suite's report and an lm-eval tasks report of the same model as one report (one
    category per suite category and per task); a name in both is bad input."""
    both = sorted(set(suite_report.categories) & set(tasks_report.categories))
    if both:
        raise LmEvalTaskError(f"categories {both} are both suite categories and lm-eval task names; rename the "
                              f"suite's categories")
    merged = suite_report
    merged.categories = {**suite_report.categories, **tasks_report.categories}
    task_names = set(tasks_report.categories)
    merged.rows = suite_report.rows + [r for r in tasks_report.rows if r.category in task_names]
    scored = [r for r in merged.rows if r.category in merged.categories]
    merged.overall_accuracy = percent(sum(r.correct for r in scored), len(scored)) if scored else 0.0
    merged.macro_accuracy = sum(c.accuracy for c in merged.categories.values()) / len(merged.categories)
    merged.suite = dict(suite_report.suite, lm_eval=tasks_report.suite,
                        hash=hashlib.sha256(f"{suite_report.suite.get('hash')}|{tasks_report.suite['hash']}"
                                            .encode()).hexdigest())
    merged.settings = dict(suite_report.settings, lm_eval=tasks_report.settings)
    merged.timing = dict(suite_report.timing, lm_eval=tasks_report.timing,
                         cached=bool(suite_report.timing.get("cached") and tasks_report.timing.get("cached")))
    return merged


def score_suite_and_tasks(model, tokenizer, suite: Suite | str | Path | None, lm_spec: LmEvalSpec,
                          **kwargs) -> CapabilityReport:
    """``python -m eval --suite S --lm-eval-tasks T``: both scored and merged; no suite: the tasks alone."""
    from .capability import score_model

    if suite is None:
        return score_lm_eval_tasks(model, tokenizer, lm_spec, **kwargs)
    suite_report = score_model(model, tokenizer, suite, **kwargs)
    lm_kwargs = {k: v for k, v in kwargs.items() if k not in ("task", "text")}  # scored once, with the suite
    return merge_reports(suite_report, score_lm_eval_tasks(model, tokenizer, lm_spec, **lm_kwargs))

