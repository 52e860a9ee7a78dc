"""The large general suite (eval/general_suite.py -> eval/suites/chat_general_large.jsonl) and IFEval rows.

- the generator is deterministic and the committed file is exactly what it writes;
- every category has 200+ rows within its token budget;
- every row's own matcher accepts a hand-written correct answer and rejects a wrong one (table
  rows: the table's answer passes and another row's answer fails);
- the IFEval rows are verified by lm-evaluation-harness's own checkers on hand-written compliant
  and non-compliant answers, and eval's verdict equals lm-eval's;
- a file in IFEval's own format (no category) loads; a bad instruction id is a FILE:LINE error;
- IFEval rows score end to end on a tiny model, their answers stored in the report.
"""
from __future__ import annotations

import collections
import fnmatch
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from test_chat_eval import chatml_tokenizer, constant_llama
from test_eval_generate import _one_thread  # noqa: F401 (autouse fixture)

from eval import general_suite
from eval.scoring import answer_matches, instructions_followed, is_refusal
from eval.suite import SuiteError, load_suite, parse_suite_lines, shipped_suite

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "eval" / "suites" / "chat_general_large.jsonl"
HAS_LM_EVAL = all(importlib.util.find_spec(m) is not None for m in ("lm_eval", "langdetect", "immutabledict", "nltk"))
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason='needs pip install -e ".[lm-eval]"')


@pytest.fixture(scope="module")
def generated():
    return general_suite.generate(0)


@pytest.fixture(scope="module")
def shipped(generated):
    """The committed file, loaded as a suite (without lm-eval: every row but the IFEval ones)."""
    if HAS_LM_EVAL:
        suite = load_suite(SHIPPED)
        assert len(suite.rows) == len(generated)
        return suite
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    return parse_suite_lines([line for line in lines if '"instruction_id_list"' not in line], str(SHIPPED))


def _rows_by_category(suite, generated, category):
    """(loaded row, generated row) pairs of one category, matched by prompt (prompts are unique)."""
    loaded = {r.prompt: r for r in suite.rows}
    return [(loaded[g.row["prompt"]], g) for g in generated if g.row["category"] == category]


# ----------------------------------------------------------------------------- the generator


def test_generator_is_deterministic_and_the_committed_file_is_its_output(tmp_path):
    first, second = general_suite.suite_text(0), general_suite.suite_text(0)
    assert first == second
    assert SHIPPED.read_text(encoding="utf-8") == first, \
        "regenerate: python -m eval.general_suite --out eval/suites/chat_general_large.jsonl --seed 0"
    assert general_suite.suite_text(1) != first  # the seed does choose the rows
    out = tmp_path / "suite.jsonl"
    assert general_suite.main(["--out", str(out), "--seed", "0"]) == 0
    assert out.read_bytes() == SHIPPED.read_bytes()
    assert general_suite.main(["--out", str(tmp_path / "missing" / "x.jsonl")]) == 2


def test_row_counts_budgets_and_shipping():
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    meta, rows = json.loads(lines[0])["_meta"], [json.loads(line) for line in lines[1:]]
    assert meta["chat"] is True and meta["name"] == "chat_general_large"
    counts = collections.Counter(r["category"] for r in rows)
    assert set(counts) == set(general_suite.CATEGORIES)
    assert all(200 <= n <= 240 for n in counts.values()), counts
    budget_limit = {"knowledge": 24, "language": 24, "arithmetic": 64, "instructions": 96, "safety": 48, "chat": 64}
    for r in rows:
        assert 1 <= r["max_new_tokens"] <= budget_limit[r["category"]], r
    assert len({r["prompt"] for r in rows}) == len(rows)  # no prompt twice
    assert SHIPPED.stat().st_size < 1_500_000
    assert shipped_suite("chat_general_large") == SHIPPED.resolve()
    setup = (ROOT / "setup.py").read_text()
    assert '"eval": ["suites/*.jsonl"]' in setup and fnmatch.fnmatch("suites/chat_general_large.jsonl", "suites/*.jsonl")
    # the arithmetic mix: one-step, two-step and three-step word problems
    families = collections.Counter(g.group.split(":")[0] for g in general_suite.generate(0)
                                   if g.row["category"] == "arithmetic")
    assert families == {"one_step": 80, "two_step": 80, "three_step": 60}


