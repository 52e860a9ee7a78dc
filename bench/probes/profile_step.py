"""Where one training step's time goes, ours and the peer's, at SmolLM2-135M's shape.

Runs ``bench.e2e_smollm2``'s runners (ours: ``trainer.loop.train``; peer: HF Trainer, + PEFT for
LoRA) for 3 steps each and profiles the third with ``torch.profiler`` (CPU), printing the ops by
self time. The profiler's overhead inflates small ops and can slow a step by a third: read the
shares, not the absolute times.

Run: ``python -m bench.probes.profile_step [layers=30] [bf16|fp32] [lora|full] [seq=512]`` (about 3
minutes for LoRA bf16 on this 2-core CPU); batch 8 rows of ``seq`` tokens.

Seen on the 2-core EPYC, idle, 2026-12-05, LoRA bf16, 8 x 512, 30 layers, commit 86d5044:
ours: ``aten::mm`` 45% of self time, the CPU flash attention (forward + backward) 26%, the rest
casts and elementwise work; HF + PEFT: ``aten::mm`` 35%, ``copy_`` 19%, ``_log_softmax`` and its
backward 17%, flash attention 19%.
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.e2e_smollm2 import SMOLLM2_135M, Case, run_hf, run_ours, write_long_rows, write_model_dir


def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else SMOLLM2_135M.layers
    precision = sys.argv[2] if len(sys.argv) > 2 else "bf16"
    method = sys.argv[3] if len(sys.argv) > 3 else "lora"
    seq = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    shape = replace(SMOLLM2_135M, layers=layers)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = write_model_dir(root, shape)
        data = write_long_rows(root / "rows.jsonl", 64, seq, shape.vocab)
        case = Case(method, precision, 8, seq)
        for name, runner in (("ours", run_ours), ("peer", run_hf)):
            stamps: list[float] = []
            state: dict = {}

            def on_step(stamps=stamps, state=state) -> None:
                stamps.append(time.perf_counter())
                if len(stamps) == 2:  # profile the third step
                    state["prof"] = profile(activities=[ProfilerActivity.CPU])
                    state["prof"].__enter__()
                elif len(stamps) == 3:
                    state["prof"].__exit__(None, None, None)

            runner(model_dir, data, root / f"out-{name}", case, 3, torch.device("cpu"), on_step)
            print(f"==== {name}: step times {[round(b - a, 2) for a, b in zip(stamps, stamps[1:], strict=False)]} s")
            print(state["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=25,
                                                     max_name_column_width=45), flush=True)


if __name__ == "__main__":
    main()
