"""forgetless eval: capability suites, forgetting scores, and a regression gate for CI.

The public API (imported lazily, so ``eval.sequences`` and ``eval.compare`` do not pay for torch):

- ``load_suite(path) -> Suite``; ``shipped_suite("chat_general")`` -> the path of a suite that ships with eval
- ``score_model(model, tokenizer, suite, task=None, text=None, batch_size=64, ...) -> CapabilityReport``
- ``score_against_base(base_model, tuned_model, tokenizer, suite, max_drop=None, ...) -> CapabilityReport``
- ``compare_reports(base, tuned, max_drop=None, max_format_rigidity=None, gate="significant") -> ForgettingReport``
  (``.passed``; paired intervals and McNemar p per category: eval/paired.py)
- ``write_report(report, out_path)``: REPORT.json + REPORT.md + REPORT.png; ``read_report(path)``
- ``sequence_metrics(R) -> SequenceMetrics`` (ACC, BWT, forgetting over a task sequence)

See eval/README.md for the suite format, the report schema and the commands.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_suite": "suite", "Suite": "suite", "SuiteError": "suite", "shipped_suite": "suite",
    "ChatTemplateError": "chat",
    "score_model": "capability", "score_against_base": "capability",
    "compare_reports": "gate", "gate_message": "gate",
    "CapabilityReport": "report", "ForgettingReport": "report", "ReportError": "report", "read_report": "report",
    "write_report": "render",
    "sequence_metrics": "sequences", "SequenceMetrics": "sequences",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'eval' has no attribute {name!r}")
