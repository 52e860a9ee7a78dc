"""objective=dft (each token's NLL times its own detached probability), ASFT (DFT + kl_to_base), the
forgetting proxy KL(base || tuned) on the validation rows, and the stops built on them
(early_stopping_metric=task, max_kl_to_base).

References: float64 full logits (F.cross_entropy / log_softmax, differentiated by autograd) from
the model itself and, for the base, from an independently built copy of it; hand-computed scores
of a suite whose rows match or fail by construction; checkpoints the run itself wrote for the
weights a stop must keep."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_trainer_e2e import make_workspace, run_config, write_jsonl
from tiny_models import tiny_llama, tiny_qwen2, tiny_tokenizer

from kernels import apply_lora, backend
from kernels.linear_cross_entropy import linear_cross_entropy
from kernels.lora_layers import lora_disabled
from trainer.config import ConfigError, TrainConfig
from trainer.data import IGNORE_INDEX, TokenizedSet, encode_row
from trainer.distributed import DistContext
from trainer.forgetting_proxy import TASK_SCORE_ROWS, build_kl_proxy, build_task_scorer, check_stop_config
from trainer.kl_anchor import build_kl_anchor
from trainer.loop import train
from trainer.loss import Head, choose_head, token_weighting, validation_sums
from trainer.packing import build_batch

pytestmark = pytest.mark.usefixtures("one_thread")
NULL = contextlib.nullcontext
CPU = torch.device("cpu")
ROWS = [{"prompt": "hi>", "completion": "ab"}, {"prompt": "a longer prompt>", "completion": "yes"},
        {"prompt": "q>", "completion": "a much longer answer"}, {"prompt": "x>", "completion": "zz"}]


# ---------------------------------------------------------------------------- DFT in the kernel


def _dft_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_t p_t · nll_t over labelled tokens, p_t = exp(-nll_t) held constant (float64)."""
    nll = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return ((-nll.detach()).exp() * nll).sum()


def _kernel_problem(dtype, n=23, d=16, v=300, seed=0, device=CPU):
    gen = torch.Generator().manual_seed(seed)
    h = (2.0 * torch.randn(n, d, generator=gen, dtype=torch.float64)).to(device, dtype).requires_grad_()
    w = (0.5 * torch.randn(v, d, generator=gen, dtype=torch.float64)).to(device, dtype).requires_grad_()
    b = torch.randn(v, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::4] = IGNORE_INDEX
    # a token the head already predicts well, so the weights spread over (0, 1)
    with torch.no_grad():
        labels[1] = int((h[1].double() @ w.double().t() + b.double()).argmax())
    return h, w, b, labels.to(device)


def _kernel_reference(h, w, b, labels, reduction):
    hd, wd, bd = (t.detach().cpu().double().requires_grad_() for t in (h, w, b))
    labels = labels.cpu()
    loss = _dft_reference(hd @ wd.t() + bd, labels)
    if reduction == "mean":
        loss = loss / (labels != IGNORE_INDEX).sum()
    loss.backward()
    return loss.detach(), (hd.grad, wd.grad, bd.grad)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_dft_linear_cross_entropy_against_float64_full_logits(reduction):
    h, w, b, labels = _kernel_problem(torch.float64)
    ref_loss, ref_grads = _kernel_reference(h, w, b, labels, reduction)
    plain = float(F.cross_entropy(h.detach() @ w.detach().t() + b.detach(), labels, reduction=reduction))
    with backend.forced("torch"):
        # 7 rows a chunk: the weights come out of several chunk passes
        loss = linear_cross_entropy(h, w, labels, bias=b, reduction=reduction, weighting="probability",
                                    chunk_bytes=7 * 300 * 8)
    loss.backward()
    assert abs(float(loss.detach()) - plain) > 1e-3  # the weighting changes the loss: the test can fail
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for got, ref in zip((h.grad, w.grad, b.grad), ref_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.interpret
def test_dft_linear_cross_entropy_triton_path_against_float64_full_logits(device):
    """The Triton path (compiled on CUDA, the interpreter on CPU): the weights ride in the
    kernels' per-token gradient scale. fp32 (tf32 off) against float64: a few ulps of each sum."""
    from kernels import linear_cross_entropy_triton as lce_triton

    h, w, b, labels = _kernel_problem(torch.float32, device=device)
    ref_loss, ref_grads = _kernel_reference(h, w, b, labels, "sum")
    blocks = lce_triton.LCEBlocks(block_n=16, block_v=128, block_d=16, num_warps=4, num_stages=1, split=2)
    with backend.forced("triton"), lce_triton.use_blocks(blocks):
        loss = linear_cross_entropy(h, w, labels, bias=b, weighting="probability")
        loss.backward()
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-5)
    for got, ref in zip((h.grad, w.grad, b.grad), ref_grads, strict=True):
        torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-4, atol=1e-5)


