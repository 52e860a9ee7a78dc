"""Read and write LoRA adapters in PEFT's on-disk format.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with
keys ``base_model.model.<module path>.lora_A.weight`` (``[r, in]``) and ``.lora_B.weight``
(``[out, r]``), exactly what ``PeftModel.save_pretrained`` writes for a causal LM, so
``PeftModel.from_pretrained`` loads ours and :func:`load_adapter` loads theirs.

Only plain LoRA is accepted: DoRA, other PEFT methods, trained biases, ``modules_to_save``
and similar extras are refused with an error that says what and why, never loaded partly.
PEFT is not imported: the format is written out by hand here.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .lora_layers import (
    CONFIG_ATTR,
    LoRAConfig,
    all_linear_paths,
    apply_lora,
    is_linear_like,
    lora_modules,
    module_matches,
    pattern_value,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."


class AdapterFormatError(ValueError):
    """An adapter directory this loader cannot honour (with what is wrong and where)."""


# ------------------------------------------------------------------------------- saving


def save_adapter(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write the LoRA layers of ``model`` as a PEFT adapter directory; returns its path.

    The write is atomic: files go to a temporary sibling directory that is renamed over
    ``out_dir`` only when complete, so a crash never leaves a half-written adapter.
    """
    from safetensors.torch import save_file

    layers = lora_modules(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers (apply_lora or load_adapter first)")
    out_dir = Path(out_dir)
    config = adapter_config_dict(model)
    tensors = {}
    for path, layer in layers:
        # contiguous() + clone: safetensors refuses shared or strided storage.
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = layer.lora_A.detach().to("cpu").contiguous().clone()
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = layer.lora_B.detach().to("cpu").contiguous().clone()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        with open(tmp_dir / CONFIG_NAME, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        _follow_umask(tmp_dir)
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _follow_umask(directory: Path) -> None:
    """Give ``directory`` and its files the modes a plain mkdir/open would (0777 / 0666 minus
    the umask): ``mkdtemp`` makes it 0700 and safetensors writes its file 0600. (The trainer
    has the same fix in trainer.checkpoint.follow_umask; kernels imports nothing of the project.)"""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    for path in (directory, *directory.iterdir()):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _replace_dir(new_dir: Path, target: Path) -> None:
    """Rename ``new_dir`` to ``target``; an existing ``target`` is moved aside first and
    removed only after the rename succeeded (a directory cannot be renamed over a non-empty one)."""
    if not target.exists():
        os.replace(new_dir, target)
        return
    if not target.is_dir():
        raise FileExistsError(f"save_adapter: {target} exists and is not a directory")
    old_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old_dir)
    os.replace(target, old_dir)
    try:
        os.replace(new_dir, target)
    except BaseException:
        os.replace(old_dir, target)
        raise
    shutil.rmtree(old_dir, ignore_errors=True)


def adapter_config_dict(model: nn.Module) -> dict[str, Any]:
    """The ``adapter_config.json`` contents PEFT expects for the LoRA layers of ``model``."""
    layers = lora_modules(model)
    stored: LoRAConfig | None = model.__dict__.get(CONFIG_ATTR)
    first = layers[0][1]
    r = stored.r if stored else first.r
    alpha = stored.lora_alpha if stored else first.lora_alpha
    use_rslora = stored.use_rslora if stored else first.use_rslora
    dropout = stored.lora_dropout if stored else first.dropout_p
    paths = [path for path, _ in layers]
    # Per-module exceptions to the default rank / alpha, keyed by full path (a PEFT regex
    # key that matches exactly that module).
    rank_pattern = {path: layer.r for path, layer in layers if layer.r != r}
    alpha_pattern = {path: layer.lora_alpha for path, layer in layers if layer.lora_alpha != alpha}
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": _compact_target_modules(model, paths),
        "exclude_modules": None,
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),
        "bias": "none",
        "lora_bias": False,
        "use_rslora": use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "layer_replication": None,
        "target_parameters": None,
        "trainable_token_indices": None,
        "auto_mapping": None,
    }


def _compact_target_modules(model: nn.Module, paths: list[str]) -> list[str]:
    """The short names (``["q_proj", "v_proj"]``) when they select exactly ``paths`` under
    PEFT's suffix rule, else the full paths (which always select exactly themselves)."""
    wanted = set(paths)
    short = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = {name for name, _ in model.named_modules() if name and module_matches(name, short)}
    return short if selected == wanted else sorted(wanted)


# ------------------------------------------------------------------------------ loading


