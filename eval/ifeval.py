"""IFEval rows: lm-evaluation-harness's own instruction checkers, loaded so they never touch the network.

A suite row in IFEval's format (``instruction_id_list`` + ``kwargs``, as in IFEval's
``input_data.jsonl``) is scored with ``lm_eval.tasks.ifeval.utils.test_instruction_following_strict``:
the response is correct when it follows every instruction (IFEval's prompt-level strict
accuracy).  Nothing here re-implements a check; this module only imports lm-eval safely, seeds
its randomness and turns its failures into messages that name the instruction.

Why the import is guarded: ``lm_eval/tasks/ifeval/instructions_util.py`` calls
``nltk.download("punkt_tab")`` at import time when that tokenizer is not installed, which needs
the network (and can hang behind a firewall).  Only two checkers ever use it
(``length_constraints:number_sentences`` and ``change_case:capital_word_frequency``), so the
import runs with ``nltk.download`` replaced by a stub that downloads nothing; those two then
raise nltk's ``LookupError`` when used, which :func:`instruction_problem` reports at load time
(with the one command that installs the data), so a suite that needs it fails before any model
loads.  Every other checker runs on the text alone (``langdetect`` ships its language profiles).

Why randomness is pinned: ``langdetect`` (``change_case:english_lowercase`` / ``english_capital``
/ ``language:response_language``) is random unless seeded, so a short answer could pass on one
run and fail on the next; a checker built without some of its kwargs draws them from Python's
global ``random``.  Both are seeded for every check and the global random state is restored
afterwards, so the same answer always gets the same verdict and the caller's RNG is untouched.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import io
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from unittest import mock

LM_EVAL_PIP = ('pip install "forgetless[lm-eval]"   '
               '(or: pip install "lm-eval>=0.4.9" langdetect immutabledict "nltk>=3.9.1")')
NLTK_DATA_HINT = "python -m nltk.downloader punkt_tab punkt"
# What a checker is given at load time to find out whether it runs here (it must not need data).
_PROBE_RESPONSE = "A short probe answer. It has two sentences."


class IFEvalUnavailable(ImportError):
    """lm-evaluation-harness (or one of its IFEval dependencies) is not installed."""


@dataclass(frozen=True)
class IFEvalLibrary:
    """The parts of lm-eval that score IFEval rows."""

    registry: dict  # instruction id -> checker class (lm_eval's INSTRUCTION_DICT)
    input_example: type  # lm_eval.tasks.ifeval.utils.InputExample
    strict: Callable  # lm_eval.tasks.ifeval.utils.test_instruction_following_strict


@functools.lru_cache(maxsize=1)
def ifeval_library() -> IFEvalLibrary:
    """Import lm-eval's IFEval checkers without any download; IFEvalUnavailable when missing."""
    try:
        import langdetect
        import nltk
    except ImportError as exc:
        raise IFEvalUnavailable(f"IFEval rows are scored by lm-evaluation-harness's instruction checkers, "
                                f"which need {exc.name!r}: {LM_EVAL_PIP}") from None

    def no_download(*args, **kwargs) -> bool:  # nltk.download's "failed" return value
        return False

    try:
        # lm-eval prints "Downloaded punkt_tab" even when the download did not happen: swallow it.
        with mock.patch.object(nltk, "download", no_download), contextlib.redirect_stdout(io.StringIO()):
            from lm_eval.tasks.ifeval import instructions_registry, utils
    except (ImportError, AssertionError) as exc:  # AssertionError: lm-eval refuses nltk < 3.9.1 at import
        raise IFEvalUnavailable(f"IFEval rows are scored by lm-evaluation-harness's instruction checkers "
                                f"(lm_eval.tasks.ifeval), which could not be imported ({exc}): {LM_EVAL_PIP}") from None
    langdetect.DetectorFactory.seed = 0  # deterministic language detection (see the module docstring)
    return IFEvalLibrary(registry=dict(instructions_registry.INSTRUCTION_DICT), input_example=utils.InputExample,
                         strict=utils.test_instruction_following_strict)


@contextlib.contextmanager
def _pinned_random(seed: int = 0) -> Iterator[None]:
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def known_instruction_ids() -> list[str]:
    return sorted(ifeval_library().registry)


def unknown_instruction(instruction_id: str) -> str:
    """The message for an id with no checker, with the closest known ids."""
    known = known_instruction_ids()
    close = difflib.get_close_matches(instruction_id, known, n=3, cutoff=0.5)
    hint = f"closest: {close}" if close else f"known ids: {known}"
    return f"IFEval instruction id {instruction_id!r} has no checker in lm-eval's instructions_registry ({hint})"


def follows_instructions(prompt: str, instruction_ids: list[str], kwargs: list[dict], response: str,
                         key: int | str = 0) -> list[bool]:
    """lm-eval's strict verdict per instruction: ``all(...)`` is IFEval's prompt-level strict accuracy."""
    lib = ifeval_library()
    example = lib.input_example(key=key, instruction_id_list=list(instruction_ids), prompt=prompt,
                                kwargs=[dict(k) for k in kwargs])
    with _pinned_random():
        out = lib.strict(example, response)
    return list(out.follow_instruction_list)


def _missing_resource(exc: LookupError) -> str:
    found = re.search(r"Resource\s+'?([\w/.]+)'?\s+not found", str(exc))
    return found.group(1) if found else "an NLTK resource"


def instruction_problem(prompt: str, instruction_ids: list[str], kwargs: list[dict]) -> str | None:
    """Why this IFEval row cannot be scored here (None when it can): an id with no checker,
    kwargs its checker rejects, or a checker that needs NLTK data not installed.  Found by
    building every checker with the row's kwargs and running lm-eval's own strict test on a
    probe answer, so what is checked is exactly what scoring will run."""
    registry = ifeval_library().registry
    for instruction_id in instruction_ids:
        if instruction_id not in registry:
            return unknown_instruction(instruction_id)
    for instruction_id, kw in zip(instruction_ids, kwargs, strict=True):  # one at a time: name the culprit
        try:
            follows_instructions(prompt, [instruction_id], [kw], _PROBE_RESPONSE)
        except LookupError as exc:
            return (f"IFEval instruction {instruction_id!r} needs NLTK data that is not installed "
                    f"({_missing_resource(exc)}); install it once with: {NLTK_DATA_HINT}")
        except Exception as exc:  # noqa: BLE001 - any failure of a checker on its kwargs is the row's problem
            return f"lm-eval's checker for {instruction_id!r} rejects kwargs {kw!r}: {type(exc).__name__}: {exc}"
    return None
