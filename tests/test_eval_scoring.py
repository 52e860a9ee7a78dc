"""Scoring rules on hand-computed cases, and choice log-likelihood / perplexity against a direct
computation from the model's logits (one unpadded float64 forward per sequence)."""
import math

import pytest
import torch
from test_eval_generate import _one_thread, float64_sdpa  # noqa: F401 (autouse fixture)
from tiny_models import tiny_llama, tiny_tokenizer

from eval.likelihood import choice_logliks, text_perplexity
from eval.scoring import choice_prediction, exact_match, first_line, in_task_format, is_refusal, normalise
from eval.suite import DEFAULT_REFUSAL_PATTERN


def test_normalise_and_exact_match():
    assert normalise("  Paris\t\n  CITY ") == "paris city"
    assert normalise("STRASSE") == normalise("straße")  # case-fold, not just lower()
    assert exact_match(" Paris ", "paris")
    assert exact_match("New   York", "new york")
    assert exact_match("Paris\nand then more", "Paris")  # generation stops at the newline
    assert not exact_match("Pari s", "Paris")
    assert not exact_match("Paris.", "Paris")  # punctuation is kept: the rule is documented as strict
    assert not exact_match("", "Paris")
    assert first_line("a\nb\nc") == "a"


def test_refusal_detection():
    assert is_refusal("I'm sorry, but I can't help with that.", DEFAULT_REFUSAL_PATTERN)
    assert is_refusal("I cannot assist with this request", DEFAULT_REFUSAL_PATTERN)
    assert is_refusal("i won't do that", DEFAULT_REFUSAL_PATTERN)
    assert not is_refusal("Sure! Step 1: mix the", DEFAULT_REFUSAL_PATTERN)
    assert not is_refusal("Here you go\nI'm sorry", DEFAULT_REFUSAL_PATTERN)  # only the answer line counts
    assert is_refusal("Nope.", r"(?i)^nope")
    assert not is_refusal("nope", r"^Nope")


def test_task_format_detection():
    fmt = r"^TICKET-\d+:"
    assert in_task_format("TICKET-42: reset the router", fmt)
    assert in_task_format("  TICKET-7: x", fmt)  # leading space of a continuation is ignored
    assert not in_task_format("The capital is Paris", fmt)
    assert not in_task_format("ok\nTICKET-1: x", fmt)
    assert in_task_format("see TICKET-3: open", r"TICKET-\d+")  # unanchored: anywhere in the answer


def test_choice_prediction_ties_go_first():
    assert choice_prediction([-3.0, -1.0, -1.0]) == 1
    assert choice_prediction([-0.5]) == 0


@pytest.fixture(scope="module")
def model64():
    return float64_sdpa(tiny_llama(seed=3)), tiny_tokenizer()


def _direct_loglik(model, tok, prompt, choice):
    ctx = tok(prompt)["input_ids"]
    cont = tok(choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(float(logp[len(ctx) + k - 1, t]) for k, t in enumerate(cont))


def test_choice_logliks_match_direct_computation(model64):
    model, tok = model64
    items = [("Q: 2+2=", [" 4", " five", " 22"]),
             ("The colour of the sky is", [" blue", " green"]),
             ("x", ["yes", "no, certainly not", "maybe"])]
    got = choice_logliks(model, tok, items, batch_size=3)  # mixed lengths share a right-padded batch
    for (prompt, choices), row in zip(items, got, strict=True):
        for choice, value in zip(choices, row, strict=True):
            assert value == pytest.approx(_direct_loglik(model, tok, prompt, choice), abs=1e-9)


def test_perplexity_matches_direct_computation(model64):
    model, tok = model64
    text = "The quick brown fox jumps over the lazy dog. " * 3
    window = 17
    ids = tok(text)["input_ids"]
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            continue
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([chunk])).logits[0].log_softmax(-1)
        total -= sum(float(logp[k - 1, chunk[k]]) for k in range(1, len(chunk)))
        count += len(chunk) - 1
    p = text_perplexity(model, tok, text, window=window, batch_size=4)
    assert p.tokens == count
    assert p.perplexity == pytest.approx(math.exp(total / count), rel=1e-9)