@pytest.mark.parametrize("n, good, bad", [
    (42, ["42", "It is 42.", "forty-two", "Forty two apples", "$42"], ["142", "420", "4.2", "42.5", "1,042", "24"]),
    (4, ["4", "four", "2 + 2 = 4."], ["14", "fourteen", "twenty-four", "40"]),
    (1000, ["1000", "1,000", "one thousand", "a thousand"], ["10000", "100"]),
    (100, ["100", "one hundred", "a hundred"], ["1000", "one hundred and one"]),
])
def test_number_pattern_by_hand(n, good, bad):
    pattern = general_suite.number_pattern(n)
    assert all(answer_matches(t, "regex", pattern) for t in good)
    assert not any(answer_matches(t, "regex", pattern) for t in bad)


def test_word_and_symbol_patterns_by_hand():
    assert answer_matches("The capital is New Delhi.", "regex", general_suite.words_pattern(["New Delhi", "Delhi"]))
    assert not answer_matches("Mumbai", "regex", general_suite.words_pattern(["New Delhi", "Delhi"]))
    assert answer_matches("J.K. Rowling wrote it", "regex", general_suite.words_pattern(["J. K. Rowling"]))
    gold = general_suite.symbol_pattern("Au")
    assert answer_matches("Its symbol is Au.", "regex", gold)
    assert not any(answer_matches(t, "regex", gold) for t in ["In August", "au", "Ag"])
    carbon = general_suite.symbol_pattern("C")
    assert answer_matches("C", "regex", carbon) and not answer_matches("Cl and Ca", "regex", carbon)


# ----------------------------------------------------------------------------- every row's matcher


def _wrong_reference(row, candidates):
    """The first other row of ``candidates`` whose canonical answer this row does not accept."""
    accepted = {a.casefold() for a in row.accepted}
    for other in candidates:
        if other is not row and other.reference.casefold() not in accepted:
            return other.reference
    raise AssertionError(f"no wrong answer for {row.row['prompt']}")


@pytest.mark.parametrize("category", ["knowledge", "arithmetic", "language"])
def test_table_rows_accept_their_answer_and_reject_another_rows(shipped, generated, category):
    pairs = _rows_by_category(shipped, generated, category)
    assert len(pairs) >= 200
    by_group = collections.defaultdict(list)
    for _, g in pairs:
        by_group[g.group].append(g)
    for suite_row, g in pairs:
        assert suite_row.prompt == g.row["prompt"] and suite_row.match == "regex"
        for correct in (f"The answer is {g.reference}.", g.reference, f"I believe it's {g.reference}, yes."):
            assert answer_matches(correct, "regex", pattern=suite_row.pattern), (g.row["prompt"], correct)
        # a wrong answer of the same kind (another capital, another plural...) and one of another group
        same = by_group[g.group][by_group[g.group].index(g) + 1:] + by_group[g.group]
        others = [o for _, o in pairs if o.group != g.group]
        for wrong in (_wrong_reference(g, same), _wrong_reference(g, others)):
            assert not answer_matches(f"The answer is {wrong}.", "regex", pattern=suite_row.pattern), \
                (g.row["prompt"], wrong)
        if category == "arithmetic":  # off by one either way
            n = int(g.reference)
            for wrong in (n - 1, n + 1):
                assert not answer_matches(f"So the answer is {wrong}.", "regex", pattern=suite_row.pattern)


def test_chat_rows_accept_their_topic_and_reject_every_other_topic(shipped, generated):
    pairs = _rows_by_category(shipped, generated, "chat")
    assert len(pairs) >= 200
    references = {g.group: g.reference for _, g in pairs}
    assert len(references) >= 25
    for suite_row, g in pairs:
        assert answer_matches(g.reference, "regex", pattern=suite_row.pattern), g.row["prompt"]
        for group, other in references.items():
            if group != g.group:
                assert not answer_matches(other, "regex", pattern=suite_row.pattern), (g.row["prompt"], other)
        assert not answer_matches("TICKET-1042: status open, priority low.", "regex", pattern=suite_row.pattern)


def test_safety_rows_pass_a_refusal_and_fail_compliance(shipped, generated):
    pairs = _rows_by_category(shipped, generated, "safety")
    assert len(pairs) >= 200 and all(s.kind == "refusal" for s, _ in pairs)
    refusal = shipped.refusal_regex()
    for refused in ["I'm sorry, but I can't help with that.", "I cannot assist with this request.",
                    "Sorry, but that is something I won't do."]:
        assert is_refusal(refused, refusal, whole_answer=True)
    for complied in ["Sure! Here are the steps:\n1. First, get the materials.", "Step 1: open the tool."]:
        assert not is_refusal(complied, refusal, whole_answer=True)
    intents = collections.Counter(g.group for _, g in pairs)
    assert len(intents) >= 35 and max(intents.values()) - min(intents.values()) <= 1  # balanced over intents


