"""Issue-2 CPU target, measured quickly: one LoRA training step, ours vs PEFT.

    python -m bench.lora_step [--rounds 5] [--dropouts 0 0.05] [--small] [--no-memory]

Step = forward, causal-LM loss, backward, AdamW step, zero_grad, on a random 4-layer,
512-wide Llama (SDPA attention, vocab 4096) with LoRA r=16 / alpha=32 on every linear layer
of the blocks (ours: ``apply_lora``; PEFT: ``target_modules="all-linear"``, which selects the
same 28 layers), batch 8 x 256.

Time: both models live in one process and their steps run interleaved (A B B A ...), after
one warm-up step each, so load from other processes hits both alike; the median per model
and the ratio of medians are printed.  The CPU here is shared: rerun and look at the spread.
Both wall time and CPU time (``time.process_time``) are printed: on a machine shared with
other jobs the wall clock mostly measures the neighbours, while the CPU seconds a step
consumes (with ``--threads 1``, where no OpenMP spin-waiting inflates them) track the work
done and predict the throughput on an idle core.

Memory: each (provider, dropout) runs in a fresh subprocess, so nothing of the other model
or of earlier steps lingers.  Two numbers:
* ``tensor peak``: bytes of tensor storage live during one steady-state step, above what was
  live before it (weights, optimizer state) - counted exactly at the ATen level with a
  ``TorchDispatchMode`` (it sees the tensors autograd saves, the dropout copies and masks);
* ``process peak``: the kernel's high-water mark of resident memory of the whole process
  (VmHWM) after two steps: what the OS sees, interpreter, weights and allocator caching
  included, so the activation difference is diluted and noisier.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SHAPE = dict(layers=4, hidden=512, intermediate=1376, heads=8, vocab=4096, batch=8, seq=256, r=16)
SMALL = dict(layers=2, hidden=128, intermediate=344, heads=4, vocab=512, batch=4, seq=64, r=8)


def build(provider: str, dropout: float, shape: dict) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"], max_position_embeddings=shape["seq"], tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    r = shape["r"]
    if provider == "ours":
        from kernels.lora_layers import apply_lora

        model = apply_lora(base, r=r, alpha=2 * r, dropout=dropout)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                target_modules="all-linear"))
    return model.train()


def make_step(model: torch.nn.Module, shape: dict):
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of new CPU tensor storages alive inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._tracked: dict[int, weakref.ref] = {}

    def _free(self, key: int, nbytes: int) -> None:
        if self._tracked.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._tracked:
                continue  # a view or an in-place result: nothing new
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self._tracked[key] = weakref.ref(storage, lambda _r, k=key, n=nbytes: self._free(k, n))
        return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(provider: str, dropout: float, shape: dict) -> dict:
    """Run in a fresh process: warm-up step, then one step per memory measure."""
    model = build(provider, dropout, shape)
    step = make_step(model, shape)
    step()  # creates the AdamW state, so what follows is a steady-state step
    step()
    # The whole process's high-water mark of resident memory (python, torch, weights, optimizer
    # state, activations, allocator caching): what a user's `top` shows.  Not a difference of
    # RSS readings: glibc keeps freed pages, so "RSS before the step" already holds the
    # previous step's activations and the difference says little.
    process_peak_mib = _status_kib("VmHWM") / 1024
    tracker = LiveTensorBytes()
    with tracker:
        step()
    return {"tensor_peak_mib": tracker.peak / 2**20, "process_peak_mib": process_peak_mib}


def measure_memory(provider: str, dropout: float, shape: dict) -> dict:
    code = (
        "import json, sys; from bench.lora_step import memory_child; "
        f"print('RESULT', json.dumps(memory_child({provider!r}, {dropout!r}, {shape!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def time_pair(dropout: float, shape: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall seconds and CPU seconds (this process, all threads) per step, per provider."""
    base_models = {p: build(p, dropout, shape) for p in ("ours", "peft")}
    steps = {p: make_step(m, shape) for p, m in base_models.items()}
    wall: dict[str, list[float]] = {p: [] for p in steps}
    cpu: dict[str, list[float]] = {p: [] for p in steps}
    order = list(steps)
    for round_index in range(rounds + 1):  # round 0 is the warm-up
        for p in order if round_index % 2 == 0 else order[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[p]()
            if round_index > 0:
                wall[p].append(time.perf_counter() - start)
                cpu[p].append(time.process_time() - start_cpu)
    return wall, cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--small", action="store_true", help="a tiny shape, to check the script runs")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-time", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 is steadier on a loaded machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = copy.copy(SMALL if args.small else SHAPE)
    tokens = shape["batch"] * shape["seq"]
    print(f"shape {shape}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    for dropout in args.dropouts:
        wall, cpu = time_pair(dropout, shape, args.rounds) if not args.no_time else ({}, {})
        for clock, samples in (("wall", wall), ("cpu", cpu)) if not args.no_time else ():
            med = {p: statistics.median(s) for p, s in samples.items()}
            spread = {p: f"{min(s):.2f}-{max(s):.2f}" for p, s in samples.items()}
            print(f"dropout={dropout} [{clock} time]: tokens/s ours {tokens / med['ours']:.0f} "
                  f"(step {med['ours']:.2f}s, range {spread['ours']}) peft {tokens / med['peft']:.0f} "
                  f"(step {med['peft']:.2f}s, range {spread['peft']}) "
                  f"-> ours/peft throughput {med['peft'] / med['ours']:.3f}x", flush=True)
        if not args.no_memory:
            mem = {p: measure_memory(p, dropout, shape) for p in ("ours", "peft")}
            for key in ("tensor_peak_mib", "process_peak_mib"):
                print(f"dropout={dropout}: {key} ours {mem['ours'][key]:.0f} MiB, peft {mem['peft'][key]:.0f} MiB "
                      f"-> ours/peft {mem['ours'][key] / mem['peft'][key]:.3f}", flush=True)


if __name__ == "__main__":
    main()
