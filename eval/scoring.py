"""Text-level scoring rules: answer matching, refusal and task-format detection.

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


def answer_matches(answer_text: str, match: str, answer: str | None = None, answers: list[str] | None = None,
                   pattern: re.Pattern | str | None = None) -> bool:
    """A generation row's rule on the text it was given (the first line for plain rows, which
    stop at a newline; the whole answer for chat rows):

    - ``exact``: equal to ``answer`` after :func:`normalise`;
    - ``contains``: the normalised ``answer`` occurs in the normalised text;
    - ``regex``: ``re.search`` of ``pattern`` (or ``answer`` compiled) on the text stripped of
      leading and trailing whitespace, case and inner spacing kept (the pattern carries its own
      flags, e.g. ``(?i)``);
    - ``any_of``: equal after normalisation to one of ``answers``.
    """
    if match == "exact":
        return normalise(answer_text) == normalise(answer or "")
    if match == "contains":
        return normalise(answer or "") in normalise(answer_text)
    if match == "regex":
        regex = pattern if pattern is not None else answer
        regex = re.compile(regex) if isinstance(regex, str) else regex
        return regex.search(answer_text.strip()) is not None
    if match == "any_of":
        got = normalise(answer_text)
        return any(got == normalise(a) for a in answers or [])
    raise ValueError(f"unknown match rule {match!r}")


def instructions_followed(response: str, prompt: str, instruction_ids: list[str], kwargs: list[dict],
                          key: int | str | None = None) -> bool:
    """An IFEval row's verdict: lm-evaluation-harness's strict test (every instruction followed,
    on the whole answer).  The checks are lm-eval's own (``eval/ifeval.py`` only imports them
    offline and pins their randomness); IFEvalUnavailable with the pip command without lm-eval."""
    from .ifeval import follows_instructions

    return all(follows_instructions(prompt, instruction_ids, kwargs, response, key=0 if key is None else key))


def is_refusal(generated: str, refusal_pattern: re.Pattern | str, whole_answer: bool = False) -> bool:
    """True when the answer contains a refusal (re.search; the pattern carries its own flags).

    Plain rows look at the first line (generation stops there); chat rows, whose answers are
    multi-line, at the whole answer (``whole_answer=True``).
    """
    pattern = re.compile(refusal_pattern) if isinstance(refusal_pattern, str) else refusal_pattern
    return pattern.search(generated if whole_answer else first_line(generated)) is not None


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
