"""More than one process: PyTorch's own DDP and FSDP2, nothing home-made.

``torchrun --nproc_per_node N -m trainer.run ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; then
the process group is gloo on CPU and nccl on CUDA. Every rank takes its shard of each global
batch (see ``trainer.data.micro_batches``); the loss is normalised by the token count of the
whole global batch, so the averaged DDP gradient equals the single-process one. The Fisher pass
shards its rows and all-reduces ``fisher * rows`` sums. Only rank 0 writes files.

``fsdp=true`` shards full fine-tuning with FSDP2 (``torch.distributed.fsdp.fully_shard``): each
block of ``model.model.layers`` (or any ``nn.ModuleList`` of blocks) and then the root.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(preference)


def setup(device_preference: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun; a single-process context otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistContext(rank, world, local_rank, device)


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``value`` over ranks (returns ``value`` itself in one process)."""
    if ctx.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def reduce_fisher(fisher: dict[str, torch.Tensor], rows: int, ctx: DistContext) -> dict[str, torch.Tensor]:
    """Per-rank mean Fishers over ``rows`` rows each -> the mean over all ranks' rows."""
    if not ctx.enabled:
        return fisher
    total = all_reduce_sum(torch.tensor(float(rows), dtype=torch.float64, device=ctx.device), ctx)
    out = {}
    for name in sorted(fisher):  # same order on every rank
        summed = all_reduce_sum(fisher[name].to(ctx.device) * rows, ctx)
        out[name] = summed / total.to(summed.dtype)
    return out


def _blocks(model: nn.Module) -> list[nn.Module]:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return list(module)
    return []


def wrap_model(model: nn.Module, ctx: DistContext, fsdp: bool) -> nn.Module:
    """DDP (or FSDP2 with ``fsdp``) around the model when running on more than one process."""
    if not ctx.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, skip_sync: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation step."""
    if skip_sync and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The model's (trainable) weights as full CPU tensors on every rank, FSDP-sharded or not."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainable_only:
            keep = {n for n, p in model.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in keep}
        return state
    inner = unwrap(model)
    if trainable_only:
        return {n: p.detach().cpu().clone() for n, p in inner.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state with full (unsharded) tensors: plain tensors, numbers and lists only."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def load_trainable(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable weights into the model (FSDP-sharded or not); every key must match."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    named = dict(unwrap(model).named_parameters())
    missing = [k for k in weights if k not in named]
    if missing:
        raise KeyError(f"checkpoint weights not in the model: {', '.join(missing[:5])}")
    with torch.no_grad():
        for k, v in weights.items():
            named[k].copy_(v)
