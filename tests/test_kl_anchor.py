"""kl_to_base (trainer/kl_anchor.py): the KL term against a float64 reference built from the
full logits of the base and the tuned model (forward and reverse, only the chosen rows'
labelled positions), zero when the model is the base, the top-k cache in the batch's own order
(packed batches reorder examples), no second weight copy for LoRA, and a run that logs it."""
from __future__ import annotations

import contextlib
import gc
import json
from dataclasses import replace

import pytest
import torch
from test_trainer_e2e import make_workspace, run_config
from tiny_models import tiny_llama, tiny_tokenizer
from torch import nn

from kernels import apply_lora
from kernels.lora_layers import lora_disabled
from trainer.config import TrainConfig
from trainer.data import IGNORE_INDEX, REPLAY, TASK, encode_row
from trainer.kl_anchor import build_kl_anchor
from trainer.loop import train
from trainer.loss import Head
from trainer.packing import build_batch

pytestmark = pytest.mark.usefixtures("one_thread")
NULL = contextlib.nullcontext
ROWS = [{"prompt": "hi>", "completion": "ab"}, {"prompt": "a longer prompt>", "completion": "yes"},
        {"prompt": "q>", "completion": "a much longer answer"}, {"prompt": "x>", "completion": "zz"}]
KINDS = [TASK, REPLAY, TASK, REPLAY]


def _setup(lora: bool, dtype=torch.float64):
    """The model to tune (the base until :func:`_move` is called), an independent copy of the
    base for the references, the rows and their keys."""
    tok = tiny_tokenizer()
    examples = [encode_row(tok, r) for r in ROWS]
    sources = {TASK: [examples[0], examples[2]], REPLAY: [examples[1], examples[3]]}
    keys = [(TASK, 0), (REPLAY, 0), (TASK, 1), (REPLAY, 1)]
    model = tiny_llama(seed=7, initializer_range=0.2).to(dtype)
    if lora:
        apply_lora(model, r=4, alpha=8)
    base = tiny_llama(seed=7, initializer_range=0.2).to(dtype)
    return model, base, sources, keys, tok.pad_token_id


def _move(model: nn.Module, lora: bool) -> None:
    """What training does after the anchor is built: the model leaves the base."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if lora and "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif not lora and p.ndim == 2:
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _cfg(**kw) -> TrainConfig:
    return replace(TrainConfig(data="x"), kl_to_base=1.0, **kw)


def _reference(model, base, batch, chosen, kind) -> torch.Tensor:
    """Σ over the chosen examples' labelled positions of the token KL, from full float64 logits."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with torch.no_grad():
        log_p_base = torch.log_softmax(base(**inputs, use_cache=False).logits.double(), -1)
    log_p = torch.log_softmax(model(**inputs, use_cache=False).logits.double(), -1)
    per_token = ((log_p_base.exp() * (log_p_base - log_p)).sum(-1) if kind == "forward"
                 else (log_p.exp() * (log_p - log_p_base)).sum(-1))
    mask = torch.zeros_like(batch["shift_labels"], dtype=torch.bool)
    width = batch["input_ids"].shape[1]
    spans = (batch["row_spans"].tolist() if "row_spans" in batch
             else [[i, 0, int(n)] for i, n in enumerate(batch["attention_mask"].sum(1))])
    for (row, start, n), take in zip(spans, chosen, strict=True):
        if take:
            mask.view(-1)[row * width + start: row * width + start + n] = True
    mask &= batch["shift_labels"] != IGNORE_INDEX
    return per_token[mask].sum()


