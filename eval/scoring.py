"""Text-level scoring rules: exact match, refusal and task-format detection.

Pure functions on strings, so the rules can be read and tested without a model.
"""
from __future__ import annotations

import re


def normalise(text: str) -> str:
    """The exact-match normalisation: strip, collapse runs of whitespace to one space, case-fold."""
    return " ".join(text.split()).casefold()


def first_line(text: str) -> str:
    """Generation stops at a newline; a token may carry text past it, which is dropped here."""
    return text.split("\n", 1)[0]


def exact_match(generated: str, answer: str) -> bool:
    """True when the first line of the greedy continuation equals the answer after normalisation."""
    return normalise(first_line(generated)) == normalise(answer)


def is_refusal(generated: str, refusal_pattern: re.Pattern | str) -> bool:
    """True when the answer contains a refusal (re.search; the pattern carries its own flags)."""
    pattern = re.compile(refusal_pattern) if isinstance(refusal_pattern, str) else refusal_pattern
    return pattern.search(first_line(generated)) is not None


def in_task_format(generated: str, task_format: re.Pattern | str) -> bool:
    """True when a (non-task) answer comes back in the target task's format.

    re.search on the stripped first line: anchor the regex (``^...$``) to require a
    whole-answer match, leave it open to detect a marker anywhere in the answer.
    """
    pattern = re.compile(task_format) if isinstance(task_format, str) else task_format
    return pattern.search(first_line(generated).strip()) is not None


def choice_prediction(logliks: list[float]) -> int:
    """Index of the highest summed log-likelihood; ties go to the first choice (deterministic)."""
    best = 0
    for i, value in enumerate(logliks):
        if value > logliks[best]:
            best = i
    return best
