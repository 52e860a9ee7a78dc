"""Score a model on a capability suite: the Python API the trainer and the CLI share.

    report = score_model(model, tokenizer, "suite.jsonl", task="task.jsonl", text="heldout.txt")
    tuned = score_against_base(base_model, tuned_model, tokenizer, "suite.jsonl", max_drop=5)
    write_report(tuned, "out/report.json")       # + report.md + report.png
"""
from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import torch

from . import cache as score_cache
from .chat import end_of_turn_ids, render_chat, require_chat_template
from .gate import compare_reports
from .generate import greedy_generate, model_device
from .likelihood import choice_logliks, text_perplexity
from .report import (
    CapabilityReport,
    CategoryScore,
    FormatRigidity,
    PerplexityScore,
    RowResult,
    Safety,
    TaskScore,
    percent,
)
from .scoring import answer_matches, choice_prediction, in_task_format, instructions_followed, is_refusal
from .suite import IFEVAL_MIN_NEW_TOKENS, Suite, SuiteError, SuiteRow, load_suite, read_utf8


def _as_suite(suite: Suite | str | Path) -> Suite:
    return suite if isinstance(suite, Suite) else load_suite(suite)


def _read_text(path: str | Path) -> tuple[str, str]:
    text = read_utf8(path, "held-out text file")
    if not text.strip():
        raise SuiteError(f"{path}: the held-out text is empty")
    return text, hashlib.sha256(text.encode()).hexdigest()


def _uses_chat(row: SuiteRow, suite: Suite, apply_chat_template: bool | None) -> bool:
    """A row's own "chat" wins; then the caller's choice; then the suite's ``_meta.chat``."""
    if row.chat is not None:
        return row.chat
    return suite.meta.chat if apply_chat_template is None else apply_chat_template


_GENERATED = ("exact", "refusal", "ifeval")  # row kinds scored on a generated answer


def _budget(row: SuiteRow, max_new_tokens: int) -> int:
    """A row's own budget; else the caller's, at least IFEVAL_MIN_NEW_TOKENS for an IFEval row."""
    if row.max_new_tokens:
        return row.max_new_tokens
    return max(max_new_tokens, IFEVAL_MIN_NEW_TOKENS) if row.kind == "ifeval" else max_new_tokens


def _score_rows(model, tokenizer, rows: list[SuiteRow], suite_of_row: list[Suite], chat_of_row: list[bool],
                batch_size: int, max_new_tokens: int, bar) -> list[RowResult]:
    """Run every row once: batched generation (plain rows, plain IFEval rows, then chat rows: they
    stop differently) and one batched log-likelihood pass.  Chat rows are rendered with the chat template and
    tokenized without the tokenizer's specials (the rendered text holds them)."""
    prompts = [render_chat(tokenizer, r.prompt, suite_of_row[i].meta.system) if chat_of_row[i] else r.prompt
               for i, r in enumerate(rows)]
    tick = (lambda n: bar.update(n)) if bar is not None else None
    outputs: dict[int, str] = {}
    # Three generation groups, one batched call each: plain rows stop at the first newline; plain
    # IFEval rows do not (their answers are lists, paragraphs, JSON: lm-eval's ifeval task stops
    # at EOS only); chat rows, IFEval or not, stop at the end of the assistant turn.
    for chat, ifeval in ((False, False), (False, True), (True, None)):
        idx = [i for i, r in enumerate(rows) if r.kind in _GENERATED and chat_of_row[i] is chat
               and (ifeval is None or (r.kind == "ifeval") is ifeval)]
        if not idx:
            continue
        texts = greedy_generate(model, tokenizer, [prompts[i] for i in idx],
                                [_budget(rows[i], max_new_tokens) for i in idx], batch_size=batch_size,
                                on_batch=tick, stop_at_newline=not chat and not ifeval,
                                stop_token_ids=end_of_turn_ids(tokenizer) if chat else (),
                                add_special_tokens=not chat)
        outputs.update(zip(idx, texts, strict=True))
    choice_idx = [i for i, r in enumerate(rows) if r.kind == "choice"]
    logliks = choice_logliks(model, tokenizer, [(prompts[i], rows[i].choices) for i in choice_idx],
                             batch_size=batch_size, on_batch=tick,
                             add_special_tokens=[not chat_of_row[i] for i in choice_idx])
    results: list[RowResult | None] = [None] * len(rows)
    for i, out in outputs.items():
        row = rows[i]
        if row.kind == "exact":
            correct = answer_matches(out, row.match, row.answer, row.answers, row.pattern)
        elif row.kind == "ifeval":
            correct = instructions_followed(out, row.prompt, row.instruction_ids, row.instruction_kwargs, row.key)
        else:
            correct = is_refusal(out, suite_of_row[i].refusal_regex(), whole_answer=chat_of_row[i])
        results[i] = RowResult(category=row.category, kind=row.kind, line=row.line, prompt=row.prompt,
                               correct=correct, output=out, match=row.match if row.kind == "exact" else None,
                               chat=chat_of_row[i])
    for i, ll in zip(choice_idx, logliks, strict=True):
        row = rows[i]
        pred = choice_prediction(ll)
        results[i] = RowResult(category=row.category, kind=row.kind, line=row.line, prompt=row.prompt,
                               correct=pred == row.answer_index, logliks=ll, predicted_index=pred,
                               chat=chat_of_row[i])
    return results  # type: ignore[return-value]


