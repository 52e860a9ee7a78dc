"""The end-to-end bench measured as users run trainers: one fresh process per side and round
(bench/e2e_process.py, bench/e2e_runners.py).

The bookkeeping (round order, per-round and summary rows, ours against the fastest / leanest
peer) is checked with stand-in children against hand-computed numbers; one quick run starts
the real children (ours through ``trainer.run``, HF Trainer + PEFT, TRL ``SFTTrainer`` + PEFT)
at a tiny shape, and their step-1 losses are checked against each other: the peers are the
independent reference that our trainer computes the same loss on the same model and rows.
No timing is asserted.
"""
from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
from pathlib import Path

import pytest
import torch

from bench import e2e_process, harness
from bench.__main__ import main
from bench.e2e_process import RunPlan, measure_sides
from bench.e2e_runners import SideResult, SideSpec, parse_result, run_side

REPO = Path(__file__).resolve().parent.parent
TOKENS = 1000


def _result(step_ms: list[float], rss: float, loss: float = 2.5) -> SideResult:
    """A child's result whose steps 2..N took ``step_ms``."""
    stamps = [0.0]
    for ms in step_ms:
        stamps.append(stamps[-1] + ms / 1e3)
    return SideResult(stamps_s=stamps, losses=[loss] * len(stamps), vmhwm_mib=rss, tensor_peak_mib=None,
                      wall_s=1.0, threads=2)


def _spec(name: str) -> SideSpec:
    kind = {"ours": "ours", "hf_peft": "hf"}.get(name, "trl")
    return SideSpec(kind=kind, model_dir="m", data="d.jsonl", output_dir=f"out/{name}", method="lora",
                    precision="fp32", batch=8, seq=125, steps=1)


def test_step_ms_keeps_the_steps_after_warmup():
    result = SideResult(stamps_s=[0.0, 1.0, 3.0, 6.0, 10.0], losses=[1.0] * 5, vmhwm_mib=1.0, tensor_peak_mib=None,
                        wall_s=1.0, threads=1)
    # Step k takes stamp k - stamp k-1: steps 2..5 took 1, 2, 3, 4 s; warm-up 2 keeps steps 3..5.
    assert result.step_ms(2) == pytest.approx([2000.0, 3000.0, 4000.0])
    assert result.step_ms(1) == pytest.approx([1000.0, 2000.0, 3000.0, 4000.0])


def test_parse_result_reads_the_last_result_line():
    line = ('E2E_RESULT {"stamps_s": [0.0, 0.5], "losses": [3.0, 2.0], "vmhwm_mib": 12.5, '
            '"tensor_peak_mib": null, "wall_s": 2.0, "threads": 4}')
    got = parse_result("config ...\nstep 1 loss 3.0\n" + line + "\n")
    assert got.vmhwm_mib == 12.5 and got.losses == [3.0, 2.0] and got.tensor_peak_mib is None
    with pytest.raises(ValueError, match="no E2E_RESULT line"):
        parse_result("Traceback ...\n")


