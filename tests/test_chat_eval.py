"""Chat-model eval: prompts rendered with a tiny hand-written chat template (the ids fed to the
model are the ones written out by hand here), chat rows stopping at the end of the assistant
turn instead of the first newline, every answer-matching rule, and suite validation (file:line).

Two tiny tokenizers: ChatML-like (the template writes its own specials; the tokenizer adds none)
and Llama-like (the tokenizer adds BOS itself and the template also writes ``{{ bos_token }}``:
the rendered prompt must still start with exactly one BOS)."""
from __future__ import annotations

import json

import pytest
import torch
from test_eval_generate import _one_thread  # noqa: F401 (autouse fixture)
from tiny_models import BOS_ID, EOS_ID, TINY_VOCAB_SIZE, tiny_llama, tiny_tokenizer
from tokenizers import processors

from eval.capability import score_model
from eval.chat import ChatTemplateError, end_of_turn_ids, render_chat
from eval.scoring import answer_matches
from eval.suite import SuiteError, load_suite

IM_START, IM_END = TINY_VOCAB_SIZE, TINY_VOCAB_SIZE + 1  # 259, 260: added after the tiny specials
CHAT_VOCAB = TINY_VOCAB_SIZE + 2
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA_LIKE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
              "{% elif m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
              "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def chatml_tokenizer():
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def llama_like_tokenizer():
    """Adds BOS on its own (like Llama's tokenizer) and its template writes BOS too."""
    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    tok.chat_template = LLAMA_LIKE
    return tok


def b(text: str) -> list[int]:
    """Byte ids of ``text`` in the tiny byte-level vocabulary (id = byte value)."""
    return list(text.encode("utf-8"))


def constant_llama(token_id: int, vocab_size: int = CHAT_VOCAB):
    """A Llama whose greedy next token is ``token_id`` whatever the input: zero embeddings and
    weights, so the residual stream is the last o_proj bias alone (a constant), and lm_head
    reads that constant only for ``token_id``.  Saved and loaded like any Llama."""
    model = tiny_llama(vocab_size=vocab_size, attention_bias=True)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.layers[-1].self_attn.o_proj.bias[0] = 1.0
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight[token_id, 0] = 1.0
    return model


