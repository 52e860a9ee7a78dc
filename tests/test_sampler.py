"""eval.generate's sampler against independent references: HF ``model.generate`` token for token
(greedy), a hand-built sampling loop drawing from the same generator, and fp32 log-probs for bf16."""
from collections import Counter

import pytest
import torch
from test_eval_generate import _one_thread, float64_sdpa  # noqa: F401 (autouse fixture)
from tiny_models import EOS_ID, PAD_ID, tiny_gpt2, tiny_llama, tiny_qwen2, tiny_tokenizer

import eval.generate as generate_module
from eval.generate import Sampling, decoding_model, generate_ids, greedy_generate

PROMPTS = ["Hello", "A much longer prompt, with commas and more words", "Q: 2+2=", "x",
           "Capital of France?", "tabs\tand spaces", "1 2 3 4 5 6 7", "zz"]
BUILDERS = [tiny_llama, tiny_qwen2, tiny_gpt2]
IDS = ["llama", "qwen2", "gpt2"]
# |log p(bf16 copy) - log p(fp32)| over every position and vocabulary entry of the tiny models below;
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2%), measured worst here is ~0.02 nats.
BF16_LOGPROB_TOLERANCE = 0.06


def prompt_ids(tok) -> list[list[int]]:
    return [tok(p)["input_ids"] for p in PROMPTS]


def hf_generate_one(model, ids: list[int], budget: int, stop_ids: set[int]) -> list[int]:
    """HF generate on one unpadded prompt, cut after its first stop token (HF pads after it)."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=budget, do_sample=False, eos_token_id=sorted(stop_ids),
                         pad_token_id=PAD_ID)[0, len(ids):].tolist()
    for k, t in enumerate(out):
        if t in stop_ids:
            return out[:k + 1]
    return out


def hf_generate_batch(model, rows: list[list[int]], budget: int, stop_ids: set[int]) -> list[list[int]]:
    """HF generate on one left-padded batch (its own padding and position ids), each row cut after its stop."""
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=budget, do_sample=False,
                         eos_token_id=sorted(stop_ids), pad_token_id=PAD_ID)[:, width:].tolist()
    cut = []
    for row in out:
        ends = [k for k, t in enumerate(row) if t in stop_ids]
        cut.append(row[:ends[0] + 1] if ends else row)
    return cut


def likely_stop_token(model, rows: list[list[int]], budget: int) -> int:
    """The token HF's greedy decoding emits most often here, but never first: as a stop token, rows
    end at different steps (and none at once)."""
    counts, firsts = Counter(), set()
    for ids in rows:
        out = hf_generate_one(model, ids, budget, {EOS_ID})
        counts.update(out)
        firsts.add(out[0])
    return next(t for t, _ in counts.most_common() if t not in firsts)


@pytest.mark.parametrize("build", BUILDERS, ids=IDS)
def test_greedy_equals_hf_generate_token_for_token(build):
    # Wider initial weights than HF's 0.02: a random GPT-2 otherwise repeats one token forever.
    model, tok = float64_sdpa(build(seed=3, initializer_range=0.3)), tiny_tokenizer()
    rows = prompt_ids(tok)
    budgets = [5, 14, 3, 12, 9, 1, 14, 7]
    stop_ids = {EOS_ID, likely_stop_token(model, rows, 14)}
    expected = [hf_generate_one(model, ids, b, stop_ids) for ids, b in zip(rows, budgets, strict=True)]
    for batch_size in (3, 8):
        got = generate_ids(model, rows, budgets, stop_ids=stop_ids, pad_id=PAD_ID, batch_size=batch_size)
        assert got == expected, f"batch_size={batch_size}"
    # Rows really finished at different steps, some on the stop token (test_generate_ids_contract has
    # rows cut at their budget).
    assert any(e and e[-1] in stop_ids for e in expected)
    assert len({len(e) for e in expected}) > 3
    # And HF's own left-padded batch (one budget for all rows) agrees with ours.
    assert generate_ids(model, rows, 10, stop_ids=stop_ids, pad_id=PAD_ID) == hf_generate_batch(
        model, rows, 10, stop_ids)


def test_greedy_equals_hf_generate_with_eos_made_likely():
    """EOS itself (no extra stop token) ends rows early: its output row copies a frequent token's, scaled."""
    model, tok = float64_sdpa(tiny_llama(seed=2)), tiny_tokenizer()
    rows = prompt_ids(tok)
    frequent = likely_stop_token(model, rows, 12)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[EOS_ID] = 1.05 * head[frequent]
    expected = [hf_generate_one(model, ids, 12, {EOS_ID}) for ids in rows]
    assert any(e[-1:] == [EOS_ID] for e in expected) and any(EOS_ID not in e for e in expected)
    assert generate_ids(model, rows, 12, stop_ids=[EOS_ID], pad_id=PAD_ID, batch_size=4) == expected


