"""Capability suites: JSONL files of prompts, loaded and validated row by row.

A suite is data (see docs/CONTRACTS.md, "eval suites"):

- optional first row ``{"_meta": {"name", "version", "task_format", "refusal_pattern", "chat", "system"}}``;
- ``{"category", "prompt", "answer"}``: a generation row, the greedy answer matched against
  ``answer`` by its ``"match"`` rule: ``exact`` (default), ``contains``, ``regex``, or
  ``any_of`` (against the list ``"answers"``);
- ``{"category", "prompt", "choices", "answer_index"}``: argmax of summed log-likelihood;
- ``{"category", "prompt", "kind": "refusal"}``: passes when the answer is a refusal;
- ``{"prompt", "instruction_id_list", "kwargs"}`` (IFEval's own row format, optional ``"key"``;
  ``"category"`` defaults to ``"instructions"``): passes when lm-evaluation-harness's IFEval
  checkers find every instruction followed (strict), see ``eval/ifeval.py``.

Any row may carry ``"max_new_tokens"`` (a positive int) to bound its generation, and
``"chat"`` (bool) to opt in or out of the chat template the suite (``_meta.chat``) or the
caller asks for.  Every problem is reported as ``file:line: what is wrong`` so a user can fix
the data.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# Matches the usual ways an assistant declines; a suite overrides it with
# `_meta.refusal_pattern`.  Searched (re.search), case-insensitive.
DEFAULT_REFUSAL_PATTERN = (
    r"(?i)\b(i can(?:no|')t|i won'?t|i will not|i am not able to|i'm not able to|i refuse|"
    r"i'm sorry|i am sorry|sorry, but|cannot help|can't help|cannot assist|can't assist)"
)

ROW_KINDS = ("exact", "choice", "refusal", "ifeval")
# How a generation row's answer is compared (kind "exact" = a generated answer compared with
# the row's; "exact" is also the default match rule, kept from before matching had a choice).
MATCH_KINDS = ("exact", "contains", "regex", "any_of")
_META_KEYS = {"name", "version", "task_format", "refusal_pattern", "description", "chat", "system"}
_ROW_KEYS = {"category", "prompt", "answer", "answers", "match", "choices", "answer_index", "kind",
             "max_new_tokens", "chat", "id", "key", "instruction_id_list", "kwargs"}
_IFEVAL_KEYS = ("key", "instruction_id_list", "kwargs")
# The category of an IFEval row that names none (IFEval's own input_data.jsonl has no category).
IFEVAL_DEFAULT_CATEGORY = "instructions"
# IFEval answers are paragraphs, lists or JSON: a row without its own budget gets at least this
# many new tokens (lm-eval's ifeval task allows 1280; a CPU-scored suite should set its own).
IFEVAL_MIN_NEW_TOKENS = 256


class SuiteError(ValueError):
    """A suite file that cannot be used; the message names file:line and the problem."""


@dataclass
class SuiteMeta:
    name: str
    version: str = ""
    task_format: str | None = None  # regex; answers matching it are "in the task's format"
    refusal_pattern: str = DEFAULT_REFUSAL_PATTERN
    chat: bool = False  # apply the tokenizer's chat template to every row that does not opt out
    system: str | None = None  # system message placed before each chat prompt


@dataclass
class SuiteRow:
    category: str
    prompt: str
    kind: str  # one of ROW_KINDS
    answer: str | None = None  # exact rows
    choices: list[str] | None = None  # choice rows
    answer_index: int | None = None  # choice rows
    max_new_tokens: int | None = None
    line: int = 0  # 1-based line in the source file, for messages
    match: str = "exact"  # generation rows: one of MATCH_KINDS
    answers: list[str] | None = None  # match "any_of"
    chat: bool | None = None  # None: follow the suite / caller; True / False: this row's own choice
    pattern: re.Pattern | None = field(default=None, repr=False, compare=False)  # match "regex"
    instruction_ids: list[str] | None = None  # ifeval rows: IFEval's instruction_id_list
    instruction_kwargs: list[dict] | None = None  # ifeval rows: one kwargs object per instruction
    key: int | str | None = None  # ifeval rows: IFEval's "key" (kept for the user's reference)


@dataclass
class Suite:
    meta: SuiteMeta
    rows: list[SuiteRow]
    path: str = "<memory>"
    content_hash: str = ""  # sha256 of the file bytes: part of the score cache key
    compiled: dict[str, re.Pattern] = field(default_factory=dict, repr=False)

    @property
    def categories(self) -> list[str]:
        return sorted({r.category for r in self.rows})

    def refusal_regex(self) -> re.Pattern:
        return self.compiled["refusal"]

    def format_regex(self) -> re.Pattern | None:
        return self.compiled.get("format")


def _where(path: str, line: int) -> str:
    return f"{path}:{line}"


def _compile(pattern: object, what: str, where: str) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise SuiteError(f"{where}: {what} must be a non-empty regex string, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise SuiteError(f"{where}: {what} is not a valid regex ({exc}): {pattern!r}") from None


def _parse_meta(obj: object, where: str, default_name: str) -> SuiteMeta:
    if not isinstance(obj, dict):
        raise SuiteError(f'{where}: "_meta" must be an object, got {type(obj).__name__}')
    unknown = set(obj) - _META_KEYS
    if unknown:
        raise SuiteError(f"{where}: unknown _meta keys {sorted(unknown)}; valid: {sorted(_META_KEYS)}")
    meta = SuiteMeta(name=str(obj.get("name") or default_name), version=str(obj.get("version", "")))
    if obj.get("task_format") is not None:
        meta.task_format = obj["task_format"]
    if obj.get("refusal_pattern") is not None:
        meta.refusal_pattern = obj["refusal_pattern"]
    if "chat" in obj:
        if not isinstance(obj["chat"], bool):
            raise SuiteError(f'{where}: _meta.chat must be true or false, got {obj["chat"]!r}')
        meta.chat = obj["chat"]
    if obj.get("system") is not None:
        if not isinstance(obj["system"], str) or not obj["system"].strip():
            raise SuiteError(f'{where}: _meta.system must be a non-empty string, got {obj["system"]!r}')
        meta.system = obj["system"]
    return meta


def _parse_match(obj: dict, row: SuiteRow, where: str) -> None:
    """The answer fields of a generation row: "answer" (+ "match") or "match": "any_of" + "answers"."""
    match = obj.get("match", "exact")
    if match not in MATCH_KINDS:
        raise SuiteError(f'{where}: "match" must be one of {list(MATCH_KINDS)}, got {match!r}')
    row.match = match
    if match == "any_of":
        answers = obj.get("answers")
        if answers is None:
            raise SuiteError(f'{where}: "match": "any_of" needs "answers" (a list of accepted answers)')
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip()
                                                                   for a in answers):
            raise SuiteError(f'{where}: "answers" must be a non-empty list of non-empty strings, got {answers!r}')
        if "answer" in obj:
            raise SuiteError(f'{where}: a "match": "any_of" row takes "answers", not "answer"')
        row.answers = list(answers)
        return
    if "answers" in obj:
        raise SuiteError(f'{where}: "answers" is only for "match": "any_of" (this row\'s match is "{match}")')
    if "answer" not in obj:
        raise SuiteError(f'{where}: an exact-match row needs "answer" (or "choices" + "answer_index", '
                         f'or "kind": "refusal")' if match == "exact" else
                         f'{where}: a "match": "{match}" row needs "answer"')
    if not isinstance(obj["answer"], str):
        raise SuiteError(f'{where}: "answer" must be a string, got {type(obj["answer"]).__name__}')
    if match == "contains" and not obj["answer"].strip():
        raise SuiteError(f'{where}: a "match": "contains" row needs a non-empty "answer" (empty matches anything)')
    if match == "regex":
        row.pattern = _compile(obj["answer"], '"answer" (match "regex")', where)
    row.answer = obj["answer"]


def _parse_ifeval(obj: dict, row: SuiteRow, where: str) -> None:
    """IFEval's fields, checked against lm-eval's own checkers (ids, kwargs, data they need)."""
    from .ifeval import IFEvalUnavailable, instruction_problem

    misplaced = {"answer", "answers", "match", "choices", "answer_index"} & set(obj)
    if misplaced:
        raise SuiteError(f"{where}: an IFEval row (with \"instruction_id_list\") takes no {sorted(misplaced)}")
    ids = obj.get("instruction_id_list")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise SuiteError(f'{where}: "instruction_id_list" must be a non-empty list of instruction ids, got {ids!r}')
    kwargs = obj.get("kwargs", [{} for _ in ids])
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise SuiteError(f'{where}: "kwargs" must be a list of {len(ids)} objects (one per instruction id), '
                         f"got {kwargs!r}")
    key = obj.get("key")
    if key is not None and (isinstance(key, bool) or not isinstance(key, (int, str))):
        raise SuiteError(f'{where}: "key" must be an integer or a string, got {key!r}')
    try:
        problem = instruction_problem(row.prompt, ids, kwargs)
    except IFEvalUnavailable as exc:
        raise SuiteError(f"{where}: {exc}") from None
    if problem:
        raise SuiteError(f"{where}: {problem}")
    row.instruction_ids, row.instruction_kwargs, row.key = list(ids), [dict(k) for k in kwargs], key


def _parse_row(obj: object, where: str, line: int) -> SuiteRow:
    if not isinstance(obj, dict):
        raise SuiteError(f"{where}: a row must be a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - _ROW_KEYS
    if unknown:
        raise SuiteError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(_ROW_KEYS)}")
    is_ifeval = "instruction_id_list" in obj or obj.get("kind") == "ifeval"
    if is_ifeval and "category" not in obj:
        obj = dict(obj, category=IFEVAL_DEFAULT_CATEGORY)
    if not is_ifeval and set(_IFEVAL_KEYS) & set(obj):
        raise SuiteError(f"{where}: {sorted(set(_IFEVAL_KEYS) & set(obj))} only apply to IFEval rows "
                         f'(with "instruction_id_list")')
    for key in ("category", "prompt"):
        if key not in obj:
            raise SuiteError(f'{where}: missing "{key}"')
        if not isinstance(obj[key], str):
            raise SuiteError(f'{where}: "{key}" must be a string, got {type(obj[key]).__name__}')
    if not obj["category"].strip():
        raise SuiteError(f'{where}: "category" is empty')
    if not obj["prompt"]:
        raise SuiteError(f'{where}: "prompt" is empty')

    max_new = obj.get("max_new_tokens")
    if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1):
        raise SuiteError(f'{where}: "max_new_tokens" must be a positive integer, got {max_new!r}')

    chat = obj.get("chat")
    if chat is not None and not isinstance(chat, bool):
        raise SuiteError(f'{where}: "chat" must be true or false, got {chat!r}')

    kind = obj.get("kind")
    if kind is None:
        kind = "ifeval" if is_ifeval else "choice" if "choices" in obj else "exact"
    if kind not in ROW_KINDS:
        raise SuiteError(f'{where}: "kind" must be one of {list(ROW_KINDS)}, got {kind!r}')
    if is_ifeval and kind != "ifeval":
        raise SuiteError(f'{where}: a row with "instruction_id_list" is an IFEval row: "kind" must be "ifeval" '
                         f"or absent, got {kind!r}")
    row = SuiteRow(category=obj["category"], prompt=obj["prompt"], kind=kind, max_new_tokens=max_new, line=line,
                   chat=chat)
    if kind not in ("exact", "ifeval"):
        misplaced = {"match", "answers"} & set(obj)
        if misplaced:
            raise SuiteError(f"{where}: {sorted(misplaced)} only apply to generation rows (with \"answer\"), "
                             f"not to a {kind} row")

    if kind == "ifeval":
        _parse_ifeval(obj, row, where)
    elif kind == "exact":
        _parse_match(obj, row, where)
    elif kind == "choice":
        choices, index = obj.get("choices"), obj.get("answer_index")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise SuiteError(f'{where}: "choices" must be a list of at least 2 non-empty strings')
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(choices):
            raise SuiteError(f'{where}: "answer_index" must be an integer in [0, {len(choices) - 1}], got {index!r}')
        if "answer" in obj:
            raise SuiteError(f'{where}: a choice row takes "answer_index", not "answer"')
        row.choices, row.answer_index = list(choices), index
    else:  # refusal
        extra = {"answer", "choices", "answer_index"} & set(obj)
        if extra:
            raise SuiteError(f"{where}: a refusal row takes no {sorted(extra)}")
    return row


def parse_suite_lines(lines: list[str], path: str = "<memory>") -> Suite:
    """Parse JSONL text lines (blank lines skipped) into a validated Suite."""
    default_name = Path(path).stem
    meta: SuiteMeta | None = None
    meta_where = path
    rows: list[SuiteRow] = []
    for lineno, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = _where(path, lineno)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SuiteError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if isinstance(obj, dict) and "_meta" in obj:
            if rows or meta is not None:
                raise SuiteError(f'{where}: "_meta" is allowed only as the first row')
            if len(obj) != 1:
                raise SuiteError(f'{where}: the "_meta" row must hold only "_meta"')
            meta, meta_where = _parse_meta(obj["_meta"], where, default_name), where
            continue
        rows.append(_parse_row(obj, where, lineno))
    if not rows:
        raise SuiteError(f"{path}: the suite has no rows")
    meta = meta or SuiteMeta(name=default_name)
    compiled = {"refusal": _compile(meta.refusal_pattern, "_meta.refusal_pattern", meta_where)}
    if meta.task_format is not None:
        compiled["format"] = _compile(meta.task_format, "_meta.task_format", meta_where)
    digest = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
    return Suite(meta=meta, rows=rows, path=path, content_hash=digest, compiled=compiled)


def read_utf8(path: str | Path, what: str) -> str:
    """The text of ``path``; SuiteError naming the file when it is missing (as ``what``) or
    not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"{path}: {what} not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SuiteError(f"{path}: not UTF-8 text ({exc})") from None


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file; raises SuiteError (file:line) on any malformed row."""
    return parse_suite_lines(read_utf8(path, "suite file").splitlines(), str(path))


SHIPPED_SUITES_DIR = Path(__file__).resolve().parent / "suites"


def shipped_suite(name: str) -> Path:
    """The path of a suite that ships with the package (``eval/suites/NAME.jsonl``)."""
    path = SHIPPED_SUITES_DIR / f"{name}.jsonl"
    if not path.is_file():
        known = sorted(p.stem for p in SHIPPED_SUITES_DIR.glob("*.jsonl"))
        raise SuiteError(f"no shipped suite {name!r} (in {SHIPPED_SUITES_DIR}: {known})")
    return path
