"""Self-replay: the prompt bank and its seeded subset, generation to end of turn (against a
no-cache argmax loop), sampling, the degenerate-answer filter (a fake generator with
hand-labelled answers), the cache (reused, invalidated by a changed bank or model), the keys."""
import difflib
import json
import re
from pathlib import Path

import pytest
import torch
from tiny_models import EOS_ID, tiny_llama, tiny_tokenizer

import trainer.self_replay as sr
from eval.generate import Sampling, greedy_generate, next_tokens
from trainer.config import ConfigError, TrainConfig, validate
from trainer.data import DataError, read_jsonl

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------- the bank


def test_builtin_bank_is_large_varied_and_unique():
    rows = [json.loads(line) for line in sr.BUILTIN_PROMPTS.read_text(encoding="utf-8").splitlines()]
    prompts = [r["prompt"] for r in rows]
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    assert len({r["category"] for r in rows}) >= 9
    assert sr.prompt_bank() == prompts


def _normal(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.casefold()))


def test_no_bank_prompt_is_taken_from_an_eval_suite():
    """Every shipped suite (eval/suites/*.jsonl, the chat suite among them) against the bank:
    no equal prompt and none that nearly copies one (difflib ratio >= 0.8 on the words)."""
    bank = [_normal(p) for p in sr.prompt_bank()]
    suites = sorted((REPO / "eval" / "suites").glob("*.jsonl"))
    close = []
    for suite in suites:
        for line in suite.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            if "prompt" not in row:
                continue
            text = _normal(row["prompt"])
            matcher = difflib.SequenceMatcher(b=text, autojunk=False)
            for prompt in bank:
                matcher.set_seq1(prompt)
                if matcher.real_quick_ratio() >= 0.8 and matcher.ratio() >= 0.8:
                    close.append((suite.name, row["prompt"], prompt))
    assert not close, close[:5]


def test_subset_is_deterministic_given_the_seed():
    bank = sr.prompt_bank()
    a, b = sr.select_prompts(bank, 40, seed=3), sr.select_prompts(bank, 40, seed=3)
    assert a == b and len(a) == 40 == len(set(a)) and set(a) <= set(bank)
    assert sr.select_prompts(bank, 40, seed=4) != a
    assert sr.select_prompts(bank, 0, seed=3) == bank == sr.select_prompts(bank, 10_000, seed=3)