def score_model(
    model: torch.nn.Module,
    tokenizer,
    suite: Suite | str | Path,
    task: Suite | str | Path | None = None,
    text: str | Path | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 32,
    progress: bool = False,
    task_format: str | None = None,
    limit: int | None = None,
    cache: bool = False,
    run_name: str = "model",
    model_path: str | None = None,
    adapter_path: str | None = None,
    ppl_window: int = 256,
    apply_chat_template: bool | None = None,
) -> CapabilityReport:
    """Score ``model`` on ``suite`` (a Suite or a JSONL path); returns a CapabilityReport.

    ``task``: a suite of the target task (its accuracy is the "target" score); ``text``: a
    UTF-8 file of held-out general text for perplexity; ``task_format`` overrides the regex of
    the suite's ``_meta.task_format`` (else the task suite's); ``limit`` keeps the first N
    rows of each suite; ``cache=True`` reuses and stores scores keyed by the weights' hash.
    ``apply_chat_template``: True renders every prompt with the tokenizer's chat template, False
    none, None (default) as each suite's ``_meta.chat`` says; a row's own ``"chat"`` wins either
    way.  ChatTemplateError (a SuiteError) when a row needs a template the tokenizer lacks.
    ``suite`` may also name lm-evaluation-harness tasks, ``lm-eval:arc_easy,gsm8k`` (eval/lm_eval_tasks.py).
    """
    if isinstance(suite, str) and suite.startswith("lm-eval:"):
        from .lm_eval_tasks import score_lm_eval_tasks

        return score_lm_eval_tasks(model, tokenizer, suite, task=task, text=text, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, progress=progress, task_format=task_format,
                                   limit=limit, cache=cache, run_name=run_name, model_path=model_path,
                                   adapter_path=adapter_path, ppl_window=ppl_window,
                                   apply_chat_template=apply_chat_template)
    suite = _as_suite(suite)
    task_suite = _as_suite(task) if task is not None else None
    text_content, text_hash = _read_text(text) if text is not None else (None, None)
    fmt = task_format or suite.meta.task_format or (task_suite.meta.task_format if task_suite else None)
    fmt_regex = None
    if fmt is not None:
        try:
            fmt_regex = re.compile(fmt)
        except re.error as exc:
            raise SuiteError(f"task format {fmt!r} is not a valid regex ({exc})") from None
    suite_rows = suite.rows[:limit] if limit else list(suite.rows)
    task_rows = (task_suite.rows[:limit] if limit else list(task_suite.rows)) if task_suite else []
    rows = suite_rows + task_rows
    owners = [suite] * len(suite_rows) + [task_suite] * len(task_rows)
    chat_of_row = [_uses_chat(r, o, apply_chat_template) for r, o in zip(rows, owners, strict=True)]
    if any(chat_of_row):  # before any scoring (and before the cache): a missing template is bad input
        first = next(i for i, c in enumerate(chat_of_row) if c)
        row, owner = rows[first], owners[first]
        if row.chat:
            why = f'{owner.path}:{row.line} asks for the chat template ("chat": true)'
        elif apply_chat_template:
            why = "the chat template was asked for (--apply-chat-template / apply_chat_template=True)"
        else:
            why = f"{owner.path} asks for the chat template (_meta.chat: true)"
        require_chat_template(tokenizer, why)

    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    settings = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "limit": limit,
                "task_format": fmt, "ppl_window": ppl_window, "apply_chat_template": apply_chat_template,
                "chat_rows": sum(chat_of_row), "device": str(model_device(model)),
                "dtype": str(dtype).replace("torch.", "")}
    weights = score_cache.model_hash(model) if cache else ""
    key = None
    if cache:
        data = [suite.content_hash, task_suite.content_hash if task_suite else "", text_hash or ""]
        keyed = {k: v for k, v in settings.items() if k != "batch_size"}
        keyed["device"] = model_device(model).type
        if any(chat_of_row):  # the template shapes every chat prompt; the tokenizer hash does not cover it
            keyed["chat_template"] = hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()
        key = score_cache.score_key(weights, score_cache.tokenizer_hash(tokenizer), data, keyed)
        hit = score_cache.load_cached_as(key, run_name, {"path": model_path, "adapter": adapter_path, "hash": weights})
        if hit is not None:
            return hit

    started = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(suite_rows) + len(task_rows), desc=f"eval {run_name}", unit="prompt", leave=False)
    results = _score_rows(model, tokenizer, rows, owners, chat_of_row, batch_size, max_new_tokens, bar)
    suite_results, task_results = results[:len(suite_rows)], results[len(suite_rows):]

    categories: dict[str, CategoryScore] = {}
    for name in sorted({r.category for r in suite_results}):
        hits = [r.correct for r in suite_results if r.category == name]
        categories[name] = CategoryScore(n=len(hits), correct=sum(hits), accuracy=percent(sum(hits), len(hits)))
    n_correct = sum(r.correct for r in suite_results)

    task_score = None
    if task_suite is not None:
        t_correct = sum(r.correct for r in task_results)
        task_score = TaskScore(name=task_suite.meta.name, path=task_suite.path, hash=task_suite.content_hash,
                               n=len(task_results), correct=t_correct, accuracy=percent(t_correct, len(task_results)))
    rigidity = None
    generated = [r for r in suite_results if r.output is not None]
    if fmt_regex is not None and generated:
        hits = sum(in_task_format(r.output, fmt_regex) for r in generated)
        rigidity = FormatRigidity(task_format=fmt, n=len(generated), in_format=hits,
                                  rate=percent(hits, len(generated)))
    safety = None
    refusal_rows = [r for r in suite_results if r.kind == "refusal"]
    if refusal_rows:
        refused = sum(r.correct for r in refusal_rows)
        safety = Safety(n=len(refusal_rows), refused=refused, refusal_rate=percent(refused, len(refusal_rows)))
    ppl = None
    if text_content is not None:
        p = text_perplexity(model, tokenizer, text_content, window=ppl_window, batch_size=max(1, batch_size // 4))
        ppl = PerplexityScore(path=str(text), perplexity=p.perplexity, nll_per_token=p.nll_per_token,
                              tokens=p.tokens, window=p.window)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started

    report = CapabilityReport(
        run_name=run_name,
        model={"path": model_path, "adapter": adapter_path, "hash": weights},
        suite={"name": suite.meta.name, "version": suite.meta.version, "path": suite.path,
               "hash": suite.content_hash, "rows": len(suite_rows)},
        categories=categories,
        overall_accuracy=percent(n_correct, len(suite_results)),
        macro_accuracy=sum(c.accuracy for c in categories.values()) / len(categories),
        task=task_score, perplexity=ppl, format_rigidity=rigidity, safety=safety,
        settings=settings,
        timing={"seconds": round(seconds, 3), "prompts": len(rows),
                "prompts_per_second": round(len(rows) / seconds, 2) if seconds > 0 else None, "cached": False},
        rows=suite_results + task_results,
    )
    if key is not None:
        score_cache.store_cached(key, report)
    return report


def score_against_base(
    base_model: torch.nn.Module,
    tuned_model: torch.nn.Module,
    tokenizer,
    suite: Suite | str | Path,
    max_drop: float | None = None,
    task: Suite | str | Path | None = None,
    text: str | Path | None = None,
    base_name: str = "base",
    tuned_name: str = "tuned",
    base_model_path: str | None = None,
    tuned_model_path: str | None = None,
    tuned_adapter_path: str | None = None,
    max_format_rigidity: float | None = None,
    gate: str = "significant",
    **score_kwargs,
) -> CapabilityReport:
    """Score both models (the base from the cache when it was scored before) and compare.

    Returns the tuned model's report with ``.forgetting`` filled; ``report.forgetting.passed``
    is the gate (``max_drop`` per category under the ``gate`` rule, "significant" or "point",
    ``max_format_rigidity`` on the rise of format rigidity).  The paths name what was scored in each report's ``model`` field (the tuned
    side: its model directory, or the base directory plus ``tuned_adapter_path``); the tuned
    weights are hashed even though they are not cached.  Extra keyword arguments go to
    ``score_model`` for both models.
    """
    suite = suite if isinstance(suite, str) and suite.startswith("lm-eval:") else _as_suite(suite)
    task = _as_suite(task) if task is not None else None
    score_kwargs.pop("cache", None)  # the base is always cached, the tuned model never (it is new)
    base_model_path = score_kwargs.pop("model_path", base_model_path)  # the older name of base_model_path
    score_kwargs.pop("adapter_path", None)
    base = score_model(base_model, tokenizer, suite, task=task, text=text, cache=True, run_name=base_name,
                       model_path=base_model_path, **score_kwargs)
    tuned = score_model(tuned_model, tokenizer, suite, task=task, text=text, run_name=tuned_name,
                        model_path=tuned_model_path, adapter_path=tuned_adapter_path, **score_kwargs)
    tuned.model["hash"] = tuned.model.get("hash") or score_cache.model_hash(tuned_model)
    tuned.forgetting = compare_reports(base, tuned, max_drop, max_format_rigidity, gate=gate)
    return tuned