def test_generate_ids_contract():
    model, tok = tiny_llama(seed=5), tiny_tokenizer()
    rows = prompt_ids(tok)
    budgets = [4, 0, 9, 2, 6, 1, 8, 3]
    free = generate_ids(model, rows, budgets, stop_ids=[], pad_id=PAD_ID, batch_size=3)
    assert [len(r) for r in free] == budgets  # no stop token: each row runs exactly its budget
    stop = Counter(t for r in free for t in r).most_common(1)[0][0]
    stopped = generate_ids(model, rows, budgets, stop_ids=[stop], pad_id=PAD_ID, batch_size=3)
    for full, cut, budget in zip(free, stopped, budgets, strict=True):
        if stop in full:  # cut right after the first stop token, which is kept
            assert cut == full[:full.index(stop) + 1] and cut[-1] == stop
        else:
            assert cut == full and len(cut) == budget
    assert any(stop in r for r in free)
    assert generate_ids(model, [], 5, stop_ids=[], pad_id=PAD_ID) == []
    with pytest.raises(ValueError, match="entries"):
        generate_ids(model, rows, [1, 2], stop_ids=[], pad_id=PAD_ID)


def test_greedy_generate_is_a_layer_over_generate_ids():
    """Text = decode(ids) without the end token, as before; greedy_generate's outputs are unchanged."""
    model, tok = tiny_llama(seed=6), tiny_tokenizer()
    ids = generate_ids(model, prompt_ids(tok), 8, stop_ids=[EOS_ID], pad_id=PAD_ID, batch_size=3)
    texts = [tok.decode(r[:-1] if r[-1:] == [EOS_ID] else r, skip_special_tokens=True) for r in ids]
    assert greedy_generate(model, tok, PROMPTS, 8, batch_size=3, stop_at_newline=False) == texts