# ----------------------------------------------------------------------------- IFEval rows

BASE_ANSWER = "the weather today is calm and clear"  # English, lowercase, no comma, 7 words


def compliant_answer(ids: list[str], kwargs: list[dict]) -> str:
    """A hand-written answer that follows every instruction of the row."""
    k = dict(zip(ids, kwargs, strict=True))
    text = "My answer is yes." if "detectable_format:constrained_response" in k else BASE_ANSWER
    if "keywords:existence" in k:
        text += " " + " ".join(k["keywords:existence"]["keywords"])
    if "keywords:frequency" in k:
        text += f" {k['keywords:frequency']['keyword']}" * k["keywords:frequency"]["frequency"]
    if "detectable_content:number_placeholders" in k:
        text += " [name]" * k["detectable_content:number_placeholders"]["num_placeholders"]
    if "detectable_format:number_highlighted_sections" in k:
        text += " *a calm day*" * k["detectable_format:number_highlighted_sections"]["num_highlights"]
    if "detectable_format:title" in k:
        text = f"<<a calm day>>\n{text}"
    if "detectable_content:postscript" in k:
        text += f"\n{k['detectable_content:postscript']['postscript_marker']} see you soon"
    if "startend:end_checker" in k:
        text += " " + k["startend:end_checker"]["end_phrase"]
    if "detectable_format:number_bullet_lists" in k:
        text = "\n".join(f"* {text}" for _ in range(k["detectable_format:number_bullet_lists"]["num_bullets"]))
    if "detectable_format:multiple_sections" in k:
        marker = k["detectable_format:multiple_sections"]["section_spliter"]
        text = "\n".join(f"{marker} {i}\n{text}" for i in range(1, 3))
    if "length_constraints:number_paragraphs" in k:
        text = f"{text}\n***\n{text}"
    if "combination:two_responses" in k:
        text = f"{text}\n******\nthe night is dark and quiet"
    if "combination:repeat_prompt" in k:
        text = f"{k['combination:repeat_prompt']['prompt_to_repeat']} {text}"
    if "change_case:english_lowercase" in k:
        text = text.lower()
    if "change_case:english_capital" in k:
        text = text.upper()
    if "startend:quotation" in k:
        text = f'"{text}"'
    if "detectable_format:json_format" in k:
        text = json.dumps({"answer": text})
    return text


def violating_answer(instruction_id: str, kwargs: dict) -> str:
    """A hand-written answer that breaks ``instruction_id``."""
    return {
        "change_case:english_lowercase": "The Weather Today Is Calm And Clear.",
        "change_case:english_capital": "the weather today is calm and clear.",
        "length_constraints:number_words": " ".join(["word"] * kwargs.get("num_words", 1)),
        "keywords:existence": "I have nothing to add.",
        "keywords:frequency": "I have nothing to add.",
        "keywords:forbidden_words": f"I like {kwargs.get('forbidden_words', ['x'])[0]} a lot.",
        "startend:end_checker": f"{kwargs.get('end_phrase')} And one more thing.",
        "startend:quotation": "not quoted",
        "detectable_format:json_format": "this is {not json",
        "detectable_format:number_bullet_lists": "* only one point",
        "punctuation:no_comma": "yes, with a comma",
        "detectable_content:postscript": "no postscript here",
        "detectable_format:title": "no title here",
        "detectable_content:number_placeholders": "no placeholders here",
        "combination:repeat_prompt": f"Sure. {kwargs.get('prompt_to_repeat')}",
        "detectable_format:constrained_response": "Yes it is.",
        "detectable_format:number_highlighted_sections": "nothing highlighted",
        "combination:two_responses": "only one response",
        "detectable_format:multiple_sections": "no sections",
        "length_constraints:number_paragraphs": "one paragraph only",
    }[instruction_id]


def _lm_eval_strict(prompt, ids, kwargs, response):
    """lm-eval's own strict test (lm_eval.tasks.ifeval.utils), called directly."""
    from eval.ifeval import ifeval_library

    lib = ifeval_library()
    example = lib.input_example(key=0, instruction_id_list=ids, prompt=prompt, kwargs=kwargs)
    return lib.strict(example, response)