def test_user_prompts_are_added_once_and_checked_with_file_and_line(tmp_path):
    good = tmp_path / "mine.jsonl"
    first = sr.prompt_bank()[0]
    good.write_text(json.dumps({"prompt": "Describe my cat."}) + "\n\n" + json.dumps({"prompt": first}) + "\n")
    bank = sr.prompt_bank(good)
    assert bank[-1] == "Describe my cat." and bank.count(first) == 1
    for content, message in [('{"prompt": "ok"}\n{"prompt": ', "bad.jsonl:2: not valid JSON"),
                             ('{"prompt": ""}\n', "bad.jsonl:1: \"prompt\" must be a non-empty string"),
                             ('{"text": "x"}\n', "bad.jsonl:1: unknown keys ['text']"),
                             ('["x"]\n', "bad.jsonl:1: a row must be an object"),
                             ("\n", "no prompts")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(content)
        with pytest.raises(DataError, match=re.escape(message)):
            sr.prompt_bank(bad)
    with pytest.raises(DataError, match="not found"):
        sr.read_prompt_file(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------- filtering


@pytest.mark.parametrize("answer, kind", [
    ("", "empty"), (" \n\t ", "empty"),
    ("yes yes yes yes", "repeated"), ("!!!!", "repeated"), ("Sure.\nSure.", "repeated"),
    ("yes yes yes", None),  # 3 tokens: below the 4 a repeated token needs
    ("I am here. I am here. I am here.", "runaway"),  # 12 tokens, "i am" 3 times * 2 = 6 >= 6
    ("I am here. I am here. Fine.", None),  # 10 tokens: too short to call runaway
    ("1. Apples\n2. Pears\n3. Plums\n4. Figs", None),  # 12 tokens, every bigram once
    ("Tea is a drink made by steeping leaves in hot water; it is popular all over the world.", None),
])
def test_degeneracy_by_the_documented_rules(answer, kind):
    assert sr.degeneracy(answer) == kind


def test_degenerate_answers_are_dropped_and_counted(tmp_path, monkeypatch):
    answers = {"p0": "", "p1": "   ", "p2": "yes yes yes yes", "p3": "ok\nok\nok",
               "p4": "I am here. I am here. I am here.", "p5": "  A normal answer about tea.  ",
               "p6": "Fine, with a list:\n- a\n- b", "p7": "x" * 40, "p8": "A first full sentence here. Cut of"}
    monkeypatch.setattr(sr, "generate_answers", lambda m, t, rendered, s, on_batch=None: list(answers.values()))
    model, tok = tiny_llama(seed=1), tiny_tokenizer()
    path, stats = sr.build_self_replay(model, tok, list(answers), sr.SelfReplaySettings(max_new_tokens=30),
                                       cache_dir=tmp_path, log=lambda s: None)
    assert (stats.prompts, stats.kept, stats.empty, stats.repeated, stats.runaway) == (9, 4, 2, 2, 1)
    # byte tokens: "x" * 40 (40) and p8 (34) reach the budget of 30, p5 and p6 (26 each) do not;
    # p8 is cut back to its sentence end, "x" * 40 has none and stays whole
    assert (stats.truncated, stats.trimmed) == (2, 1)
    rows = read_jsonl(path)
    expected = {p: answers[p].strip() for p in ("p5", "p6", "p7")} | {"p8": "A first full sentence here."}
    assert [r["messages"] for r in rows] == [
        [{"role": "user", "content": p}, {"role": "assistant", "content": a}] for p, a in expected.items()]
    assert stats.sample == {"prompt": "p5", "answer": "A normal answer about tea."}


@pytest.mark.parametrize("answer, trimmed", [
    ("One. Two three four five six seve", "One. Two three four five six seve"),  # end at 4 of 34: kept whole
    ("Tea is good. Coffee too! And wat", "Tea is good. Coffee too!"),
    ('He said "stop." Then he lef', 'He said "stop."'),
    ("Steps:\n1. Boil water\n2. Add the le", "Steps:\n1. Boil water"),
    ("All done.", "All done."),
    ("e.g. this is cut", "e.g. this is cut"),  # the only "end" is in the first half
])
def test_truncated_answers_are_cut_back_to_a_sentence_end(answer, trimmed):
    assert sr.trim_to_sentence(answer) == trimmed


def test_no_usable_answer_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sr, "generate_answers", lambda m, t, rendered, s, on_batch=None: ["", "a a a a"])
    with pytest.raises(DataError, match="none of the model's 2 answers is usable"):
        sr.build_self_replay(tiny_llama(), tiny_tokenizer(), ["a", "b"], sr.SelfReplaySettings(), cache_dir=tmp_path)
    assert not any(tmp_path.glob("*/stats.json"))  # nothing cached


# ------------------------------------------------------------------------------- generation


def chatty_llama():
    """A tiny Llama whose head favours newline (byte 10) and EOS a little, so that answers hold
    newlines and end at EOS at different steps."""
    model = tiny_llama(seed=11, initializer_range=0.2)  # logits large enough to matter beside the bias
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[10] = 2.0
        head.bias[EOS_ID] = 2.0
    model.lm_head = head
    return model


def reference_answer(model, tok, text: str, budget: int) -> str:
    """Independent oracle: full forward on the growing sequence, argmax, stop at EOS only."""
    ids = tok(text)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(budget):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token == EOS_ID:
                break
            ids.append(token)
            out.append(token)
    return tok.decode(out, skip_special_tokens=True)


def test_greedy_answers_run_to_end_of_turn_like_an_argmax_loop_and_like_eval():
    model, tok = chatty_llama(), tiny_tokenizer()
    prompts = sr.prompt_bank()[:7]
    rendered = [sr.render_prompt(tok, p) for p in prompts]
    assert rendered[0] == f"user: {prompts[0]}\nassistant: "  # no chat template: trainer.data's layout
    settings = sr.SelfReplaySettings(max_new_tokens=10, batch_size=3)
    answers = sr.generate_answers(model, tok, rendered, settings)
    assert answers == [reference_answer(model, tok, r, 10) for r in rendered]
    assert answers == greedy_generate(model, tok, rendered, 10, batch_size=5, stop_at_newline=False)
    assert any("\n" in a for a in answers)  # not cut at the first newline
    assert len({len(a) for a in answers}) > 1  # rows ended at different steps


def test_chat_template_renders_the_user_turn_and_the_assistant_header():
    tok = tiny_tokenizer()
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    # The tiny tokenizer adds no BOS itself, so the template's BOS stays.
    assert sr.render_prompt(tok, "Hi") == "<s><|user|>Hi\n<|assistant|>"


def test_nucleus_sampling_keeps_the_top_mass_and_redistributes_it():
    """probs (0.5, 0.3, 0.2), top_p 0.6: the mass before token 1 is 0.5 < 0.6 (kept), before
    token 2 it is 0.8 (cut); the kept pair is drawn as 0.625 / 0.375."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(20000, 1)
    draws = next_tokens(logits, Sampling(temperature=1.0, top_p=0.6, seed=0), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=3).double() / len(draws)
    assert counts[2] == 0 and abs(float(counts[0]) - 0.625) < 0.015
    cold = next_tokens(logits[:4] * 1.0, Sampling(temperature=1e-4), torch.Generator().manual_seed(0))
    assert cold.tolist() == [0, 0, 0, 0]  # temperature -> 0 is argmax
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


def test_sampling_with_a_fixed_seed_is_reproducible():
    model, tok = chatty_llama(), tiny_tokenizer()
    rendered = [sr.render_prompt(tok, p) for p in sr.prompt_bank()[:6]]
    settings = sr.SelfReplaySettings(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.95, seed=5,
                                     batch_size=4)
    first = sr.generate_answers(model, tok, rendered, settings)
    assert sr.generate_answers(model, tok, rendered, settings) == first
    other = sr.SelfReplaySettings(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.95, seed=6, batch_size=4)
    assert sr.generate_answers(model, tok, rendered, other) != first
    assert first != sr.generate_answers(model, tok, rendered, sr.SelfReplaySettings(max_new_tokens=8, batch_size=4))


# ------------------------------------------------------------------------------- the cache


def _spy_generation(monkeypatch) -> list[int]:
    calls = []
    original = sr.generate_answers

    def spy(model, tok, rendered, settings, on_batch=None):
        calls.append(len(rendered))
        return original(model, tok, rendered, settings, on_batch)

    monkeypatch.setattr(sr, "generate_answers", spy)
    return calls


def test_cache_is_reused_and_invalidated_by_a_changed_bank_or_model(tmp_path, monkeypatch):
    calls = _spy_generation(monkeypatch)
    model, tok = chatty_llama(), tiny_tokenizer()
    prompts = sr.prompt_bank()[:5]
    settings = sr.SelfReplaySettings(max_new_tokens=6)
    logged = []
    path, stats = sr.build_self_replay(model, tok, prompts, settings, cache_dir=tmp_path, log=logged.append)
    assert calls == [5] and not stats.cached and stats.seconds >= 0
    assert "self-replay:" in logged[0] and "sample" in logged[-1]
    content = path.read_text()

    again, stats2 = sr.build_self_replay(model, tok, prompts, settings, cache_dir=tmp_path, log=lambda s: None)
    assert calls == [5] and stats2.cached and again == path and again.read_text() == content
    assert (stats2.kept, stats2.empty, stats2.repeated) == (stats.kept, stats.empty, stats.repeated)

    sr.build_self_replay(model, tok, prompts[:4] + ["A prompt not in the bank."], settings, cache_dir=tmp_path,
                         log=lambda s: None)
    assert calls == [5, 5]  # a changed bank generates anew
    with torch.no_grad():
        model.model.norm.weight.mul_(1.01)
    changed, _ = sr.build_self_replay(model, tok, prompts, settings, cache_dir=tmp_path, log=lambda s: None)
    assert calls == [5, 5, 5] and changed != path  # a changed model too
    sr.build_self_replay(model, tok, prompts, sr.SelfReplaySettings(max_new_tokens=7), cache_dir=tmp_path,
                         log=lambda s: None)
    assert calls == [5, 5, 5, 5]  # and changed decoding settings
    assert not list(tmp_path.glob(".*"))  # no staging folder left behind


def test_from_config_uses_the_self_replay_keys(tmp_path, monkeypatch):
    seen = {}

    def fake(model, tok, rendered, settings, on_batch=None):
        seen["n"], seen["settings"] = len(rendered), settings
        return [f"answer {i}" for i in range(len(rendered))]

    monkeypatch.setattr(sr, "generate_answers", fake)
    cfg = TrainConfig(replay_data="self", replay_ratio=0.2, self_replay_samples=12, self_replay_max_new_tokens=9,
                      self_replay_do_sample=True, self_replay_temperature=0.5, self_replay_top_p=0.8, seed=4,
                      progress=False)
    path, stats = sr.self_replay_from_config(cfg, tiny_llama(), tiny_tokenizer(), cache_dir=tmp_path,
                                             log=lambda s: None)
    assert seen["n"] == 12 == stats.kept
    assert seen["settings"] == sr.SelfReplaySettings(9, True, 0.5, 0.8, 4, cfg.per_device_eval_batch_size)
    users = [r["messages"][0]["content"] for r in read_jsonl(path)]
    assert users == sr.select_prompts(sr.prompt_bank(), 12, seed=4)


@pytest.mark.parametrize("key, value", [("self_replay_samples", -1), ("self_replay_max_new_tokens", 0),
                                        ("self_replay_temperature", 0.0), ("self_replay_top_p", 1.5)])
def test_config_keys_are_checked(key, value):
    with pytest.raises(ConfigError, match=key):
        validate(TrainConfig(**{key: value}))


def test_a_bad_prompts_file_fails_the_run_before_the_model_loads(tmp_path, capsys):
    from trainer.run import main

    data = tmp_path / "task.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no"}\n')
    code = main([f"model={tmp_path / 'no_model'}", f"data={data}", "replay_data=self", "replay_ratio=0.2",
                 f"self_replay_prompts={bad}"])
    assert code == 2 and f"{bad}:2: unknown keys" in capsys.readouterr().err