def reference_sampling(model, rows: list[list[int]], steps: int, sampling: Sampling) -> list[list[int]]:
    """Hand-built sampler: the batch sorted by prompt length (as the sampler batches it), the whole
    left-padded sequence recomputed every step (no cache), nucleus cut row by row in Python, then one
    ``torch.multinomial`` over the batch from a generator seeded the same way."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    seqs = [list(rows[i]) for i in order]
    generator = torch.Generator().manual_seed(sampling.seed)
    for _ in range(steps):
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[PAD_ID] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
        probs = torch.softmax(logits / sampling.temperature, dim=-1)
        for r in range(len(seqs)):
            ranked = sorted(range(probs.shape[1]), key=lambda v, r=r: -float(probs[r, v]))
            mass, kept = 0.0, set()
            for v in ranked:
                if mass >= sampling.top_p:
                    break
                kept.add(v)
                mass += float(probs[r, v])
            for v in range(probs.shape[1]):
                if v not in kept:
                    probs[r, v] = 0.0
        drawn = torch.multinomial(probs, 1, generator=generator)[:, 0].tolist()
        for s, t in zip(seqs, drawn, strict=True):
            s.append(t)
    out = [[] for _ in rows]
    for k, i in enumerate(order):
        out[i] = seqs[k][len(rows[i]):]
    return out


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_seeded_sampling_matches_hand_built_reference(temperature, top_p):
    model, tok = float64_sdpa(tiny_llama(seed=7)), tiny_tokenizer()
    rows = prompt_ids(tok)
    sampling = Sampling(temperature=temperature, top_p=top_p, seed=11)
    got = generate_ids(model, rows, 6, stop_ids=[], pad_id=PAD_ID, sampling=sampling)
    assert got == reference_sampling(model, rows, 6, sampling)


def test_seeded_sampling_is_reproducible_with_stops():
    model, tok = tiny_qwen2(seed=8), tiny_tokenizer()
    rows = prompt_ids(tok)
    sampling = Sampling(temperature=1.0, top_p=0.95, seed=3)
    kwargs = dict(stop_ids=[EOS_ID, 32], pad_id=PAD_ID, sampling=sampling, batch_size=3)
    first = generate_ids(model, rows, 10, **kwargs)
    assert generate_ids(model, rows, 10, **kwargs) == first
    other = generate_ids(model, rows, 10, **{**kwargs, "sampling": Sampling(1.0, 0.95, seed=4)})
    assert other != first


def logprobs(model, rows: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [torch.log_softmax(model(input_ids=torch.tensor([r])).logits[0].double(), -1) for r in rows]


@pytest.mark.parametrize("build", BUILDERS, ids=IDS)
def test_bf16_copy_logprobs_within_tolerance_of_fp32(build):
    model, tok = build(seed=9), tiny_tokenizer()
    rows = prompt_ids(tok)
    copy = decoding_model(model, "bf16")
    assert copy is not model and next(copy.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left as it was
    worst = max(float((a - b).abs().max()) for a, b in zip(logprobs(model, rows), logprobs(copy, rows), strict=True))
    assert worst < BF16_LOGPROB_TOLERANCE
    # The bf16 sampler's greedy picks are fp32's best or within the tolerance of it, step by step.
    got = generate_ids(model, rows, 6, stop_ids=[], pad_id=PAD_ID, precision="bf16")
    for prompt, new, lp in zip(rows, got, logprobs(model, [r + g for r, g in zip(rows, got, strict=True)]),
                               strict=True):
        for k, token in enumerate(new):
            position = lp[len(prompt) + k - 1]
            assert float(position.max() - position[token]) <= 2 * BF16_LOGPROB_TOLERANCE


def test_bf16_copy_follows_weight_updates():
    """The kept bf16 copy re-casts a parameter an optimizer step changed in place, and only then."""
    model = tiny_llama(seed=10)
    first = decoding_model(model, "bf16")
    assert decoding_model(model, "bf16") is first
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    again = decoding_model(model, "bf16")
    assert again is first
    torch.testing.assert_close(again.model.layers[0].mlp.down_proj.weight,
                               model.model.layers[0].mlp.down_proj.weight.to(torch.bfloat16), rtol=0, atol=0)
    assert decoding_model(model, "model") is model
    with pytest.raises(ValueError, match="precision"):
        decoding_model(model, "fp8")


def test_auto_precision_follows_native_bf16(monkeypatch):
    model = tiny_llama(seed=10)
    monkeypatch.setattr(generate_module.backend, "cpu_has_native_bf16", lambda: False)
    assert decoding_model(model, "auto") is model
    monkeypatch.setattr(generate_module.backend, "cpu_has_native_bf16", lambda: True)
    assert next(decoding_model(model, "auto").parameters()).dtype == torch.bfloat16


@pytest.mark.real
def test_smollm2_bf16_logprobs_and_greedy_equal_hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.model_source import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    rows = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
            for q in ("What is the capital of France?", "Name a colour.")]
    rows = [r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r for r in rows]
    stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    expected = [hf_generate_one_real(model, r, 12, stop, tok.pad_token_id or 0) for r in rows]
    assert generate_ids(model, rows, 12, stop_ids=stop, pad_id=tok.pad_token_id or 0) == expected
    # bf16 activations as well as weights: measured on three chat prompts, |d p| <= 0.047 over every
    # entry, |d log p| <= 0.13 on fp32's top token (up to 1.17 in the far tail, where p ~ 1e-10).
    for a, b in zip(logprobs(model, rows), logprobs(decoding_model(model, "bf16"), rows), strict=True):
        assert float((a.exp() - b.exp()).abs().max()) < 0.1
        best = a.argmax(-1, keepdim=True)
        assert float((a.gather(-1, best) - b.gather(-1, best)).abs().max()) < 0.25


def hf_generate_one_real(model, ids, budget, stop_ids, pad_id):
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=budget, do_sample=False, eos_token_id=sorted(stop_ids),
                         pad_token_id=pad_id)[0, len(ids):].tolist()
    for k, t in enumerate(out):
        if t in stop_ids:
            return out[:k + 1]
    return out


def test_compiled_steps_fall_back_to_eager_when_compiling_fails(monkeypatch):
    """A compiler failure (here: a stand-in for torch.compile that raises on call) costs a warning, not
    the answers: the steps run eagerly and give what eager decoding gives."""
    model, tok = tiny_llama(seed=12), tiny_tokenizer()
    rows = prompt_ids(tok)
    eager = generate_ids(model, rows, 7, stop_ids=[EOS_ID], pad_id=PAD_ID, batch_size=3)
    calls = []

    def broken_compile(module, **kwargs):
        def run(**inputs):
            calls.append(1)
            raise RuntimeError("no C++ compiler here")
        return run

    monkeypatch.setattr(generate_module.torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        got = generate_ids(model, rows, 7, stop_ids=[EOS_ID], pad_id=PAD_ID, batch_size=3, compile_steps=True)
    assert got == eager and len(calls) == 1  # tried once, then eager for good