def test_an_unknown_weighting_is_refused():
    h, w, b, labels = _kernel_problem(torch.float64)
    with pytest.raises(ValueError, match="weighting='focal'"):
        linear_cross_entropy(h, w, labels, weighting="focal")
    with pytest.raises(ValueError, match="weighting"):
        Head(True, weighting="focal")


# ---------------------------------------------------------------------------- DFT through the head


def _examples():
    tok = tiny_tokenizer()
    return [encode_row(tok, r) for r in ROWS], tok.pad_token_id


def _lora_moved(model):
    apply_lora(model, r=4, alpha=8)
    with torch.no_grad():  # B = 0 at init would hide the adapters entirely
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)),
                                          dtype=p.dtype))
    return model


def _inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_dft_head_loss_and_grads_against_float64_full_logits(builder, lora, fused, packing):
    examples, pad = _examples()
    model = builder(seed=3, initializer_range=0.2).double()
    if lora:
        _lora_moved(model)
    batch = build_batch(examples, pad, packing)
    head = Head(fused, weighting="probability")
    loss, _, _ = head.forward(model, batch, NULL)
    grads = torch.autograd.grad(loss, _trainable(model))
    ref = _dft_reference(model(**_inputs(batch), use_cache=False).logits, batch["shift_labels"])
    ref_grads = torch.autograd.grad(ref, _trainable(model))
    plain = float(Head(fused).forward(model, batch, NULL)[0].detach())
    assert plain - float(ref.detach()) > 1e-2  # every weight is below 1: DFT's sum is the smaller
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-12)


def test_objective_dft_reaches_the_head_as_a_weighting_and_validation_stays_plain_nll():
    examples, pad = _examples()
    assert token_weighting(TrainConfig(data="x", objective="dft")) == "probability"
    assert token_weighting(TrainConfig(data="x")) == "none"
    model = tiny_llama(seed=3).double()
    head = choose_head(model, examples[0], pad, CPU, want=True, sharded=False, weighting="probability")
    assert head.fused and head.weighting == "probability"
    assert choose_head(model, examples[0], pad, CPU, want=False, sharded=False,
                       weighting="probability").weighting == "probability"
    ctx = DistContext()
    batch = build_batch(examples, pad, packing=False)
    with torch.no_grad():
        logits = model(**_inputs(batch), use_cache=False).logits.double()
    ref_nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["shift_labels"].reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="mean")
    val, extra = validation_sums(model, examples, 8, pad, ctx, NULL, head)
    assert extra is None
    assert val == pytest.approx(float(ref_nll), rel=1e-10)


# ---------------------------------------------------------------------------- ASFT = DFT + beta KL


