"""The demo tokenizer and the demo base model (tiny recipe, seconds to build).

References: the tokenizer is checked character by character against its fixed alphabet;
the base model's losses against a float64 per-example loop over its logits, and against the
random-init model built from the same recipe."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from trainer.demo import base as demo_base
from trainer.demo.base import BaseRecipe, collate, encode_rows, ensure_base_model, init_model, read_rows
from trainer.demo.tokenizer import ALPHABET, SPECIAL_TOKENS, build_tokenizer, save_tokenizer
from trainer.demo.world import build_world

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"), seed=0)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return ensure_base_model(cache_dir=tmp_path_factory.mktemp("cache"), progress=False, recipe="tiny")


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_round_trips_every_character_of_the_world(world):
    tok = build_tokenizer()
    assert len(tok) == len(SPECIAL_TOKENS) + len(ALPHABET)
    text = "".join(p.read_text() for p in (world.general_train, world.suite, world.task_train))
    chars = sorted(set(text))
    for ch in chars:
        ids = tok(ch, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, repr(ch)
        assert tok.decode(ids) == ch
    rows = read_rows(world.general_train)[:300] + read_rows(world.task_train)[:300]
    for r in rows:
        s = r["prompt"] + r["completion"]
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(s) and tok.decode(ids) == s
        # concatenation invariance: prompt and completion may be tokenized apart
        assert ids == tok(r["prompt"])["input_ids"] + tok(r["completion"])["input_ids"]


def test_tokenizer_specials_and_unknowns():
    tok = build_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.bos_token_id == tok.eos_token_id
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    assert tok.decode([5, 6, tok.eos_token_id], skip_special_tokens=True) == ALPHABET[2:4]


def test_saved_tokenizer_loads_with_autotokenizer(tmp_path):
    save_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "tokenizer_config.json").exists()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ours = build_tokenizer()
    text = "reverse: cat dog\n[SUPPORT] ticket 12: ok"
    assert loaded(text)["input_ids"] == ours(text)["input_ids"] == [ALPHABET.index(c) + 3 for c in text]
    assert (loaded.pad_token, loaded.eos_token, loaded.unk_token) == SPECIAL_TOKENS


# ---------------------------------------------------------------- rows -> batches

def test_rows_tokenize_as_prompt_completion_eos_with_loss_on_completion():
    tok = build_tokenizer()
    examples = encode_rows([{"prompt": "ab\n", "completion": "c"}, {"prompt": "x\n", "completion": "yz"}], tok)
    ids = [ALPHABET.index(c) + 3 for c in "ab\nc"] + [1]
    assert examples[0] == (ids, 3)
    batch = collate(examples, pad_id=0)
    y, z, c = (ALPHABET.index(ch) + 3 for ch in "yzc")
    assert batch["input_ids"].tolist()[0] == ids
    assert batch["labels"].tolist() == [[-100, -100, -100, c, 1], [-100, -100, y, z, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    short = collate([examples[0], ([5, 6, 7], 2)], pad_id=0)
    assert short["input_ids"][1].tolist() == [5, 6, 7, 0, 0] and short["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    assert short["labels"][1].tolist() == [-100, -100, 7, -100, -100]


def test_length_grouped_batches_draw_every_row_and_cut_padding():
    lengths = [3 + (i * 7919) % 50 for i in range(1000)]
    batches = list(demo_base.length_grouped_batches(lengths, batch_size=16, steps=100, seed=0))
    assert len(batches) == 100 and all(len(b) == 16 for b in batches)
    drawn = [i for b in batches for i in b]
    assert min(drawn) < 50 and max(drawn) > 950  # spread over the whole corpus
    useful = sum(lengths[i] for i in drawn) / sum(16 * max(lengths[i] for i in b) for b in batches)
    assert useful > 0.75  # random batches of uniform 3..52 lengths: ~0.55


# ---------------------------------------------------------------- the tiny base

def reference_completion_stats(model, examples) -> tuple[float, float]:
    """Mean NLL per completion token and greedy next-token accuracy, float64, one row at a time."""
    nll, hits, count = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for ids, prompt_len in examples:
            logits = model(torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(prompt_len, len(ids)):  # token t is predicted at position t-1
                nll -= float(logp[t - 1, ids[t]])
                hits += int(int(logits[t - 1].argmax()) == ids[t])
                count += 1
    return nll / count, hits / count


def test_tiny_base_is_a_loadable_hf_directory(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(tok) and model.config.pad_token_id == tok.pad_token_id
    assert (tiny_base / "model.safetensors").exists()
    assert json.loads((tiny_base / "recipe.json").read_text()) == json.loads(json.dumps(BaseRecipe.tiny().__dict__))
    assert not [p for p in tiny_base.parent.iterdir() if p.name.startswith(".")]  # no staging left over


def test_cached_base_is_reused_and_recipe_changes_the_key(tiny_base, monkeypatch):
    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached base was rebuilt")

    monkeypatch.setattr(demo_base, "build_base_model", no_rebuild)
    assert ensure_base_model(cache_dir=tiny_base.parent, progress=False, recipe="tiny") == tiny_base
    assert len({BaseRecipe.tiny().cache_key(), BaseRecipe(steps=61).cache_key(), BaseRecipe().cache_key()}) == 3
    with pytest.raises(ValueError, match="tiny"):
        BaseRecipe.named("huge")


def test_tiny_base_is_deterministic(tiny_base, tmp_path):
    again = ensure_base_model(cache_dir=tmp_path, progress=False, recipe="tiny")
    a = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    b = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_pretraining_beats_the_random_init_on_held_out_general_rows(tiny_base, world):
    tok = build_tokenizer()
    examples = encode_rows(read_rows(world.general_val)[:150], tok)
    trained = AutoModelForCausalLM.from_pretrained(tiny_base)
    random_init = init_model(BaseRecipe.tiny(), tok)
    nll_init, acc_init = reference_completion_stats(random_init, examples)
    nll, acc = reference_completion_stats(trained, examples)
    assert abs(nll_init - math.log(len(tok))) < 0.5  # a random init is near uniform
    assert nll < nll_init - 1.2, (nll, nll_init)  # measured: 2.44 vs 4.60
    assert acc > acc_init + 0.1, (acc, acc_init)  # measured: 0.27 vs 0.05
    # the builder's own validation loss (batched, padded, masked) agrees with the float64 loop
    assert demo_base.completion_loss(trained, examples, tok.pad_token_id, batch_size=64) == pytest.approx(nll, abs=1e-4)


def test_pretraining_loss_weights_prompt_tokens():
    """completion mean NLL + w * prompt mean NLL, against a float64 loop over single rows."""
    tok = build_tokenizer()
    rows = [{"prompt": "upper: cat\n", "completion": "CAT"}, {"prompt": "count: a b c\n", "completion": "3"},
            {"prompt": "x\n", "completion": "sorry, i cannot help."}]
    examples = encode_rows(rows, tok)
    model = init_model(BaseRecipe.tiny(), tok).eval()
    completion_nll, prompt_nll, n_completion, n_prompt = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for ids, prompt_len in examples:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
            for t in range(1, len(ids)):
                if t < prompt_len:
                    prompt_nll -= float(logp[t - 1, ids[t]])
                    n_prompt += 1
                else:
                    completion_nll -= float(logp[t - 1, ids[t]])
                    n_completion += 1
        batch = collate(examples, tok.pad_token_id)
        for weight in (0.0, 0.3):
            want = completion_nll / n_completion + weight * prompt_nll / n_prompt
            assert float(demo_base.pretraining_loss(model, batch, weight)) == pytest.approx(want, abs=1e-5)


def test_build_once_builds_once_cleans_up_and_names_an_incomplete_folder(tmp_path):
    from trainer.demo.base import IncompleteCacheError, build_once

    calls = []

    def build(staging):
        calls.append(staging)
        (staging / "done").write_text("x")

    final = tmp_path / "cache" / "thing"
    build_once(final, "done", build)
    build_once(final, "done", build)  # complete: not built again
    assert len(calls) == 1 and (final / "done").read_text() == "x"
    assert sorted(p.name for p in final.parent.iterdir()) == ["thing"]  # no staging left behind

    def failing(staging):
        (staging / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(tmp_path / "cache" / "other", "done", failing)
    assert sorted(p.name for p in final.parent.iterdir()) == ["thing"]

    blocked = tmp_path / "cache" / "blocked"
    blocked.mkdir()
    (blocked / "stray").write_text("x")  # in the way, without the marker
    with pytest.raises(IncompleteCacheError, match="blocked exists but is not complete"):
        build_once(blocked, "done", build)
    assert sorted(p.name for p in final.parent.iterdir()) == ["blocked", "thing"]
