"""objective=sdft (trainer/sdft.py): the generalised JSD kernel against float64 autograd; the
SDFT loss and its gradients against a float64 reference built from full logits (student and an
independent copy of the base as teacher, prompts and the teacher's context written out by hand,
answers from a reference greedy loop without a KV cache) on tiny Llama and Qwen2, LoRA and full;
one step of a real run against a hand-built step; a resumed SDFT run against the straight one;
and the bad input that must fail before a model loads."""
from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_chat_eval import CHAT_VOCAB, IM_END, chatml_tokenizer
from test_kl_anchor import _move  # the student leaves the base, as training does
from tiny_models import EOS_ID, tiny_llama, tiny_qwen2, tiny_tokenizer
from torch import nn

from kernels import apply_lora
from kernels.linear_cross_entropy import linear_kl_divergence
from kernels.lora_layers import lora_modules
from trainer.config import SDFT_TEMPLATE, ConfigError, TrainConfig, validate
from trainer.data import REPLAY, TASK, encode_row, plan_batches, tokenize_file
from trainer.loop import train
from trainer.loss import Head, final_hidden
from trainer.packing import build_batch
from trainer.preflight import check_objective
from trainer.sdft import LossPart, build_objective

pytestmark = pytest.mark.usefixtures("one_thread")
NULL = contextlib.nullcontext

TASK_ROWS = [
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "four"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sky?"},
                  {"role": "assistant", "content": "blue"}, {"role": "user", "content": "grass?"},
                  {"role": "assistant", "content": "green it is"}]},
    {"prompt": "capital of France?", "privileged_context": "Paris"},  # TRL's SDFT row, read as it is
]
REPLAY_ROWS = [{"text": "the cat sat"}, {"text": "on a mat today"}]


def chat(*turns: tuple[str, str], answer_header: bool = True) -> str:
    """The ChatML text of ``turns`` (test_chat_eval's template), written out by hand."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return text + ("<|im_start|>assistant\n" if answer_header else "")


# (student prompt, teacher prompt) of each task row, as the paper's template says
def teacher_turn(question: str, demonstration: str) -> str:
    return SDFT_TEMPLATE.replace("{prompt}", question).replace("{demonstration}", demonstration)


PROMPTS = [
    (chat(("user", "2+2?")), chat(("user", teacher_turn("2+2?", "four")))),
    (chat(("system", "be brief"), ("user", "sky?"), ("assistant", "blue"), ("user", "grass?")),
     chat(("system", "be brief"), ("user", "sky?"), ("assistant", "blue"),
          ("user", teacher_turn("grass?", "green it is")))),
    (chat(("user", "capital of France?")), chat(("user", teacher_turn("capital of France?", "Paris")))),
]


def greedy_reference(model: nn.Module, prompt: list[int], budget: int, stops: set[int]) -> list[int]:
    """Argmax decoding by full forwards (no cache, no padding): the sampler's reference."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(budget):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token in stops:
                break
    return ids[len(prompt):]