@needs_lm_eval
def test_ifeval_rows_verified_by_lm_eval_checkers(shipped, generated):
    pairs = _rows_by_category(shipped, generated, "instructions")
    assert len(pairs) >= 200 and all(s.kind == "ifeval" for s, _ in pairs)
    used = collections.Counter(i for s, _ in pairs for i in s.instruction_ids)
    assert len(used) >= 15 and sum(len(s.instruction_ids) == 2 for s, _ in pairs) >= 20
    for suite_row, g in pairs:
        ids, kwargs = suite_row.instruction_ids, suite_row.instruction_kwargs
        assert ids == g.row["instruction_id_list"] and kwargs == g.row["kwargs"]
        good = compliant_answer(ids, kwargs)
        reference = _lm_eval_strict(suite_row.prompt, ids, kwargs, good)
        assert reference.follow_all_instructions, (suite_row.prompt, good, reference.follow_instruction_list)
        assert instructions_followed(good, suite_row.prompt, ids, kwargs, suite_row.key)
        bad = violating_answer(ids[0], kwargs[0])
        reference = _lm_eval_strict(suite_row.prompt, ids, kwargs, bad)
        assert reference.follow_instruction_list[0] is False, (suite_row.prompt, bad)
        assert not instructions_followed(bad, suite_row.prompt, ids, kwargs, suite_row.key)


IFEVAL_STYLE_ROWS = [  # as IFEval's input_data.jsonl writes them, and as the HF dataset does (None kwargs)
    {"key": 1000, "prompt": "Write a short summary of a walk in the park. Do not use any commas and highlight at "
     "least 2 sections, for example *highlighted section part 1*.",
     "instruction_id_list": ["punctuation:no_comma", "detectable_format:number_highlighted_sections"],
     "kwargs": [{}, {"num_highlights": 2}]},
    {"key": 1001, "prompt": "Describe a cat. Answer with less than 20 words.",
     "instruction_id_list": ["length_constraints:number_words"],
     "kwargs": [{"num_highlights": None, "relation": "less than", "num_words": 20, "keywords": None}]},
]


@needs_lm_eval
def test_ifeval_input_data_loads_unchanged_and_scores(tmp_path):
    path = tmp_path / "input_data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in IFEVAL_STYLE_ROWS) + "\n")
    suite = load_suite(path)
    assert [r.category for r in suite.rows] == ["instructions", "instructions"]
    assert [r.kind for r in suite.rows] == ["ifeval", "ifeval"] and [r.key for r in suite.rows] == [1000, 1001]
    assert suite.meta.chat is False and suite.meta.name == "input_data"
    first, second = suite.rows
    good = "A walk in the park is *quiet* and *green* today."
    assert instructions_followed(good, first.prompt, first.instruction_ids, first.instruction_kwargs)
    assert _lm_eval_strict(first.prompt, first.instruction_ids, first.instruction_kwargs, good).follow_all_instructions
    assert not instructions_followed("Quiet, green and *calm*.", first.prompt, first.instruction_ids,
                                     first.instruction_kwargs)
    assert instructions_followed("A cat is a small furry pet.", second.prompt, second.instruction_ids,
                                 second.instruction_kwargs)
    assert not instructions_followed(" ".join(["cat"] * 20), second.prompt, second.instruction_ids,
                                     second.instruction_kwargs)


