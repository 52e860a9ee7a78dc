"""Score cache keyed by the weights' hash, score_against_base, and --adapter against PEFT."""
import json

import pytest
import torch
from test_eval_generate import _one_thread, reference_greedy  # noqa: F401 (autouse fixture)
from tiny_models import tiny_llama, tiny_tokenizer

import eval.capability as capability
from eval.__main__ import run
from eval.cache import model_hash

PROMPTS = ["Capital of France?", "2+2=", "Spell cat:", "Who wrote Hamlet?"]


@pytest.fixture
def suite(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "suite.jsonl"
    rows = [{"category": f"c{i % 2}", "prompt": p, "answer": "x", "max_new_tokens": 3} for i, p in enumerate(PROMPTS)]
    rows.append({"category": "mc", "prompt": "The sky is", "choices": [" blue", " red"], "answer_index": 0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _counting_score_rows(monkeypatch):
    calls = []
    original = capability._score_rows

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(capability, "_score_rows", counted)
    return calls


def test_cache_hit_and_miss(suite, monkeypatch):
    calls = _counting_score_rows(monkeypatch)
    model, tok = tiny_llama(seed=7), tiny_tokenizer()
    first = capability.score_model(model, tok, suite, cache=True)
    second = capability.score_model(model, tok, suite, cache=True, run_name="again")
    assert len(calls) == 1 and second.timing["cached"] and not first.timing["cached"]
    assert second.run_name == "again" and second.model["hash"] == first.model["hash"] == model_hash(model)
    assert [r.output for r in second.rows] == [r.output for r in first.rows]
    with torch.no_grad():
        model.model.norm.weight.add_(1e-3)  # any weight change is a different model
    third = capability.score_model(model, tok, suite, cache=True)
    assert len(calls) == 2 and not third.timing["cached"] and third.model["hash"] != first.model["hash"]


def test_model_hash_tracks_bytes():
    a, b = tiny_llama(seed=1), tiny_llama(seed=1)
    assert model_hash(a) == model_hash(b)
    assert model_hash(a) != model_hash(tiny_llama(seed=2))


def test_score_against_base_scores_the_base_once(suite, monkeypatch):
    calls = _counting_score_rows(monkeypatch)
    base, tok = tiny_llama(seed=8), tiny_tokenizer()
    tuned = tiny_llama(seed=9)
    first = capability.score_against_base(base, tuned, tok, suite, max_drop=100.0)
    second = capability.score_against_base(base, tuned, tok, suite, max_drop=100.0)
    assert len(calls) == 3  # base, tuned, tuned: the second base score comes from the cache
    assert second.forgetting.passed and set(second.forgetting.categories) == {"c0", "c1", "mc"}
    for name, change in second.forgetting.categories.items():
        assert change.after == pytest.approx(first.categories[name].accuracy)
    same = capability.score_against_base(base, base, tok, suite, max_drop=0.0)
    assert same.forgetting.passed and all(c.drop == 0 for c in same.forgetting.categories.values())


def test_cli_adapter_matches_peft_merged_model(tmp_path, suite):
    import peft
    from transformers import AutoModelForCausalLM

    model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
    tiny_llama(seed=11).save_pretrained(model_dir)
    tok = tiny_tokenizer()
    tok.save_pretrained(model_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")  # random B: a visible change
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    peft_model.save_pretrained(adapter_dir)
    merged = peft_model.merge_and_unload().eval()
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    expected = {p: reference_greedy(merged, tok, p, 3) for p in PROMPTS}
    assert expected != {p: reference_greedy(plain, tok, p, 3) for p in PROMPTS}  # the adapter matters

    out = tmp_path / "with_adapter.json"
    assert run(["--model", str(model_dir), "--adapter", str(adapter_dir), "--suite", str(suite),
                "--out", str(out), "--quiet", "--no-cache"]) == 0
    data = json.loads(out.read_text())
    assert data["model"]["adapter"] == str(adapter_dir)
    assert {r["prompt"]: r["output"] for r in data["rows"] if r["output"] is not None} == expected