def divergence_reference(log_ps: torch.Tensor, log_pt: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Summed per-token divergence from full log-probabilities [tokens, vocab]."""
    if kind == "forward":
        return (log_pt.exp() * (log_pt - log_ps)).sum()
    if kind == "reverse":
        return (log_ps.exp() * (log_ps - log_pt)).sum()
    mix = (beta * log_pt.exp() + (1 - beta) * log_ps.exp()).log()
    return beta * (log_pt.exp() * (log_pt - mix)).sum() + (1 - beta) * (log_ps.exp() * (log_ps - mix)).sum()


# ------------------------------------------------------------------------------ the kernel


@pytest.mark.parametrize("beta", [0.5, 0.1, 0.9])
def test_jsd_kernel_against_float64_autograd(beta):
    gen = torch.Generator().manual_seed(0)
    n, d, v = 11, 7, 29
    h = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=gen, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(v, d, generator=gen, dtype=torch.float64)
    mask = torch.rand(n, generator=gen) > 0.3
    # chunks of 3 rows, so the chunk loop and the masked rows are both exercised
    loss = linear_kl_divergence(h, w, h_t, w_t, mask, kind="jsd", bias_student=b, beta=beta, chunk_bytes=3 * v * 32)
    ours = torch.autograd.grad(loss, (h, w, b))
    log_ps = torch.log_softmax(h @ w.T + b, -1)[mask]
    log_pt = torch.log_softmax(h_t @ w_t.T, -1)[mask]
    ref = divergence_reference(log_ps, log_pt, "jsd", beta)
    grads = torch.autograd.grad(ref, (h, w, b))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(ours, grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    # the symmetric JSD is bounded by log 2 per token, and 0 between equal heads
    assert float(loss.detach()) <= float(mask.sum()) * float(torch.log(torch.tensor(2.0))) + 1e-12
    same = linear_kl_divergence(h_t, w_t, h_t, w_t, kind="jsd", beta=beta)
    assert abs(float(same)) < 1e-12


def test_jsd_needs_beta_in_the_open_interval():
    h, w = torch.randn(2, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="beta"):
        linear_kl_divergence(h, w, h, w, kind="jsd", beta=1.0)


# ------------------------------------------------------------------ the loss against full logits


def _models(arch: str, lora: bool):
    build = tiny_llama if arch == "llama" else tiny_qwen2
    make = lambda: build(seed=5, vocab_size=CHAT_VOCAB, initializer_range=0.2).double()  # noqa: E731
    model, base = make(), make()
    for m in (model, base):  # eager attention takes its softmax in fp32 even for float64 models; sdpa does not
        m.set_attn_implementation("sdpa")
    if lora:
        apply_lora(model, r=4, alpha=8)
    return model, base


def _objective(cfg: TrainConfig, model, tok, lora: bool):
    task = [encode_row(tok, r) for r in TASK_ROWS]
    replay = [encode_row(tok, r) for r in REPLAY_ROWS]
    sources = {TASK: task, REPLAY: replay}
    objective = build_objective(cfg, model, tok, TASK_ROWS, lora, True, sources, tok.pad_token_id, torch.device("cpu"))
    objective.greedy = True
    return objective, sources


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sdft_loss_and_gradients_against_float64_full_logits(arch, kind, method):
    lora = method == "lora"
    tok = chatml_tokenizer()
    cfg = replace(TrainConfig(data="x"), objective="sdft", sdft_divergence=kind, sdft_jsd_beta=0.3,
                  sdft_skip_tokens=2, sdft_max_new_tokens=6, per_device_train_batch_size=1, max_length=512)
    model, base = _models(arch, lora)
    objective, sources = _objective(cfg, model, tok, lora)  # the teacher is taken from the model as it is now
    _move(model, lora)
    head = Head(True)

    def plain(rows):
        return LossPart(rows, build_batch([sources[s][i] for s, i in rows], tok.pad_token_id, False), head.forward)

    micros = [[(TASK, 0), (REPLAY, 0), (TASK, 1)], [(REPLAY, 1), (TASK, 2)]]
    parts = objective.rollout(model, 0, 0, micros, plain, NULL)
    # replay rows keep the plain loss, in a part of their own; every task row is sampled
    assert [[sorted({s for s, _ in p.rows}) for p in ps] for ps in parts] == [[[REPLAY], [TASK]], [[REPLAY], [TASK]]]
    assert all(p.forward == head.forward for ps in parts for p in ps if p.rows[0][0] == REPLAY)
    sdft_parts = [p for ps in parts for p in ps if p.rows[0][0] == TASK]
    assert [p.rows for p in sdft_parts] == [[(TASK, 0), (TASK, 1)], [(TASK, 2)]]

    params = [p for p in model.parameters() if p.requires_grad]
    loss = sum(p.forward(model, p.batch, NULL)[0] for p in sdft_parts)
    grads = torch.autograd.grad(loss, params)

    stops = {IM_END, EOS_ID}
    ref = torch.zeros((), dtype=torch.float64)
    row = 0
    for part in sdft_parts:
        for r in range(len(part.rows)):
            student_text, teacher_text = PROMPTS[row]
            s_ids = tok(student_text, add_special_tokens=False)["input_ids"]
            t_ids = tok(teacher_text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                answer = greedy_reference(model, s_ids, 6, stops)
            n = int(part.batch["attention_mask"][r].sum())
            assert part.batch["input_ids"][r, :n].tolist() == s_ids + answer  # the same sampled tokens
            keep = range(2, len(answer))  # the first sdft_skip_tokens carry no loss
            assert int((part.batch["shift_labels"][r] != -100).sum()) == len(keep)
            if not keep:
                row += 1
                continue
            log_ps = torch.log_softmax(model(input_ids=torch.tensor([s_ids + answer])).logits[0], -1)
            with torch.no_grad():
                log_pt = torch.log_softmax(base(input_ids=torch.tensor([t_ids + answer])).logits[0], -1)
            at_s = [len(s_ids) - 1 + k for k in keep]
            at_t = [len(t_ids) - 1 + k for k in keep]
            ref = ref + divergence_reference(log_ps[at_s], log_pt[at_t], kind, 0.3)
            row += 1
    assert row == 3
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-11)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, torch.zeros_like(g) if rg is None else rg, rtol=1e-7, atol=1e-10)
    assert float(loss.detach()) > 1e-4  # the demonstration moves the teacher: a real signal, not 0 = 0


def test_lora_teacher_with_adapters_off_is_the_base():
    tok = chatml_tokenizer()
    cfg = replace(TrainConfig(data="x"), objective="sdft", max_length=512)
    model, base = _models("qwen2", lora=True)
    objective, sources = _objective(cfg, model, tok, lora=True)
    _move(model, lora=True)
    batch = build_batch(sources[TASK], tok.pad_token_id, False)
    ours, head = objective.teacher.hidden(batch, NULL)
    with torch.no_grad():
        theirs, base_head = final_hidden(base, batch)
        moved = final_hidden(model, batch)[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(head.weight, base_head.weight, rtol=0, atol=0)
    assert (moved - theirs).abs().max() > 1e-3  # the student itself did move
    assert sum(p.numel() for p in model.parameters()) < 1.2 * sum(p.numel() for p in base.parameters())


def test_lora_ema_teacher_is_a_moving_average_of_the_factors():
    tok = chatml_tokenizer()
    cfg = replace(TrainConfig(data="x"), objective="sdft", sdft_teacher="ema", sdft_ema_rate=0.25, max_length=512)
    model, _ = _models("llama", lora=True)
    objective, sources = _objective(cfg, model, tok, lora=True)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    _move(model, lora=True)
    objective.after_step(model)
    batch = build_batch(sources[TASK], tok.pad_token_id, False)
    ours, _ = objective.teacher.hidden(batch, NULL)
    # reference: a model whose factors are 0.75 start + 0.25 now, set by hand
    expected = {n: 0.75 * start[n] + 0.25 * p.detach() for n, p in model.named_parameters() if "lora_" in n}
    reference, _ = _models("llama", lora=True)
    with torch.no_grad():
        for n, p in reference.named_parameters():
            p.copy_(expected[n] if n in expected else dict(model.named_parameters())[n])
        theirs, _ = final_hidden(reference.eval(), batch)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    assert len(lora_modules(model)) > 0 and model.training is not None


# ------------------------------------------------------------------------------ a real run


def _workspace(root: Path, template: bool = True) -> dict[str, Path]:
    model_dir = root / "model"
    tok = chatml_tokenizer() if template else tiny_tokenizer()
    tiny_llama(seed=1, vocab_size=CHAT_VOCAB, initializer_range=0.2).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in TASK_ROWS[:2] * 2))  # one format per file
    trl = root / "trl.jsonl"
    trl.write_text("".join(json.dumps(r) + "\n" for r in TASK_ROWS[2:] * 3))
    general = root / "general.jsonl"
    general.write_text("".join(json.dumps(r) + "\n" for r in REPLAY_ROWS * 3))
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps(r) + "\n" for r in REPLAY_ROWS))
    return {"model": model_dir, "task": task, "general": general, "text": text, "trl": trl}


def _run_cfg(ws, out: Path, **kw) -> TrainConfig:
    values = dict(model=str(ws["model"]), data=str(ws["task"]), output_dir=str(out), max_steps=1,
                  per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                  lr_scheduler_type="constant", validation_split=0.0, max_length=256, progress=False,
                  device="cpu", objective="sdft", sdft_max_new_tokens=5, sdft_skip_tokens=1, bf16="false",
                  replay_data=str(ws["general"]), replay_ratio=0.25, max_grad_norm=0.0, logging_steps=1,
                  lora_r=4, lora_alpha=8.0)
    values.update(kw)
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def test_one_sdft_step_against_a_hand_built_step(tmp_path, monkeypatch):
    import trainer.sdft

    monkeypatch.setattr(trainer.sdft.SDFTObjective, "sampling", lambda self, step, rank: None)  # greedy rollouts
    ws = _workspace(tmp_path)
    cfg = _run_cfg(ws, tmp_path / "run", method="full")
    records = []
    train(cfg, on_step_end=lambda step, record: records.append(record))

    # the hand-built step: the plan's first global batch, float64
    tok = chatml_tokenizer()
    task = tokenize_file(ws["task"], tok, 256).examples
    replay = tokenize_file(ws["general"], tok, 256).examples
    keys = plan_batches(len(task), len(replay), 0.25, 4, 1, cfg.seed)[0]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ws["model"])).double()
    base = AutoModelForCausalLM.from_pretrained(str(ws["model"])).double().eval()
    model.train()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for source, i in keys:
        if source == REPLAY:
            ids = replay[i].input_ids
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            total = total + torch.nn.functional.cross_entropy(logits, torch.tensor(replay[i].labels[1:]),
                                                              reduction="sum", ignore_index=-100)
            count += sum(1 for x in replay[i].labels[1:] if x != -100)
            continue
        student_text, teacher_text = PROMPTS[i % 2]
        s_ids = tok(student_text, add_special_tokens=False)["input_ids"]
        t_ids = tok(teacher_text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            answer = greedy_reference(model.eval(), s_ids, 5, {IM_END, EOS_ID})
        model.train()
        keep = range(1, len(answer))
        log_ps = torch.log_softmax(model(input_ids=torch.tensor([s_ids + answer])).logits[0], -1)
        with torch.no_grad():
            log_pt = torch.log_softmax(base(input_ids=torch.tensor([t_ids + answer])).logits[0], -1)
        total = total + divergence_reference(log_ps[[len(s_ids) - 1 + k for k in keep]],
                                             log_pt[[len(t_ids) - 1 + k for k in keep]], "forward", 0.5)
        count += len(keep)
    loss = total / count
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params)
    grad_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    assert records[0]["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert records[0]["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
    assert {"rollout_seconds", "train_seconds", "step_seconds", "sample"} <= set(records[0])
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert isinstance(logged["sample"], str) and logged["rollout_seconds"] >= 0.0

    # the optimizer's step on those gradients (AdamW, as the run's), against the saved model
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.grad = g
    torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                      weight_decay=0.0).step()
    trained = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "model")).double()
    for (name, ours), theirs in zip(trained.named_parameters(), params, strict=True):
        torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=1e-5, msg=name)


def test_trl_sdft_rows_run_as_they_are(tmp_path):
    ws = _workspace(tmp_path)
    result = train(_run_cfg(ws, tmp_path / "trl", data=str(ws["trl"]), method="lora", max_steps=2,
                            sdft_divergence="jsd", replay_ratio=0.0))
    assert set(result.losses) == {1, 2} and all(loss > 0 for loss in result.losses.values())


def test_resumed_sdft_run_reproduces_the_straight_run(tmp_path):
    ws = _workspace(tmp_path)
    common = dict(method="lora", sdft_teacher="ema", sdft_ema_rate=0.5, sdft_temperature=1.5,
                  sdft_num_generations=2, max_steps=4, save_steps=2, save_total_limit=0)
    straight = train(_run_cfg(ws, tmp_path / "a", **common))
    resumed_dir = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "checkpoint-2", resumed_dir / "checkpoint-2")
    assert (resumed_dir / "checkpoint-2" / "objective.safetensors").is_file()  # the EMA teacher travels along
    resumed = train(_run_cfg(ws, resumed_dir, resume_from_checkpoint="latest", **common))
    assert set(resumed.losses) == {3, 4}
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(straight.losses[step], rel=1e-6, abs=1e-9)
    assert straight.losses[3] != straight.losses[4]


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("objective", ["sdft", "dft"])
def test_sdft_and_dft_train_in_bf16_on_cpu(tmp_path, monkeypatch, objective, method):
    """``bf16=true`` on a CPU (autocast; emulated where the CPU has no native bf16): the first
    step's loss within bf16's rounding of the fp32 run's (the fp32 step is checked against float64
    above), not equal to it (bf16 did run), and the next steps close to the fp32 run's."""
    import math

    import trainer.sdft

    answer = [7, 8, 9, 10, IM_END]  # the same rollouts in both precisions: only the arithmetic differs
    monkeypatch.setattr(trainer.sdft.SDFTObjective, "sample",
                        lambda self, model, step, rank, keys, autocast:
                        [list(answer) for _ in keys for _ in range(self.cfg.sdft_num_generations)])
    ws = _workspace(tmp_path)
    losses = {}
    for bf16 in ("false", "true"):
        kw = dict(method=method, objective=objective, bf16=bf16, max_steps=3, replay_ratio=0.0)
        losses[bf16] = train(_run_cfg(ws, tmp_path / f"{objective}-{bf16}", **kw)).losses
    assert losses["true"][1] == pytest.approx(losses["false"][1], rel=2e-2)
    assert losses["true"][1] != losses["false"][1]
    # the bf16 gradients train the same way: steps 2-3 follow the fp32 run to a few bf16 roundings
    assert set(losses["true"]) == {1, 2, 3} and all(math.isfinite(v) for v in losses["true"].values())
    for step in (2, 3):
        assert losses["true"][step] == pytest.approx(losses["false"][step], rel=5e-2)


