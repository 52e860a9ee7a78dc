"""Batched greedy generation (left padding, KV cache, per-row stop) equals a one-prompt-at-a-time
argmax loop that recomputes the whole sequence each step (no cache, no padding)."""
from collections import Counter

import pytest
import torch
from tiny_models import EOS_ID, tiny_gpt2, tiny_llama, tiny_qwen2, tiny_tokenizer

import eval.generate as generate_module
from eval.generate import greedy_generate

PROMPTS = ["Hello", "A much longer prompt, with commas and more words", "Q: 2+2=", "x",
           "Capital of France?", "tabs\tand spaces", "1 2 3 4 5 6 7", "zz"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: the oracle loops run faster on one thread (the code under test does the same)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def float64_sdpa(model):
    """float64 for exact comparisons; SDPA because HF's eager attention turns fully masked
    (left-padding) rows into NaN in float64 (its softmax runs in float32 on a float64 -inf mask)."""
    model = model.double()
    model.set_attn_implementation("sdpa")
    return model


def reference_tokens(model, tok, prompt: str, budget: int) -> tuple[list[int], str]:
    """Independent oracle: full forward on the growing sequence, argmax, stop at EOS or newline.
    Returns the kept tokens and why it stopped ("eos", "newline" or "budget")."""
    ids = tok(prompt)["input_ids"]
    eos = {tok.eos_token_id, model.config.eos_token_id}
    out = []
    with torch.no_grad():
        for _ in range(budget):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token in eos:
                return out, "eos"
            ids.append(token)
            out.append(token)
            if "\n" in tok.decode([token]):
                return out, "newline"
    return out, "budget"


def reference_greedy(model, tok, prompt: str, budget: int) -> str:
    tokens, _ = reference_tokens(model, tok, prompt, budget)
    return tok.decode(tokens, skip_special_tokens=True).split("\n")[0]


def _budgets():
    return [5, 9, 3, 12, 7, 1, 9, 6]


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, tiny_gpt2], ids=["llama", "qwen2", "gpt2"])
def test_batched_equals_one_by_one(build):
    model, tok = float64_sdpa(build(seed=1)), tiny_tokenizer()
    expected = [reference_greedy(model, tok, p, b) for p, b in zip(PROMPTS, _budgets(), strict=True)]
    for batch_size in (3, 8):
        assert greedy_generate(model, tok, PROMPTS, _budgets(), batch_size=batch_size) == expected


def test_rows_stop_at_newline_and_eos(monkeypatch):
    """Make newline and EOS likely by copying (slightly scaled) the output rows of the two tokens
    the model emits most, so some rows stop early while the rest of their batch goes on."""
    model, tok = float64_sdpa(tiny_llama(seed=2)), tiny_tokenizer()
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    counts = Counter()
    for p in PROMPTS:
        counts.update(reference_tokens(model, tok, p, 12)[0])
    (first, _), (second, _) = counts.most_common(2)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[newline] = 1.05 * head[first]
        head[EOS_ID] = 1.05 * head[second]
    budgets = [12] * len(PROMPTS)
    expected = [reference_greedy(model, tok, p, 12) for p in PROMPTS]
    drops = []  # record that finished rows really left a batch (the KV-cache row selection path)
    original = generate_module._should_drop_finished
    monkeypatch.setattr(generate_module, "_should_drop_finished",
                        lambda running, cache: drops.append(original(running, cache)) or drops[-1])
    got = greedy_generate(model, tok, PROMPTS, budgets, batch_size=4)
    assert got == expected
    assert any(drops)
    # Only meaningful if both kinds of stop happened while other rows of the batch went on.
    reasons = {reference_tokens(model, tok, p, 12)[1] for p in PROMPTS}
    assert {"eos", "newline"} <= reasons


def test_deterministic_and_order_preserved():
    model, tok = tiny_llama(seed=4), tiny_tokenizer()
    first = greedy_generate(model, tok, PROMPTS, 6, batch_size=3)
    again = greedy_generate(model, tok, list(reversed(PROMPTS)), 6, batch_size=5)
    assert first == list(reversed(again))


def test_nan_logits_are_an_error_not_garbage():
    model = tiny_llama(seed=1).double()  # eager attention in float64: NaN on padded rows
    with pytest.raises(RuntimeError, match="NaN logits"):
        greedy_generate(model, tiny_tokenizer(), ["a", "a longer prompt"], 3)