def _term(anchor, model, batch, keys):
    head = Head(fused=True)
    loss, hidden, lm_head = head.forward(model, batch, NULL)
    return anchor.term(batch, keys, hidden, lm_head, NULL)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("on", ["task", "replay", "all"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_kl_term_against_float64_full_logits(lora, on, kind, packing):
    model, base, sources, keys, pad = _setup(lora)
    anchor = build_kl_anchor(_cfg(kl_on=on, kl_kind=kind), model, lora, True, sources, set(keys), pad,
                             torch.device("cpu"), NULL, False)
    _move(model, lora)
    batch = build_batch([sources[s][i] for s, i in keys], pad, packing)
    chosen = [on == "all" or (on == "task") == (s == TASK) for s, _ in keys]
    ours = _term(anchor, model, batch, keys)
    ref = _reference(model, base, batch, chosen, kind)
    assert float(ref.detach()) > 1e-3  # the models differ: the test can fail
    torch.testing.assert_close(ours.double(), ref, rtol=1e-9, atol=1e-12)
    grads = torch.autograd.grad(ours, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    model.zero_grad()
    ref_grads = torch.autograd.grad(_reference(model, base, batch, chosen, kind),
                                    [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    for g, h in zip(grads, ref_grads, strict=True):
        if h is None or g is None:
            assert (g is None or not g.any()) and (h is None or not h.any())
        else:
            torch.testing.assert_close(g, h, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_kl_is_zero_when_the_model_is_the_base(lora):
    model, _, sources, keys, pad = _setup(lora)
    anchor = build_kl_anchor(_cfg(), model, lora, True, sources, set(keys), pad, torch.device("cpu"), NULL, False)
    batch = build_batch([sources[s][i] for s, i in keys], pad, packing=True)
    assert abs(float(_term(anchor, model, batch, keys).detach())) < 1e-12


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_topk_cache_with_the_whole_vocabulary_equals_the_frozen_copy(packing):
    """k = vocab leaves no tail, so the cached forward KL must equal the exact one: a check that
    the cached positions are matched to the batch's positions in the right order."""
    model, _, sources, keys, pad = _setup(lora=False)
    _move(model, lora=False)  # any starting point: the anchors are taken from it
    vocab = model.config.vocab_size
    cached = build_kl_anchor(_cfg(kl_cache=True, kl_topk=vocab), model, False, True, sources, set(keys), pad,
                             torch.device("cpu"), NULL, False)
    frozen = build_kl_anchor(_cfg(), model, False, True, sources, set(keys), pad, torch.device("cpu"), NULL, False)
    order = [keys[i] for i in (3, 0, 2, 1)]  # not the order the cache was built in
    batch = build_batch([sources[s][i] for s, i in order], pad, packing)
    with torch.no_grad():  # the tuned model moves away from the base after the cache is built
        for p in model.parameters():
            p.add_(0.01)
    torch.testing.assert_close(_term(cached, model, batch, order).double(),
                               _term(frozen, model, batch, order).double(), rtol=1e-3, atol=1e-6)


def _parameter_elements() -> int:
    gc.collect()
    return sum(o.numel() for o in gc.get_objects() if type(o) is nn.Parameter)


def test_lora_base_side_holds_no_second_copy_of_the_weights():
    model, _, sources, keys, pad = _setup(lora=True, dtype=torch.float32)
    before = _parameter_elements()
    lora_anchor = build_kl_anchor(_cfg(), model, True, True, sources, set(keys), pad, torch.device("cpu"), NULL, False)
    assert _parameter_elements() == before and lora_anchor.base_head is None
    # ... and its base forward reads the model's own weight storage, with the adapters off.
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, _: seen.append((mod.weight.data_ptr(), mod.disabled)))
             for m in model.modules() if hasattr(m, "lora_A")]
    lora_anchor.base_hidden(build_batch([sources[s][i] for s, i in keys], pad, packing=False))
    for h in hooks:
        h.remove()
    own = {m.weight.data_ptr() for m in model.modules() if hasattr(m, "lora_A")}
    assert seen and {ptr for ptr, _ in seen} == own and all(disabled for _, disabled in seen)
    # The full-fine-tuning anchor does hold a frozen copy: the count above can move.
    full_model, _, sources, keys, pad = _setup(lora=False, dtype=torch.float32)
    before = _parameter_elements()
    full_anchor = build_kl_anchor(_cfg(), full_model, False, True, sources, set(keys), pad, torch.device("cpu"),
                                  NULL, False)
    assert _parameter_elements() == before + sum(p.numel() for p in full_model.parameters())
    del full_anchor


def test_lora_disabled_gives_the_base_logits():
    model, base, sources, keys, pad = _setup(lora=True)
    _move(model, lora=True)
    batch = build_batch([sources[s][i] for s, i in keys], pad, packing=False)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad(), lora_disabled(model):
        torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits, rtol=0, atol=1e-12)
    with torch.no_grad():
        assert (model(**inputs).logits - base(**inputs).logits).abs().max() > 1e-3


def test_a_lora_run_with_kl_to_base_logs_it(tmp_path):
    ws = make_workspace(tmp_path)
    result = train(run_config(ws, tmp_path / "kl", method="lora", kl_to_base=0.5, replay_data=str(ws["general"]),
                              replay_ratio=0.25, kl_on="replay"))
    records = [json.loads(line) for line in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kl_to_base"] == pytest.approx(0.0, abs=1e-9)  # B = 0 at the first step: the base
    assert records[-1]["kl_to_base"] > 0.0 and result.steps == 12