def _kl_reference(model, base, batch, mask) -> torch.Tensor:
    """Σ over ``mask`` of KL(base || model) per token, from float64 full logits."""
    with torch.no_grad():
        log_base = torch.log_softmax(base(**_inputs(batch), use_cache=False).logits.double(), -1)
    log_p = torch.log_softmax(model(**_inputs(batch), use_cache=False).logits.double(), -1)
    return (log_base.exp() * (log_base - log_p)).sum(-1)[mask].sum()


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_asft_objective_is_dft_plus_beta_kl(lora):
    from trainer.data import REPLAY, TASK

    examples, pad = _examples()
    model = tiny_llama(seed=7, initializer_range=0.2).double()
    base = tiny_llama(seed=7, initializer_range=0.2).double()
    if lora:
        apply_lora(model, r=4, alpha=8)
    sources = {TASK: examples[:2], REPLAY: examples[2:]}
    keys = [(TASK, 0), (TASK, 1)]
    beta = 0.1
    cfg = TrainConfig(data="x", objective="dft", kl_to_base=beta)
    anchor = build_kl_anchor(cfg, model, lora, True, sources, set(keys), pad, CPU, NULL, False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # training moves the model away from the base the anchor holds
        for name, p in model.named_parameters():
            if (lora and "lora_B" in name) or (not lora and p.ndim == 2):
                p.add_((0.3 if lora else 0.05) * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    batch = build_batch([sources[s][i] for s, i in keys], pad, packing=False)
    head = Head(True, weighting=token_weighting(cfg))
    loss_sum, hidden, lm_head = head.forward(model, batch, NULL)
    objective = loss_sum + anchor.beta * anchor.term(batch, keys, hidden, lm_head, NULL)  # what train_step adds
    mask = batch["shift_labels"] != IGNORE_INDEX
    dft = _dft_reference(model(**_inputs(batch), use_cache=False).logits, batch["shift_labels"])
    kl = _kl_reference(model, base, batch, mask)
    assert float(kl.detach()) > 1e-3
    ref = dft + beta * kl
    got, want = float(objective.detach()), float(ref.detach())
    assert abs(got - want) <= 1e-6 * max(1.0, abs(want))
    grads = torch.autograd.grad(objective, _trainable(model))
    ref_grads = torch.autograd.grad(ref, _trainable(model))
    # Llama's RMSNorm computes in fp32 even in a float64 model, so a gradient flowing through it is
    # rounded at 2^-24: the gradient of a sum is the sum of the gradients to ~1e-7 of its size
    # (each part alone matches its reference exactly: the DFT and KL tests).
    for g, r in zip(grads, ref_grads, strict=True):
        assert float((g - r).abs().max()) <= 5e-6 * float(r.abs().max())


def test_an_asft_run_trains_and_logs_the_kl(tmp_path):
    ws = make_workspace(tmp_path)
    sft = train(run_config(ws, tmp_path / "sft", method="lora", max_steps=3))
    dft = train(run_config(ws, tmp_path / "asft", method="lora", objective="dft", kl_to_base=0.1, max_steps=3))
    # Same weights and batch at step 1: DFT's sum weighs every token by a probability below 1.
    assert dft.losses[1] < sft.losses[1]
    records = [json.loads(ln) for ln in (tmp_path / "asft" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kl_to_base"] == pytest.approx(0.0, abs=1e-9) and records[-1]["kl_to_base"] > 0


# ---------------------------------------------------------------------------- the KL proxy


def _proxy_run(model, examples, cfg: TrainConfig):
    return SimpleNamespace(cfg=cfg, data=SimpleNamespace(val=TokenizedSet("val", examples)), head=Head(True),
                           kl=None, model=model, autocast=NULL, state=SimpleNamespace(step=0),
                           ctx=DistContext())


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_kl_proxy_against_float64_full_logits(lora, packing):
    examples, pad = _examples()
    model = tiny_llama(seed=11, initializer_range=0.2).double()
    base = tiny_llama(seed=11, initializer_range=0.2).double()
    if lora:
        apply_lora(model, r=4, alpha=8)
    cfg = TrainConfig(data="x", max_kl_to_base=None if lora else 1.0, eval_steps=0 if lora else 1)
    proxy = build_kl_proxy(_proxy_run(model, examples, cfg), lora)
    assert proxy is not None and proxy.source == ("adapters off" if lora else "a frozen copy of the base")
    ctx = DistContext()
    # at the start the tuned model is the base: the proxy reads 0
    _, kl0 = validation_sums(model, examples, 3, pad, ctx, NULL, Head(True), packing, also=proxy.kl_sum)
    assert abs(kl0) < 1e-12
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (lora and "lora_B" in name) or (not lora and p.ndim == 2):
                p.add_((0.3 if lora else 0.05) * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    _, kl = validation_sums(model, examples, 3, pad, ctx, NULL, Head(True), packing, also=proxy.kl_sum)
    total = tokens = 0.0
    for start in range(0, len(examples), 3):
        batch = build_batch(examples[start:start + 3], pad, packing)
        mask = batch["shift_labels"] != IGNORE_INDEX
        with torch.no_grad():
            total += float(_kl_reference(model, base, batch, mask))
        tokens += int(mask.sum())
    assert total / tokens > 1e-3
    assert kl == pytest.approx(total / tokens, rel=1e-10, abs=1e-14)


def test_lora_with_adapters_off_is_the_base():
    examples, pad = _examples()
    model = _lora_moved(tiny_llama(seed=11, initializer_range=0.2).double())
    base = tiny_llama(seed=11, initializer_range=0.2).double()
    batch = build_batch(examples, pad, packing=False)
    with torch.no_grad(), lora_disabled(model):
        torch.testing.assert_close(model(**_inputs(batch)).logits, base(**_inputs(batch)).logits, rtol=0, atol=1e-12)


def test_full_finetuning_measures_the_proxy_only_when_asked():
    examples, pad = _examples()
    model = tiny_llama(seed=11)
    run = _proxy_run(model, examples, TrainConfig(data="x"))
    assert build_kl_proxy(run, lora=False) is None  # no second copy of the weights unasked
    run.head = Head(False, "fused_head=false")
    run.cfg = TrainConfig(data="x", max_kl_to_base=0.5, eval_steps=2)
    with pytest.raises(ConfigError, match="max_kl_to_base needs .*fused"):
        build_kl_proxy(run, lora=False)


# ---------------------------------------------------------------------------- the task score


def _controlled_suite(path: Path, hits_in_first: int, n_rows: int = TASK_SCORE_ROWS + 10) -> Path:
    """Rows that match whatever the model says (regex that always finds) or never: the score of
    the first TASK_SCORE_ROWS rows is known without knowing what the model generates."""
    rows = [{"_meta": {"name": "controlled"}}]
    for i in range(n_rows):
        always = i < hits_in_first or i >= TASK_SCORE_ROWS  # the rows past the cap would raise the score
        rows.append({"category": "task", "prompt": f"{i}>", "match": "regex",
                     "answer": "(?s).*" if always else "(?!)", "max_new_tokens": 3})
    return write_jsonl(path, rows)


def test_task_score_is_the_suite_scorer_on_the_first_rows(tmp_path):
    tok = tiny_tokenizer()
    suite = _controlled_suite(tmp_path / "suite.jsonl", hits_in_first=20)
    scorer = build_task_scorer(TrainConfig(data="x", capability_task=str(suite)), tok)
    ctx = DistContext()
    model = tiny_llama(seed=1)
    model.train()
    assert scorer.score(model, ctx) == pytest.approx(100.0 * 20 / TASK_SCORE_ROWS)
    assert model.training  # scored in eval mode, the mode given back
    capped = build_task_scorer(TrainConfig(data="x", capability_task=str(suite), capability_limit=10), tok)
    assert capped.score(model, ctx) == pytest.approx(100.0)


def test_stop_settings_that_cannot_work_are_refused_before_a_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="capability_task"):
        check_stop_config(TrainConfig(data="x", early_stopping_metric="task", eval_steps=2))
    with pytest.raises(ConfigError, match="eval_steps"):
        check_stop_config(TrainConfig(data="x", max_kl_to_base=0.1))
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"_meta": {"name": "c", "chat": True}},
                                                 {"category": "t", "prompt": "p", "answer": "a"}])
    with pytest.raises(ConfigError, match="chat template"):
        build_task_scorer(TrainConfig(data="x", capability_task=str(chat)), tiny_tokenizer())


# ---------------------------------------------------------------------------- the stops in a run


def _records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter_equals_checkpoint(out: Path, step: int) -> None:
    from kernels.peft_format import load_adapter

    saved = tiny_llama(seed=0, hidden_size=32, intermediate_size=40, num_attention_heads=2,
                       num_key_value_heads=1, initializer_range=0.2)
    load_adapter(saved, out / "adapter")
    kept = load_file(str(out / f"checkpoint-{step}" / "trainable.safetensors"))
    named = dict(saved.named_parameters())
    assert kept and all(torch.equal(named[k], v) for k, v in kept.items()), f"not the weights of step {step}"


def test_early_stopping_on_the_task_score_stops_and_restores_the_best(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path)
    suite = _controlled_suite(tmp_path / "suite.jsonl", hits_in_first=5)
    scores = iter([10.0, 40.0, 30.0, 40.0, 90.0, 95.0])  # best at the 2nd eval; no gain in the next two
    monkeypatch.setattr("trainer.forgetting_proxy.score_task", lambda model, tok, s: next(scores))
    out = tmp_path / "task"
    result = train(run_config(ws, out, method="lora", eval_data=str(ws["task"]), capability_task=str(suite),
                              early_stopping_metric="task", early_stopping_patience=2, eval_steps=2,
                              save_steps=2, save_total_limit=0))
    assert result.stopped_early and result.best_step == 4
    evals = [r for r in _records(out) if "eval_loss" in r]
    assert [(r["step"], r["task_score_val"]) for r in evals] == [(2, 10.0), (4, 40.0), (6, 30.0), (8, 40.0)]
    assert all("kl_to_base_val" in r for r in evals)  # LoRA: the proxy is always logged
    _adapter_equals_checkpoint(out, 4)
    assert "best task score 40.0 at step 4" in result.summary()


def test_max_kl_to_base_stops_and_keeps_the_last_weights_under_the_bound(tmp_path):
    ws = make_workspace(tmp_path)
    common = dict(method="lora", eval_data=str(ws["task"]), eval_steps=2, save_steps=2, save_total_limit=0)
    free = train(run_config(ws, tmp_path / "free", **common))
    kl = free.kl_to_base_val
    assert sorted(kl) == [2, 4, 6, 8, 10, 12] and not free.stopped_early
    # the first eval step whose KL is above every earlier one: a bound between them stops there
    crossing = next(s for s in sorted(kl) if s > 2 and kl[s] > max(v for t, v in kl.items() if t < s))
    bound = (kl[crossing] + max(v for t, v in kl.items() if t < crossing)) / 2
    out = tmp_path / "bounded"
    result = train(run_config(ws, out, max_kl_to_base=bound, **common))
    assert result.stopped_early and max(r["step"] for r in _records(out)) == crossing
    assert result.kl_to_base_val == {s: v for s, v in kl.items() if s <= crossing}  # same run until the stop
    _adapter_equals_checkpoint(out, crossing - 2)
    assert f"kept the weights of step {crossing - 2}" in result.stop_reason


# ---------------------------------------------------------------------------- the probe script


def test_kl_proxy_vs_gate_probe_on_a_tiny_run(tmp_path, monkeypatch, capsys):
    from bench.probes.kl_proxy_vs_gate import main, spearman

    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    ws = make_workspace(tmp_path)
    words = ["cat", "dog", "sun", "red"]
    suite = write_jsonl(tmp_path / "general.jsonl", [{"_meta": {"name": "g"}}] + [
        {"category": c, "prompt": f"{w}>", "answer": w[::-1], "max_new_tokens": 4}
        for c in ("a", "b") for w in words])
    out = tmp_path / "run"
    train(run_config(ws, out, method="lora", eval_data=str(ws["task"]), eval_steps=4, save_steps=4,
                     save_total_limit=0, capability_suite=str(suite), max_steps=8))
    assert main([str(out), "--out", str(tmp_path / "plot.png")]) == 0
    assert (tmp_path / "plot.png").stat().st_size > 1000
    data = json.loads((tmp_path / "plot.json").read_text())
    logged = {r["step"]: r["kl_to_base_val"] for r in _records(out) if "kl_to_base_val" in r}
    assert {p["step"]: p["kl_to_base_val"] for p in data["points"]} == logged == {
        s: logged[s] for s in (4, 8)}
    assert "Spearman" in capsys.readouterr().out
    # A second call (e.g. plotting runs scored in parallel processes) reads the run's saved points;
    # another --limit scores again.
    assert main([str(out), "--out", str(tmp_path / "again.png")]) == 0
    assert "2 checkpoints scored before" in capsys.readouterr().out
    assert json.loads((tmp_path / "again.json").read_text())["points"] == data["points"]
    assert main([str(out), "--limit", "2", "--out", str(tmp_path / "limited.png")]) == 0
    assert "scored before" not in capsys.readouterr().out
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)  # 1 - 6*2/(4*15), by hand
    assert main([str(tmp_path / "nothing")]) == 2