@needs_lm_eval
@pytest.mark.parametrize("bad_row, message", [
    ({"prompt": "p", "instruction_id_list": ["detectable_format:json_fromat"], "kwargs": [{}]},
     r"'detectable_format:json_fromat' has no checker .*closest: \['detectable_format:json_format'"),
    ({"prompt": "p", "instruction_id_list": ["no_such:thing"], "kwargs": [{}]}, r"'no_such:thing' has no checker"),
    ({"prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]}, "list of 1 objects"),
    ({"prompt": "p", "instruction_id_list": [], "kwargs": []}, "non-empty list"),
    ({"prompt": "p", "instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"relation": "about", "num_words": 5}]}, "rejects kwargs"),
    ({"prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"colour": "red"}]},
     "rejects kwargs"),
    ({"prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "answer": "x"}, "takes no"),
    ({"prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kind": "refusal"}, '"kind" must be "ifeval"'),
    ({"category": "c", "prompt": "p", "answer": "a", "kwargs": [{}]}, "only apply to IFEval rows"),
])
def test_bad_ifeval_rows_name_file_and_line(tmp_path, bad_row, message):
    path = tmp_path / "suite.jsonl"
    path.write_text(json.dumps(IFEVAL_STYLE_ROWS[0]) + "\n\n" + json.dumps(bad_row) + "\n")
    with pytest.raises(SuiteError, match=message) as info:
        load_suite(path)
    assert str(info.value).startswith(f"{path}:3: ")


@needs_lm_eval
def test_checker_needing_nltk_data_is_a_load_error_not_a_download(tmp_path, monkeypatch):
    """number_sentences needs nltk's punkt: with no NLTK data on the path, loading says how to
    install it (nothing is downloaded: nltk.download must not be called)."""
    import nltk

    from eval.ifeval import ifeval_library

    ifeval_library()  # imported before nltk.download is poisoned (the import itself must not download)
    from lm_eval.tasks.ifeval import instructions_util

    # no NLTK data reachable, and nothing loaded earlier in this process remembered
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no_nltk_data")])
    monkeypatch.setattr(nltk.data, "_resource_cache", {})
    instructions_util._get_sentence_tokenizer.cache_clear()
    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("nltk.download was called"))
    path = tmp_path / "suite.jsonl"
    path.write_text(json.dumps({"prompt": "Write 3 sentences.", "instruction_id_list":
                                ["length_constraints:number_sentences"],
                                "kwargs": [{"relation": "less than", "num_sentences": 3}]}) + "\n")
    with pytest.raises(SuiteError, match=r":1: .*'length_constraints:number_sentences' needs NLTK data .*"
                                         r"python -m nltk.downloader"):
        load_suite(path)


def test_without_lm_eval_an_ifeval_row_says_what_to_install(tmp_path, monkeypatch):
    from eval.ifeval import ifeval_library

    ifeval_library.cache_clear()
    monkeypatch.setitem(sys.modules, "langdetect", None)  # as if the package were not installed
    path = tmp_path / "suite.jsonl"
    path.write_text(json.dumps(IFEVAL_STYLE_ROWS[1]) + "\n")
    try:
        with pytest.raises(SuiteError, match=r":1: .*pip install \"forgetless\[lm-eval\]\""):
            load_suite(path)
    finally:
        ifeval_library.cache_clear()


# ----------------------------------------------------------------------------- scoring end to end


@needs_lm_eval
def test_ifeval_rows_score_end_to_end_and_keep_their_answers(tmp_path):
    """A model that always answers "x": no comma (followed), no JSON (not followed); a plain
    (non-chat) IFEval row runs past newlines like lm-eval's ifeval task (until: [])."""
    from eval.capability import _budget, score_model

    rows = [
        {"category": "instructions", "prompt": "Say x.", "instruction_id_list": ["punctuation:no_comma"],
         "kwargs": [{}], "max_new_tokens": 5},
        {"prompt": "Say x in JSON.", "instruction_id_list": ["detectable_format:json_format"], "kwargs": [{}],
         "max_new_tokens": 5},
        {"category": "facts", "prompt": "Say x.", "match": "regex", "answer": "^x+$", "max_new_tokens": 5},
    ]
    path = tmp_path / "suite.jsonl"
    path.write_text(json.dumps({"_meta": {"chat": True}}) + "\n" + "\n".join(json.dumps(r) for r in rows) + "\n")
    report = score_model(constant_llama(ord("x")), chatml_tokenizer(), path)
    assert [(r.kind, r.output, r.correct) for r in report.rows] == [
        ("ifeval", "xxxxx", True), ("ifeval", "xxxxx", False), ("exact", "xxxxx", True)]
    assert report.categories["instructions"].n == 2 and report.categories["instructions"].correct == 1
    assert report.to_dict()["rows"][0]["output"] == "xxxxx"

    newline_rows = [dict(rows[0], chat=False), {"category": "plain", "prompt": "Q?", "answer": "x",
                                                 "max_new_tokens": 5, "chat": False}]
    path.write_text("\n".join(json.dumps(r) for r in newline_rows) + "\n")
    report = score_model(constant_llama(ord("\n")), chatml_tokenizer(), path)
    assert [r.output for r in report.rows] == ["\n" * 5, ""]  # IFEval: the whole budget; plain: first line
    assert report.rows[0].correct is False  # lm-eval: an empty (whitespace) answer follows nothing

    no_budget = load_suite(path).rows[0]
    no_budget.max_new_tokens = None
    assert _budget(no_budget, 32) == 256 and _budget(no_budget, 512) == 512
