"""Keeps ``python -m bench`` working: the harness on tiny shapes in quick mode.

No timing is asserted (CI machines are shared and noisy); the tests check what the harness
writes (CSV columns, the rows each provider should produce, the ratio table, the PNGs) and
check the CPU memory tracker against hand-computed byte counts.
"""
from __future__ import annotations

import csv
import re

import pytest
import torch

from bench import harness
from bench.__main__ import main


def _read(path):
    with path.open() as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_quantiles_match_hand_computed():
    q = harness.Quantiles.of([5.0, 1.0, 3.0, 2.0, 4.0])
    # Linear interpolation between ranks on [1, 2, 3, 4, 5]: 20% -> 1.8, 50% -> 3, 80% -> 4.2.
    assert (q.p20, q.p50, q.p80) == pytest.approx((1.8, 3.0, 4.2))


def test_memory_tracker_counts_new_storages_not_views_and_releases_frees():
    a = torch.ones(1000)  # allocated before: not counted
    tracker = harness.TensorMemoryTracker()
    with tracker:
        b = a * 2                   # +4000 bytes
        view = b[10:20]             # a view: nothing new
        c = torch.empty(500, dtype=torch.float64)  # +4000 -> 8000 live
        del c                       # freed -> 4000 live
        d = torch.zeros(250)        # +1000 -> 5000 live
        b.add_(1)                   # in place: nothing new
    assert tracker.peak == 8000
    assert tracker.live == 5000
    del b, view, d


def test_ewc_quick_writes_csv_table_and_png(tmp_path, capsys):
    assert main(["ewc", "--quick", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    csvs = list(tmp_path.glob("cpu-*.csv"))
    assert len(csvs) == 1
    columns, rows = _read(csvs[0])
    assert tuple(columns) == harness.CSV_COLUMNS
    got = {(r["kernel"], r["provider"], r["mode"], r["metric"]) for r in rows}
    want = {("ewc_step", p, "full", m) for p in ("ours", "autograd", "inplace_loop") for m in ("time", "memory")}
    assert got == want
    for r in rows:
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
        assert r["device"].startswith("cpu:") and r["timestamp"] and r["version"]
    assert "ours / peer" in out and "ewc_step" in out and "autograd" in out
    assert "issue 3: fused EWC step" in out
    # Tiny shapes judge nothing: the ratios are printed, the verdicts are not, and it says why.
    assert not re.search(r"\b(met|MISSED|ours better|peer better|equal)\b", out)
    assert "no verdicts are printed (run without --quick for them)" in out
    assert list(tmp_path.glob("*-ewc_step.png"))


def test_quick_run_writes_outside_the_repo_by_default(tmp_path, monkeypatch, capsys):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what gettempdir() returns
    before = sorted(p.name for p in harness.RESULTS_DIR.iterdir())
    assert main(["ewc", "--quick", "--device", "cpu", "--no-plots"]) == 0
    out = capsys.readouterr().out
    quick_dir = tmp_path / "forgetless-bench-quick"
    assert f"results go to {quick_dir}" in out
    assert len(list(quick_dir.glob("cpu-*-quick.csv"))) == 1
    assert sorted(p.name for p in harness.RESULTS_DIR.iterdir()) == before
    # Full runs keep writing where docs/benchmarks.md looks.
    full = harness.BenchContext(device=torch.device("cpu"), quick=False)
    assert harness.results_path(full).parent == harness.RESULTS_DIR


def test_lora_quick_rows_cover_every_provider_mode_and_dropout(tmp_path, capsys):
    assert main(["lora", "--quick", "--device", "cpu", "--results-dir", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    (path,) = tmp_path.glob("cpu-*.csv")
    _, rows = _read(path)
    layer = {(r["provider"], r["mode"], r["metric"], "dropout=0.05" in r["config"])
             for r in rows if r["kernel"] == "lora_linear"}
    for provider in ("ours", "peft", "nn.Linear"):
        for dropout in (False, True):
            for mode in ("forward", "backward", "full"):
                assert (provider, mode, "time", dropout) in layer
            assert (provider, "full", "memory", dropout) in layer
    step = {(r["provider"], r["metric"]) for r in rows if r["kernel"] == "lora_step"}
    assert step == {(p, m) for p in ("ours", "peft") for m in ("throughput", "time", "memory")}
    assert "issue 2: LoRA step tokens/s >= 1.0x PEFT, dropout 0.05" in out


def test_smollm2_shape_counts_and_flops_by_hand():
    """N and the FLOPs per token against a count of the real model's matrices and by hand."""
    from bench.e2e_smollm2 import QUICK_SHAPE, SMOLLM2_135M, build_model

    with torch.device("meta"):
        model = build_model(SMOLLM2_135M)
    # Tied head: the embedding matrix is the head's weight, so the 2-D parameters are exactly N.
    assert SMOLLM2_135M.matmul_params == sum(p.numel() for p in model.parameters() if p.ndim == 2)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M's own count
    s = QUICK_SHAPE  # L=2, d=64, ff=128, 4 heads of 16, 2 KV heads, V=512
    per_block = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    n = 2 * per_block + 64 * 512
    assert s.matmul_params == n
    assert s.flops_per_token("full", 32) == 6 * n + 12 * 2 * 64 * 32
    in_out = (64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128)
    assert s.flops_per_token("lora", 32, r=16) == 4 * n + 6 * 16 * 2 * in_out + 12 * 2 * 64 * 32


# The e2e bench's quick run (separate processes): tests/test_bench_e2e_process.py.