def test_rounds_alternate_and_every_round_is_a_row(monkeypatch, capsys):
    # Median step times (ms) per round, warm-up steps first; tokens/s = 1000 / ms * 1000.
    medians = {"ours": [100, 125, 100], "hf_peft": [250, 250, 250], "trl_sft": [200, 160, 200]}
    rss = {"ours": [500, 500, 500], "hf_peft": [1000, 1000, 1000], "trl_sft": [800, 900, 800]}
    calls: list[tuple[str, str, int]] = []

    def fake_child(spec: SideSpec) -> SideResult:
        name = spec.output_dir.split("/")[-1].rsplit("-r", 1)[0]
        round_index = int(spec.output_dir.rsplit("-r", 1)[1]) - 1
        calls.append((name, spec.output_dir, spec.steps))
        m = medians[name][round_index]
        return _result([999.0, m - 10, m, m + 10], rss[name][round_index])

    monkeypatch.setattr(e2e_process, "run_child", fake_child)
    ctx = harness.BenchContext(device=torch.device("cpu"), quick=False, version="test")
    sides = {n: _spec(n) for n in ("ours", "hf_peft", "trl_sft")}
    measure_sides(ctx, "k", "cfg", TOKENS, sides, RunPlan(rounds=3, timed_steps=3, warmup_steps=2,
                                                          tensor_memory=False))
    # One process per side and round, the order reversed every other round, 2 + 3 steps each.
    assert [c[0] for c in calls] == ["ours", "hf_peft", "trl_sft", "trl_sft", "hf_peft", "ours",
                                     "ours", "hf_peft", "trl_sft"]
    assert {c[2] for c in calls} == {5}
    assert len({c[1] for c in calls}) == 9  # a fresh output folder per process

    rows = {(r.provider, r.mode, r.metric): r for r in ctx.rows}
    for name in sides:
        for i, m in enumerate(medians[name], start=1):
            assert rows[(name, f"round{i}", "throughput")].p50 == pytest.approx(TOKENS / m * 1e3)
            assert rows[(name, f"round{i}", "time")].p50 == pytest.approx(m)
            assert rows[(name, f"round{i}", "rss")].p50 == rss[name][i - 1]
            assert rows[(name, f"round{i}", "first_loss")].p50 == 2.5
    ours = rows[("ours", "full", "throughput")]
    assert (ours.p50, ours.p20, ours.p80) == pytest.approx(((10000 + 8000 + 10000) / 3, 8000, 10000))
    trl = rows[("trl_sft", "full", "throughput")]
    assert (trl.p50, trl.p20, trl.p80) == pytest.approx(((5000 + 6250 + 5000) / 3, 5000, 6250))

    # Speed against the fastest peer (trl_sft by mean), memory against the leanest (trl_sft).
    out = capsys.readouterr().out
    assert "tokens/s: ours / fastest peer (trl_sft) = 1.72x (rounds 1.28-2.00)" in out
    assert "peak RSS: ours / leanest peer (trl_sft) = 0.60x (rounds 0.56-0.62)" in out
    speed = harness.Target("speed", "k", "throughput", "fastest peer", best_of=("hf_peft", "trl_sft"), min_ratio=1.6)
    memory = harness.Target("rss", "k", "rss", "leanest peer", best_of=("hf_peft", "trl_sft"), max_ratio=0.6)
    lines = harness.target_lines(ctx.rows, [speed, memory])
    assert f"{28000 / 3 / (16250 / 3):>9.3f}" in lines[1] and "met" in lines[1] and "(peer: trl_sft)" in lines[1]
    assert f"{500 / (2500 / 3):>9.3f}" in lines[2] and "(peer: trl_sft)" in lines[2]
    # The ratio table and the targets read the over-rounds rows only; the CSV keeps every round.
    assert not any("round" in line.split()[1] for line in harness.ratio_lines(ctx.rows)[2:])


def test_a_failing_side_is_noted_and_the_others_go_on(monkeypatch):
    def fake_child(spec: SideSpec) -> SideResult:
        if spec.kind == "ours":
            raise RuntimeError("exit 2: error: no config key 'packing'")
        return _result([100.0, 100.0, 100.0], 100.0)

    monkeypatch.setattr(e2e_process, "run_child", fake_child)
    ctx = harness.BenchContext(device=torch.device("cpu"), quick=False, version="test")
    got = measure_sides(ctx, "k", "cfg", TOKENS, {n: _spec(n) for n in ("ours", "hf_peft")},
                        RunPlan(rounds=2, timed_steps=1, tensor_memory=False))
    assert "ours not ready" in ctx.notes[0] and "no config key" in ctx.notes[0]
    assert len(ctx.notes) == 1  # tried once, not again in round 2
    assert {r.provider for r in ctx.rows} == {"hf_peft"} and len(got["hf_peft"].results) == 2


def test_ewc_and_packing_sides_get_their_own_kernels(tmp_path, monkeypatch, one_thread):
    """lora_ewc runs as one more side of the LoRA case and is compared with ours' lora there;
    packed and padded compare real tokens/s over the same plan of rows."""
    from bench import e2e_smollm2 as sm

    def fake_child(spec: SideSpec) -> SideResult:
        ms = {"lora": 100.0, "lora_ewc": 104.0}[spec.method] if spec.kind == "ours" else 150.0
        if spec.extra.get("packing") == "true":
            ms = 50.0
        return _result([ms] * (spec.steps - 1), 100.0)

    monkeypatch.setattr(e2e_process, "run_child", fake_child)
    ctx = harness.BenchContext(device=torch.device("cpu"), quick=True, version="test")
    model_dir = sm.write_model_dir(tmp_path, sm.QUICK_SHAPE)
    plan = RunPlan(rounds=2, timed_steps=3, tensor_memory=False)
    sm.bench_case(ctx, tmp_path, model_dir, sm.QUICK_SHAPE, sm.Case("lora", "fp32", 4, 32), with_ewc=True,
                  peaks={"fp32": 1.0, "bf16": 1.0}, plan=plan, only=None)
    rows = {(r.kernel, r.provider, r.mode, r.metric): r for r in ctx.rows}
    assert rows[("sm2_lora_ewc", "ours", "full", "time")].p50 == pytest.approx(104.0)
    assert rows[("sm2_lora_ewc", "lora", "full", "time")].p50 == pytest.approx(100.0)
    assert not any(r.provider == "ours_lora_ewc" for r in ctx.rows if r.kernel == "sm2_lora")
    assert {r.provider for r in ctx.rows if r.kernel == "sm2_lora"} == {"ours", "hf_peft", "trl_sft", "trl_sft_fast"}
    assert "1.040" in "\n".join(harness.target_lines(ctx.rows, [t for t in sm.TARGETS if t.kernel == sm.K_LORA_EWC]))

    sm.bench_packing(ctx, tmp_path, model_dir, sm.QUICK_SHAPE, plan, only=None)
    pack = {(r.provider, r.mode, r.metric): r for r in ctx.rows if r.kernel == sm.K_PACK}
    # The same real tokens in half the time.
    assert pack[("ours", "full", "throughput")].p50 == pytest.approx(2 * pack[("padded", "full", "throughput")].p50)
    assert ("padded", "round2", "throughput") in pack


