"""Every registered Triton kernel config compiles for sm_80 and sm_90 on the CPU and fits the
target's shared memory (``kernels.compile_check``; the wheel ships ptxas, no GPU needed).

This catches what the interpreter lets through (1-bit masks spilled to shared memory, tiles
over the shared-memory limit, code the real compiler rejects).  The compile runs in one
subprocess without ``TRITON_INTERPRET``: the kernels must be real JIT functions there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
# The kernels every LoRA config must cover: a missing one means a spec list went stale.
LORA_KERNELS = {"lora_down", "lora_fwd", "lora_bwd_dyb", "lora_bwd_dx", "keep_mask"}
# The same for the linear cross-entropy and the AdamW+EWC step, per module: kernel -> variants.
OTHER_KERNELS = {
    "kernels.linear_cross_entropy_triton": {"lce_fwd": {"bf16", "fp32"}, "lce_bwd_dh": {"bf16", "fp32"},
                                            "lce_bwd_dw": {"bf16", "fp32"}},
    "kernels.adamw_ewc": {"adamw_ewc": {"fp32", "fp32/no_ewc", "bf16"}},
}


@pytest.fixture(scope="module")
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "kernels.compile_check", "--json", "--probe", "--arch", *map(str, ARCHS)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"compile_check printed no report (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])


def _describe(r: dict) -> str:
    shared = "did not compile" if r["shared_bytes"] is None else f"{r['shared_bytes']} bytes of shared memory"
    error = f": {r['error'][-600:]}" if r["error"] else ""
    return f"{r['module']}:{r['name']} on sm_{r['arch']}: {shared} (limit {r['limit_bytes']}){error}"


def test_every_kernel_config_compiles_and_fits_shared_memory(report):
    results = [r for r in report["results"] if r["module"] != "kernels.compile_check"]
    assert results, f"no kernel specs were discovered: {report['notes']}"
    bad = [_describe(r) for r in results if not r["fits"]]
    assert not bad, "kernel configs that fail on a real GPU target:\n" + "\n".join(bad)


def test_lora_specs_cover_every_kernel_on_both_targets(report):
    seen = {(r["name"].split("/")[0], r["arch"]) for r in report["results"] if r["module"] == "kernels.lora_triton"}
    assert seen == {(k, a) for k in LORA_KERNELS for a in ARCHS}


@pytest.mark.parametrize("module", sorted(OTHER_KERNELS))
def test_new_kernel_specs_cover_every_variant_on_both_targets(report, module):
    seen = {(r["name"], r["arch"]) for r in report["results"] if r["module"] == module}
    want = {(f"{kernel}/{variant}", arch) for kernel, variants in OTHER_KERNELS[module].items()
            for variant in variants for arch in ARCHS}
    assert seen == want


def test_checker_sees_an_oversized_kernel(report):
    """The probe's shared memory is known by hand: one pipeline stage holds a BLOCK x BLOCK bf16
    tile of each operand (64 KiB at 128, 16 KiB at 64), and the pipeliner keeps ``num_stages``
    buffers on sm_90 and ``num_stages - 1`` on sm_80.  The checker must report that and flag
    the 4-stage 128-wide probe as over the limit on both targets."""
    probes = {(r["name"], r["arch"]): r for r in report["results"] if r["module"] == "kernels.compile_check"}
    for arch in ARCHS:
        over, small = probes[("probe_over_limit", arch)], probes[("probe_small", arch)]
        buffers_over, buffers_small = (4, 2) if arch >= 90 else (3, 1)
        assert over["ok"] and over["shared_bytes"] == buffers_over * 2 * 128 * 128 * 2, _describe(over)
        assert not over["fits"]
        assert small["fits"] and small["shared_bytes"] == buffers_small * 2 * 64 * 64 * 2, _describe(small)
