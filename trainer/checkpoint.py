"""Step checkpoints: written atomically, weights in safetensors, state loaded without pickle code.

A checkpoint directory ``output_dir/checkpoint-<step>/`` holds

* ``trainable.safetensors``: the trainable weights (the LoRA factors, or every weight of a
  full fine-tune) - the base model itself is reloaded from its own directory on resume;
* ``state.pt``: optimizer state, the step (which is the data position: the batch plan is a
  pure function of the seed), RNG states, early-stopping state; plain tensors, ints, floats
  and lists only, read back with ``torch.load(weights_only=True)``;
* ``trainer_state.json``: the same scalars in readable form.

It is written under ``.tmp-checkpoint-<step>`` and renamed into place, so a crash mid-write
never leaves a half checkpoint that ``latest`` would pick.

Files the trainer writes follow the umask like any other tool's (:func:`follow_umask`):
safetensors writes through a private temporary file and leaves its result 0600.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    """What the loop needs, besides weights and optimizer, to continue exactly."""

    step: int
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    best_task_score: float | None = None  # early_stopping_metric=task (trainer.forgetting_proxy)
    kl_safe_step: int | None = None  # max_kl_to_base: the last eval step whose KL to the base was under it
    tokens_seen: int = 0
    # Rows trained so far, over the whole run (a resumed run's summary counts from step 1).
    task_rows: int = 0
    replay_rows: int = 0


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (/proc), since
    setting and restoring it races with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give ``path`` (a file, or a directory and everything under it) the mode a plain
    ``open``/``mkdir`` would have: 0666 / 0777 minus the umask. Writers that go through a
    private temporary file (safetensors' ``save_file``, ``mkstemp``, ``mkdtemp``) leave 0600 / 0700."""
    mask = current_umask()
    root = Path(path)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` beside ``path`` and rename it into place (a reader, or a resume, sees the old
    file or the new one, never half of one), with the mode a plain ``open`` would give it."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    follow_umask(tmp)
    os.replace(tmp, path)
    return path


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints in ``output_dir``, oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(spec: str, output_dir: str | Path) -> Path:
    """``latest`` -> the newest checkpoint in output_dir; else the given directory, checked."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint=latest: no checkpoint-<step> directory in {output_dir}")
        return found[-1]
    path = Path(spec)
    if not (path / "state.pt").is_file() or not (path / "trainable.safetensors").is_file():
        raise FileNotFoundError(f"resume_from_checkpoint={spec}: not a checkpoint directory (needs state.pt "
                                "and trainable.safetensors)")
    return path


def save_checkpoint(output_dir: str | Path, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    state: TrainerState, save_total_limit: int = 0, rng: dict | None = None,
                    best: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically; ``rng`` defaults to the current RNG state and
    ``best`` (the best weights so far, for early stopping) goes to ``best.safetensors``."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{state.step}"
    tmp = root / f".tmp-checkpoint-{state.step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    if best is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
    scalars = state.__dict__.copy()
    torch.save({"optimizer": optimizer_state, "trainer": scalars, "rng": rng or rng_state()}, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(scalars, indent=2), encoding="utf-8")
    follow_umask(tmp)
    if final.exists():  # same step saved twice (e.g. interrupt right after a periodic save)
        shutil.rmtree(final)
    tmp.rename(final)
    if save_total_limit > 0:
        for old in list_checkpoints(root)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, TrainerState, dict]:
    """(trainable weights, optimizer state, TrainerState, rng state) of a checkpoint."""
    path = Path(path)
    trainable = load_file(str(path / "trainable.safetensors"))
    blob = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    known = {f.name for f in fields(TrainerState)}
    # Checkpoints written before a field existed load with that field's default.
    state = TrainerState(**{k: v for k, v in blob["trainer"].items() if k in known})
    return trainable, blob["optimizer"], state, blob["rng"]


def load_best(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The best weights saved with a checkpoint (early stopping), if any."""
    best = Path(path) / "best.safetensors"
    return load_file(str(best)) if best.is_file() else None
