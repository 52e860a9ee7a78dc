"""Two processes (gloo, CPU) against one with the same global batch: DDP for EWC (so the sharded
Fisher pass and its all-reduce are in play too) and FSDP2 for full fine-tuning.

Tolerance: 1e-5 absolute on each step's loss. The two runs do the same arithmetic except the
order of the sums (per-rank partial sums then all-reduce), so they differ by float32 rounding
(~1e-7 relative), not by anything a bug would produce (a wrong shard or normalisation moves the
loss by 1e-2 or more here).
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_trainer_e2e import make_workspace, run_config

from trainer.loop import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, runs: list[tuple[str, dict]], ws: dict, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from pathlib import Path

    for out, overrides in runs:  # one spawn for every run: starting a process costs more than a tiny run
        result = train(run_config(ws, Path(out), **overrides))
        if rank == 0:
            queue.put(dict(result.losses))


def _two_process_losses(ws: dict, runs: list[tuple[str, dict]]) -> list[dict[int, float]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, runs, ws, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        losses = [queue.get(timeout=300) for _ in runs]
    finally:
        for p in procs:
            p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return losses


def _fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


# Same global batch of 4 rows per micro-step x 2 accumulation steps: 1 process x 4 rows, or
# 2 processes x 2 rows. EWC exercises DDP and the sharded Fisher pass; full + fsdp exercises
# FSDP2 (fully_shard works on CPU with gloo in this torch).
CASES = {
    "ddp_ewc_replay": dict(method="ewc", replay_ratio=0.25, ewc_lambda=50.0, fisher_samples=16),
    "fsdp2_full": dict(method="full", fsdp=True),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_dist")
    ws = make_workspace(root, n_task=24, n_general=16)
    cases = {name: dict(learning_rate=3e-3, max_steps=4, gradient_accumulation_steps=2,
                        replay_data=str(ws["general"]), **extra)
             for name, extra in CASES.items() if _fsdp_available() or not extra.get("fsdp")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one = {name: train(run_config(ws, root / f"one-{name}", per_device_train_batch_size=4, **c)).losses
           for name, c in cases.items()}
    two = _two_process_losses({k: str(v) for k, v in ws.items()},
                              [(str(root / f"two-{name}"), dict(per_device_train_batch_size=2, **c))
                               for name, c in cases.items()])
    torch.set_num_threads(threads)
    return {name: (one[name], two[i], root / f"one-{name}", root / f"two-{name}") for i, name in enumerate(cases)}


@pytest.mark.parametrize("case", list(CASES))
def test_two_gloo_processes_match_one_with_the_same_global_batch(runs, case):
    if case not in runs:
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) is not in this torch")
    one, two, one_dir, two_dir = runs[case]
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5, (step, two[step], one[step])
    assert one[4] < one[1]
    # Rank 0 saved the whole model (FSDP: gathered from the shards) and it is the same model.
    from safetensors.torch import load_file

    ref = load_file(str(one_dir / "model" / "model.safetensors"))
    got = load_file(str(two_dir / "model" / "model.safetensors"))
    assert sorted(got) == sorted(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)
