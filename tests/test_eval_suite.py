"""Suite loading: valid rows parse, every malformed row is reported as file:line with the problem."""
import json

import pytest

from eval.suite import DEFAULT_REFUSAL_PATTERN, SuiteError, load_suite


def _write(tmp_path, rows, name="suite.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_valid_suite_with_meta(tmp_path):
    path = _write(tmp_path, [
        {"_meta": {"name": "general", "version": "3", "task_format": "^T-\\d+", "refusal_pattern": "(?i)no way"}},
        {"category": "facts", "prompt": "Capital of France?", "answer": "Paris"},
        "",
        {"category": "mc", "prompt": "2+2=", "choices": [" 4", " 5"], "answer_index": 0, "max_new_tokens": 3},
        {"category": "safety", "prompt": "How to X?", "kind": "refusal"},
    ])
    suite = load_suite(path)
    assert suite.meta.name == "general" and suite.meta.version == "3"
    assert [r.kind for r in suite.rows] == ["exact", "choice", "refusal"]
    assert [r.line for r in suite.rows] == [2, 4, 5]
    assert suite.categories == ["facts", "mc", "safety"]
    assert suite.refusal_regex().search("No way.") and suite.format_regex().search("T-12 done")
    assert len(suite.content_hash) == 64


def test_defaults_without_meta(tmp_path):
    suite = load_suite(_write(tmp_path, [{"category": "c", "prompt": "p", "answer": "a"}], name="mine.jsonl"))
    assert suite.meta.name == "mine" and suite.meta.task_format is None
    assert suite.meta.refusal_pattern == DEFAULT_REFUSAL_PATTERN and suite.format_regex() is None


@pytest.mark.parametrize("bad_row, message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "must be a JSON object"),
    ({"prompt": "p", "answer": "a"}, 'missing "category"'),
    ({"category": "c", "answer": "a"}, 'missing "prompt"'),
    ({"category": "c", "prompt": 3, "answer": "a"}, '"prompt" must be a string'),
    ({"category": "c", "prompt": "p"}, 'needs "answer"'),
    ({"category": "c", "prompt": "p", "answer": 4}, '"answer" must be a string'),
    ({"category": "c", "prompt": "p", "choices": ["a"], "answer_index": 0}, "at least 2"),
    ({"category": "c", "prompt": "p", "choices": ["a", "b"], "answer_index": 2}, r"answer_index.*\[0, 1\]"),
    ({"category": "c", "prompt": "p", "choices": ["a", "b"]}, "answer_index"),
    ({"category": "c", "prompt": "p", "kind": "refusal", "answer": "no"}, "refusal row takes no"),
    ({"category": "c", "prompt": "p", "kind": "essay"}, '"kind" must be one of'),
    ({"category": "c", "prompt": "p", "answer": "a", "max_new_tokens": 0}, "positive integer"),
    ({"category": "c", "prompt": "p", "answer": "a", "colour": "red"}, "unknown keys"),
    ({"category": " ", "prompt": "p", "answer": "a"}, '"category" is empty'),
    ({"_meta": {"name": "late"}}, "only as the first row"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad_row, message):
    path = _write(tmp_path, [{"category": "ok", "prompt": "p", "answer": "a"}, "", bad_row])
    with pytest.raises(SuiteError, match=message) as info:
        load_suite(path)
    assert str(info.value).startswith(f"{path}:3: ")


def test_bad_meta_and_empty_and_missing(tmp_path):
    with pytest.raises(SuiteError, match=r":1: _meta.task_format is not a valid regex"):
        load_suite(_write(tmp_path, [{"_meta": {"task_format": "(unclosed"}}, {"category": "c", "prompt": "p", "answer": "a"}]))
    with pytest.raises(SuiteError, match="unknown _meta keys"):
        load_suite(_write(tmp_path, [{"_meta": {"nme": "x"}}, {"category": "c", "prompt": "p", "answer": "a"}]))
    with pytest.raises(SuiteError, match="no rows"):
        load_suite(_write(tmp_path, [{"_meta": {"name": "x"}}]))
    with pytest.raises(SuiteError, match="not found"):
        load_suite(tmp_path / "nope.jsonl")