@pytest.mark.parametrize("runner", ["run_ours", "run_hf"])
def test_in_process_probe_runners_call_on_step_once_a_step(tmp_path, one_thread, runner):
    """bench/probes (profile_step) run both sides in their own process through ``on_step``: one call
    per optimizer step (the HF side once crashed on a clock attribute the callback clock lacked)."""
    from bench import e2e_smollm2 as sm

    model_dir = sm.write_model_dir(tmp_path, sm.QUICK_SHAPE)
    data = sm.write_long_rows(tmp_path / "rows.jsonl", 8, 32, sm.QUICK_SHAPE.vocab)
    calls = []
    getattr(sm, runner)(model_dir, data, tmp_path / "out", sm.Case("lora", "fp32", 2, 32), 3, torch.device("cpu"),
                        lambda: calls.append(1))
    assert len(calls) == 3


def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], check=True)


def test_tensor_memory_run_counts_at_least_the_loaded_weights(tmp_path, one_thread):
    """The CPU tensor-memory side (tracker around model loading and two steps): at least the
    model's fp32 weights are allocated inside it."""
    from bench.e2e_smollm2 import QUICK_SHAPE, write_long_rows, write_model_dir

    model_dir = write_model_dir(tmp_path, QUICK_SHAPE)
    data = write_long_rows(tmp_path / "rows.jsonl", 4, 32, QUICK_SHAPE.vocab)
    spec = SideSpec(kind="hf", model_dir=str(model_dir), data=str(data), output_dir=str(tmp_path / "out"),
                    method="full", precision="fp32", batch=4, seq=32, steps=2, tensor_memory=True)
    result = run_side(spec)
    from transformers import AutoModelForCausalLM

    weights = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(str(model_dir)).parameters())
    assert result.tensor_peak_mib >= weights / 2**20
    assert len(result.stamps_s) == 2 and result.vmhwm_mib > 0


# ----------------------------------------------------------------------------- real children
@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    """``python -m bench e2e --shape smollm2-135m --quick``: ours, HF + PEFT and TRL, each in its
    own process, at the tiny shape (2 layers, width 64, 4 x 32 rows, 2 + 1 steps, fp32)."""
    out = tmp_path_factory.mktemp("e2e-quick")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["e2e", "--shape", "smollm2-135m", "--quick", "--device", "cpu", "--out-dir", str(out),
                     "--no-plots"]) == 0
    finally:
        torch.set_num_threads(before)
    (path,) = out.glob("cpu-*-quick.csv")
    with path.open() as fh:
        return list(csv.DictReader(fh))


# TRL is in the `bench` extra, not in `test`: without it the TRL side is noted as failed, and
# its rows are not asked for.
SIDES = ("ours", "hf_peft") + (("trl_sft",) if importlib.util.find_spec("trl") is not None else ())


def test_quick_run_writes_round_and_summary_rows_for_every_side(quick_rows):
    got = {(r["kernel"], r["provider"], r["mode"], r["metric"]) for r in quick_rows}
    for side in SIDES:
        for metric in ("throughput", "time", "rss", "first_loss"):
            assert ("sm2_lora", side, "round1", metric) in got, (side, metric)
        for metric in ("throughput", "time", "rss", "peak_share"):
            assert ("sm2_lora", side, "full", metric) in got, (side, metric)
    for r in quick_rows:
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
        if r["metric"] == "rss":
            assert float(r["p50"]) > 50  # a Python process with torch loaded: tens of MiB at least


def test_ours_and_the_peers_compute_the_same_first_step_loss(quick_rows):
    """Same saved model, same 4 rows of 32 tokens, fp32: HF + PEFT and TRL (chunked NLL head) are
    the reference for the loss our trainer computes before its first update."""
    loss = {r["provider"]: float(r["p50"]) for r in quick_rows if r["metric"] == "first_loss"}
    assert set(SIDES) <= set(loss)
    assert math.isfinite(loss["ours"]) and loss["ours"] > 1.0
    assert loss["ours"] == pytest.approx(loss["hf_peft"], rel=1e-4)
    if "trl_sft" in SIDES:
        assert loss["trl_sft"] == pytest.approx(loss["hf_peft"], rel=1e-4)