@pytest.mark.parametrize("bf16,expected", [("true", "bf16"), ("false", "model")])
def test_rollouts_decode_outside_the_runs_autocast(tmp_path, monkeypatch, bf16, expected):
    """The real sampler (no stand-in for ``sample``): a bf16 run's rollouts decode a bf16 copy of the
    model (``precision="bf16"``) with no autocast around them, an fp32 run's the model itself; both train."""
    import math

    import eval.generate
    import trainer.sdft

    monkeypatch.setattr(trainer.sdft.SDFTObjective, "sampling", lambda self, step, rank: None)
    calls, real = [], eval.generate.generate_ids

    def recording(model, prompt_ids, *args, **kwargs):
        calls.append((kwargs.get("precision"), torch.is_autocast_enabled("cpu")))
        return real(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(eval.generate, "generate_ids", recording)
    ws = _workspace(tmp_path)
    result = train(_run_cfg(ws, tmp_path / "run", method="lora", bf16=bf16, max_steps=2, replay_ratio=0.0))
    assert calls and all(call == (expected, False) for call in calls)
    assert set(result.losses) == {1, 2} and all(math.isfinite(v) for v in result.losses.values())


def test_bf16_lora_run_holds_its_base_in_bf16_and_its_numbers_do_not_move(tmp_path, monkeypatch, capsys):
    """A bf16 LoRA run (SDFT, real greedy rollouts through the decoding copy that now shares the
    bf16 base) holds the frozen base weights in bf16 and says so; its losses and adapter equal bit
    for bit those of the same run holding them in fp32 (``store_base_weights`` switched off), whose
    matmuls autocast rounds to the same bf16 weights."""
    import kernels.lora_layers
    import trainer.sdft
    from safetensors.torch import load_file

    monkeypatch.setattr(trainer.sdft.SDFTObjective, "sampling", lambda self, step, rank: None)
    ws = _workspace(tmp_path)
    kw = dict(method="lora", bf16="true", max_steps=2, replay_ratio=0.0)
    held = train(_run_cfg(ws, tmp_path / "held", **kw))
    assert "LoRA's frozen base weights held in bf16" in capsys.readouterr().out
    monkeypatch.setattr(kernels.lora_layers, "store_base_weights", lambda model, dtype: 0)
    fp32 = train(_run_cfg(ws, tmp_path / "fp32", **kw))
    assert held.losses == fp32.losses and set(held.losses) == {1, 2}
    a = load_file(str(held.saved_to / "adapter_model.safetensors"))
    b = load_file(str(fp32.saved_to / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ddp_worker(rank: int, world: int, port: int, ws: dict, out: str, queue) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import trainer.sdft

    trainer.sdft.SDFTObjective.sampling = lambda self, step, rank: None  # greedy: the same answers on any rank
    result = train(_run_cfg(ws, Path(out), method="lora", max_steps=2, gradient_accumulation_steps=1))
    if rank == 0:
        queue.put(dict(result.losses))


@pytest.mark.slow
def test_sdft_under_ddp_matches_one_process(tmp_path, monkeypatch):
    """Two processes (gloo) with one micro-batch each against one process accumulating two: the
    same global batch, so the same rollouts and the same loss (float32 rounding apart)."""
    import socket

    import torch.multiprocessing as mp

    import trainer.sdft

    ws = _workspace(tmp_path)
    monkeypatch.setattr(trainer.sdft.SDFTObjective, "sampling", lambda self, step, rank: None)
    single = train(_run_cfg(ws, tmp_path / "one", method="lora", max_steps=2, gradient_accumulation_steps=2))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, ws, str(tmp_path / "two"), queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    try:
        losses = queue.get(timeout=300)
    finally:
        for proc in procs:
            proc.join(timeout=60)
    assert all(proc.exitcode == 0 for proc in procs)
    assert set(losses) == {1, 2}
    for step, loss in losses.items():
        assert loss == pytest.approx(single.losses[step], abs=1e-5)


# ------------------------------------------------------------------------------ bad input


def test_sdft_on_text_rows_fails_before_the_model_loads(tmp_path):
    ws = _workspace(tmp_path)
    cfg = _run_cfg(ws, tmp_path / "o", data=str(ws["text"]), replay_ratio=0.0)
    with pytest.raises(ConfigError, match=r'objective=sdft.*"text"\} rows.*objective=sft'):
        check_objective(cfg, model_is_local=True)


def test_sdft_on_chat_rows_needs_a_chat_template(tmp_path):
    ws = _workspace(tmp_path, template=False)
    with pytest.raises(ConfigError, match="no chat template.*tokenizer=DIR"):
        check_objective(_run_cfg(ws, tmp_path / "o"), model_is_local=True)


def test_bad_sdft_input_exits_2_from_the_command_line(tmp_path, capsys):
    from trainer.run import main

    ws = _workspace(tmp_path, template=False)
    code = main([f"model={ws['model']}", f"data={ws['task']}", f"output_dir={tmp_path / 'o'}", "objective=sdft",
                 "progress=false"])
    assert code == 2
    assert "chat template" in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.mark.parametrize("change, message", [
    ({"sdft_template": "{prompt} only"}, "sdft_template must hold {demonstration}"),
    ({"sdft_teacher": "live"}, "sdft_teacher"),
    ({"sdft_divergence": "tv"}, "sdft_divergence"),
])
def test_bad_sdft_settings_name_the_key(tmp_path, capsys, change, message):
    from trainer.run import main

    ws = _workspace(tmp_path)
    args = [f"model={ws['model']}", f"data={ws['task']}", f"output_dir={tmp_path / 'o'}", "objective=sdft"]
    code = main(args + [f"{k}={v}" for k, v in change.items()])
    assert code == 2
    assert message in capsys.readouterr().err