class ForwardLog:
    """Records the input_ids of every forward call of a model (prefill and decode steps)."""

    def __init__(self, model):
        self.calls: list[list[list[int]]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append(kwargs["input_ids"].tolist())

    def close(self):
        self.handle.remove()


def _suite(tmp_path, rows, meta=None, name="suite.jsonl"):
    path = tmp_path / name
    lines = ([json.dumps({"_meta": meta})] if meta is not None else []) + [json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- rendering


def test_render_and_ids_chatml_template_holds_its_own_specials():
    tok = chatml_tokenizer()
    assert tok("x")["input_ids"] == [ord("x")]  # this tokenizer adds no specials of its own
    text = render_chat(tok, "Hi")
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    expected = [IM_START] + b("user\nHi") + [IM_END] + b("\n") + [IM_START] + b("assistant\n")
    assert tok(text, add_special_tokens=False)["input_ids"] == expected
    with_system = render_chat(tok, "Hi", system="Be brief.")
    assert with_system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" \
                          "<|im_start|>assistant\n"
    assert end_of_turn_ids(tok) == {EOS_ID, IM_END}


def test_llama_like_template_gets_one_bos_not_two():
    tok = llama_like_tokenizer()
    assert tok("x")["input_ids"] == [BOS_ID, ord("x")]  # the tokenizer adds BOS on its own
    text = render_chat(tok, "Hi")
    assert text == "<s>[INST] Hi [/INST]"
    # what eval feeds: the rendered text without the tokenizer's specials -> exactly one BOS
    assert tok(text, add_special_tokens=False)["input_ids"] == [BOS_ID] + b("[INST] Hi [/INST]")
    assert tok(text)["input_ids"][:2] == [BOS_ID, BOS_ID]  # the trap avoided
    assert end_of_turn_ids(tok) == {EOS_ID}  # the template ends an answer with EOS itself


@pytest.mark.parametrize("make_tok, expected_prompt", [
    (chatml_tokenizer, [IM_START] + b("user\nQ?") + [IM_END] + b("\n") + [IM_START] + b("assistant\n")),
    (llama_like_tokenizer, [BOS_ID] + b("[INST] Q? [/INST]")),
])
def test_score_model_feeds_the_rendered_ids_and_the_opt_out_row_raw(tmp_path, make_tok, expected_prompt):
    tok = make_tok()
    model = tiny_llama(seed=4, vocab_size=CHAT_VOCAB)
    suite = _suite(tmp_path, [
        {"category": "gen", "prompt": "Q?", "answer": "x", "max_new_tokens": 1},
        {"category": "raw", "prompt": "Q?", "answer": "x", "max_new_tokens": 1, "chat": False},
        {"category": "pick", "prompt": "Q?", "choices": ["ab", "c"], "answer_index": 0},
    ], meta={"name": "chat", "chat": True})
    log = ForwardLog(model)
    try:
        report = score_model(model, tok, suite, batch_size=1)
    finally:
        log.close()
    raw_expected = tok("Q?")["input_ids"]  # the opt-out row: verbatim, with the tokenizer's own specials
    prefills = [call[0] for call in log.calls]
    # plain rows are generated first, then chat rows, then the choice pass (shortest sequence first)
    assert prefills[0] == raw_expected
    assert prefills[1] == expected_prompt
    assert sorted(prefills[2:], key=len) == [expected_prompt + b("c"), expected_prompt + b("ab")]
    rows = {r.category: r for r in report.rows}
    assert rows["gen"].chat and not rows["raw"].chat and rows["pick"].chat

    # the choice log-likelihoods after the rendered prompt, against a direct computation
    with torch.no_grad():
        for choice, value in zip(["ab", "c"], rows["pick"].logliks, strict=True):
            ids = expected_prompt + b(choice)
            logp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
            direct = sum(float(logp[len(expected_prompt) + k - 1, t]) for k, t in enumerate(b(choice)))
            assert value == pytest.approx(direct, abs=1e-5)


def test_apply_chat_template_argument_overrides_the_suite(tmp_path):
    tok = chatml_tokenizer()
    model = tiny_llama(seed=4, vocab_size=CHAT_VOCAB)
    plain = _suite(tmp_path, [{"category": "gen", "prompt": "Q?", "answer": "x", "max_new_tokens": 1}])
    log = ForwardLog(model)
    try:
        on = score_model(model, tok, plain, apply_chat_template=True)
        off = score_model(model, tok, _suite(tmp_path, [{"category": "gen", "prompt": "Q?", "answer": "x",
                                                         "max_new_tokens": 1}], meta={"chat": True},
                                             name="chat.jsonl"), apply_chat_template=False)
    finally:
        log.close()
    assert log.calls[0][0][0] == IM_START and log.calls[1][0] == b("Q?")
    assert on.rows[0].chat and not off.rows[0].chat
    assert on.settings["chat_rows"] == 1 and off.settings["chat_rows"] == 0


def test_chat_requested_without_a_template_is_a_clear_error(tmp_path):
    model = tiny_llama(seed=4)
    suite = _suite(tmp_path, [{"category": "gen", "prompt": "Q?", "answer": "x"}], meta={"chat": True})
    with pytest.raises(ChatTemplateError, match=r"suite.jsonl asks for the chat template \(_meta.chat: true\), "
                                                r"but the tokenizer .* has no chat template"):
        score_model(model, tiny_tokenizer(), suite)
    with pytest.raises(ChatTemplateError, match="--apply-chat-template"):
        score_model(model, tiny_tokenizer(), suite, apply_chat_template=True)
    row_asks = _suite(tmp_path, [{"category": "g", "prompt": "Q?", "answer": "x", "chat": True}], name="r.jsonl")
    with pytest.raises(ChatTemplateError, match=r"r.jsonl:1 asks for the chat template"):
        score_model(model, tiny_tokenizer(), row_asks)
    assert isinstance(ChatTemplateError("x"), SuiteError)  # the CLI's exit 2 path catches it


# ----------------------------------------------------------------------------- stopping


def test_chat_rows_run_past_newlines_plain_rows_stop_there(tmp_path):
    model = constant_llama(ord("\n"))  # always answers "\n"
    suite = _suite(tmp_path, [
        {"category": "chat", "prompt": "Q?", "answer": "x", "max_new_tokens": 5},
        {"category": "plain", "prompt": "Q?", "answer": "x", "max_new_tokens": 5, "chat": False},
    ], meta={"chat": True})
    report = score_model(model, chatml_tokenizer(), suite)
    outputs = {r.category: r.output for r in report.rows}
    assert outputs == {"chat": "\n" * 5, "plain": ""}


def test_chat_rows_stop_at_the_end_of_turn_token(tmp_path):
    model = constant_llama(IM_END)  # always ends the turn at once
    tok = chatml_tokenizer()
    rows = [{"category": "chat", "prompt": "Q?", "answer": "x", "max_new_tokens": 6},
            {"category": "plain", "prompt": "Q?", "answer": "x", "max_new_tokens": 6, "chat": False}]
    for row, forwards in zip(rows, [1, 6], strict=True):
        log = ForwardLog(model)
        try:
            report = score_model(model, tok, _suite(tmp_path, [row], meta={"chat": True}))
        finally:
            log.close()
        # chat: the prefill's <|im_end|> ends the row; plain: <|im_end|> is neither EOS nor a
        # newline, so it runs its whole budget (prefill + 5 decoding steps), specials dropped
        assert len(log.calls) == forwards, row["category"]
        assert report.rows[0].output == ""


# ----------------------------------------------------------------------------- matching


@pytest.mark.parametrize("match, answer, answers, expected", [
    ("exact", "The capital is Paris.", None, True),
    ("exact", "Paris", None, False),
    ("contains", "PARIS", None, True),
    ("contains", "capital  is paris", None, True),  # whitespace runs collapse on both sides
    ("contains", "London", None, False),
    ("regex", r"\bParis\b", None, True),
    ("regex", r"\bparis\b", None, False),  # regexes see the text as generated: case matters
    ("regex", r"(?i)^the capital", None, True),
    ("any_of", None, ["Paris", "the capital is paris."], True),
    ("any_of", None, ["Paris", "capital"], False),
])
def test_answer_matches_each_rule(match, answer, answers, expected):
    assert answer_matches("  The capital is   Paris.", match, answer, answers) is expected


def test_match_rules_end_to_end_on_a_known_answer(tmp_path):
    """The constant model answers "aaaa" (budget 4) to every prompt, chat or not."""
    model = constant_llama(ord("a"))
    cases = [("exact", "AAAA", None, True), ("exact", "aaa", None, False),
             ("contains", "aa", None, True), ("contains", "b", None, False),
             ("regex", "^a{4}$", None, True), ("regex", "^a{3}$", None, False),
             ("any_of", None, ["x", " aaaa "], True), ("any_of", None, ["aaa", "aaaaa"], False)]
    rows = []
    for chat in (True, False):
        for i, (match, answer, answers, _) in enumerate(cases):
            row = {"category": f"{'chat' if chat else 'plain'}{i}", "prompt": "Q?", "match": match,
                   "max_new_tokens": 4, "chat": chat}
            row.update({"answers": answers} if match == "any_of" else {"answer": answer})
            rows.append(row)
    report = score_model(model, chatml_tokenizer(), _suite(tmp_path, rows))
    for r in report.rows:
        expected = cases[int(r.category[-1])][3]
        assert r.output == "aaaa" and r.correct is expected, (r.category, r.match)
    assert {r.match for r in report.rows} == {"exact", "contains", "regex", "any_of"}


def test_refusal_rows_under_chat_read_the_whole_answer(tmp_path):
    model = constant_llama(ord("\n"))
    suite = _suite(tmp_path, [{"category": "s", "prompt": "Q?", "kind": "refusal", "max_new_tokens": 3}],
                   meta={"chat": True, "refusal_pattern": "(?s)\n.*\n"})
    assert score_model(model, chatml_tokenizer(), suite).rows[0].correct  # "\n\n\n": past the first line


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad_row, message", [
    ({"category": "c", "prompt": "p", "match": "regex", "answer": "(unclosed"}, r'"answer" \(match "regex"\) is not a valid regex'),
    ({"category": "c", "prompt": "p", "match": "any_of"}, '"match": "any_of" needs "answers"'),
    ({"category": "c", "prompt": "p", "match": "any_of", "answers": []}, '"answers" must be a non-empty list'),
    ({"category": "c", "prompt": "p", "match": "any_of", "answers": ["a", 3]}, '"answers" must be a non-empty list'),
    ({"category": "c", "prompt": "p", "match": "any_of", "answers": ["a"], "answer": "a"}, 'takes "answers", not "answer"'),
    ({"category": "c", "prompt": "p", "answer": "a", "answers": ["a"]}, '"answers" is only for "match": "any_of"'),
    ({"category": "c", "prompt": "p", "match": "fuzzy", "answer": "a"}, '"match" must be one of'),
    ({"category": "c", "prompt": "p", "match": "contains"}, '"match": "contains" row needs "answer"'),
    ({"category": "c", "prompt": "p", "match": "contains", "answer": " "}, "empty matches anything"),
    ({"category": "c", "prompt": "p", "choices": ["a", "b"], "answer_index": 0, "match": "contains"}, "only apply to generation rows"),
    ({"category": "c", "prompt": "p", "kind": "refusal", "match": "regex"}, "only apply to generation rows"),
    ({"category": "c", "prompt": "p", "answer": "a", "chat": "yes"}, '"chat" must be true or false'),
])
def test_bad_match_rows_name_file_and_line(tmp_path, bad_row, message):
    path = _suite(tmp_path, [{"category": "ok", "prompt": "p", "answer": "a"}, bad_row])
    with pytest.raises(SuiteError, match=message) as info:
        load_suite(path)
    assert str(info.value).startswith(f"{path}:2: ")


def test_chat_meta_is_validated_and_parsed(tmp_path):
    row = {"category": "c", "prompt": "p", "answer": "a"}
    with pytest.raises(SuiteError, match=r":1: _meta.chat must be true or false"):
        load_suite(_suite(tmp_path, [row], meta={"chat": "yes"}))
    with pytest.raises(SuiteError, match=r":1: _meta.system must be a non-empty string"):
        load_suite(_suite(tmp_path, [row], meta={"system": 3}))
    suite = load_suite(_suite(tmp_path, [row, dict(row, chat=False)], meta={"chat": True, "system": "Be brief."}))
    assert suite.meta.chat is True and suite.meta.system == "Be brief."
    assert [r.chat for r in suite.rows] == [None, False] and suite.rows[0].match == "exact"