# Config fields that change what the adapter computes; a value other than the neutral one
# means the file needs something this loader does not implement.
_UNSUPPORTED_FIELDS = {
    "use_dora": (False, "DoRA adapters (use_dora=true) are not supported; merge it with PEFT first"),
    "lora_bias": (False, "adapters with a trained LoRA bias (lora_bias=true) are not supported"),
    "modules_to_save": (None, "modules_to_save (fully trained extra modules) is not supported"),
    "layers_to_transform": (None, "layers_to_transform is not supported; list the module paths in target_modules"),
    "layer_replication": (None, "layer_replication is not supported"),
    "target_parameters": (None, "target_parameters (LoRA on raw nn.Parameters) is not supported"),
    "trainable_token_indices": (None, "trainable_token_indices is not supported"),
    "use_qalora": (False, "QA-LoRA adapters are not supported"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens) is not supported"),
    "megatron_config": (None, "Megatron-parallel adapters are not supported"),
}


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Load and validate ``adapter_config.json``; raises :class:`AdapterFormatError`."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / CONFIG_NAME
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter directory {adapter_dir} does not exist")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: not a PEFT adapter directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{config_path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    where = str(config_path)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFormatError(f"{where}: peft_type is {peft_type!r}; only 'LORA' adapters can be loaded")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(
            f"{where}: bias={config['bias']!r} (trained base biases) is not supported; only bias='none'"
        )
    for key, (neutral, message) in _UNSUPPORTED_FIELDS.items():
        value = config.get(key, neutral)
        if value not in (neutral, None, False, [], {}):
            raise AdapterFormatError(f"{where}: {message} (found {key}={value!r})")
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise AdapterFormatError(f"{where}: required field {key!r} is missing")
    return config


def _adapter_targets(model: nn.Module, config: dict[str, Any], where: str) -> list[str]:
    """Module paths the config selects, by PEFT's rules (suffix list, regex, all-linear, exclude)."""
    target_modules = config["target_modules"]
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        paths = all_linear_paths(model)
    else:
        paths = [name for name, _ in model.named_modules() if name and module_matches(name, target_modules)]
    exclude = config.get("exclude_modules")
    if exclude:
        paths = [p for p in paths if not module_matches(p, exclude)]
    if not paths:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear_like(m)})
        raise AdapterFormatError(
            f"{where}: target_modules {target_modules!r} match no module of {type(model).__name__} "
            f"(its linear layers: {', '.join(names)}); is this adapter for another model?"
        )
    return paths


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Apply LoRA to ``model`` as the adapter's config says and load its weights; in place.

    Reads adapters written by :func:`save_adapter` and by PEFT's ``save_pretrained``.  Every
    module the config targets must have both weights in the file and every tensor in the
    file must belong to one, with matching shapes; otherwise nothing is changed and an
    :class:`AdapterFormatError` says which keys are wrong.
    """
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights_path = adapter_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        if (adapter_dir / LEGACY_WEIGHTS_NAME).is_file():
            raise AdapterFormatError(
                f"{adapter_dir / LEGACY_WEIGHTS_NAME}: pickled adapters are not loaded (unsafe); convert it with "
                "PEFT (PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True))"
            )
        raise FileNotFoundError(f"{weights_path} is missing")
    if lora_modules(model):
        raise ValueError("load_adapter: the model already has LoRA layers; load into a fresh base model")

    where = str(adapter_dir / CONFIG_NAME)
    paths = _adapter_targets(model, config, where)
    wrong_kind = [f"{p} ({type(model.get_submodule(p)).__name__})" for p in paths if not is_linear_like(model.get_submodule(p))]
    if wrong_kind:
        raise AdapterFormatError(f"{where}: target_modules select non-linear modules: {', '.join(wrong_kind[:8])}")
    r, alpha = int(config["r"]), config["lora_alpha"]
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}

    state = load_file(str(weights_path))
    expected = {}
    for path in paths:
        module = model.get_submodule(path)
        in_f, out_f = _in_out(module)
        rank = int(pattern_value(rank_pattern, path, r))
        expected[f"{KEY_PREFIX}{path}.lora_A.weight"] = (rank, in_f)
        expected[f"{KEY_PREFIX}{path}.lora_B.weight"] = (out_f, rank)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise AdapterFormatError(
            f"{weights_path}: keys do not match the modules its config targets in {type(model).__name__}: "
            + "; ".join(parts)
        )
    bad_shapes = [f"{k}: file {tuple(state[k].shape)} vs model {shape}" for k, shape in expected.items()
                  if tuple(state[k].shape) != shape]
    if bad_shapes:
        raise AdapterFormatError(f"{weights_path}: shape mismatch: " + "; ".join(bad_shapes[:4]))

    apply_lora(
        model,
        r=r,
        alpha=alpha,
        dropout=float(config.get("lora_dropout") or 0.0),
        targets=paths,
        use_rslora=bool(config.get("use_rslora", False)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    with torch.no_grad():
        for path, layer in lora_modules(model):
            layer.lora_A.copy_(state[f"{KEY_PREFIX}{path}.lora_A.weight"])
            layer.lora_B.copy_(state[f"{KEY_PREFIX}{path}.lora_B.weight"])
    return model


def _in_out(module: nn.Module) -> tuple[int, int]:
    weight = module.weight
    if is_linear_like(module) and not isinstance(module, nn.Linear):  # Conv1D: [in, out]
        return int(weight.shape[0]), int(weight.shape[1])
    return int(weight.shape[1]), int(weight.shape[0])
