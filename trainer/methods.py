"""The four methods as compositions of two small parts, so the loop never asks which one runs.

* what trains and how it is saved: :class:`FullWeights` (every weight; an HF model directory)
  or :class:`LoRAWeights` (kernels' LoRA layers; a PEFT adapter directory);
* what holds the weights back: nothing, :class:`EWCPenalty` (the fused EWC step on every
  weight the Fisher covers) or :class:`LoRAEWCPenalty` (the base Fisher applied to ``s B A``).

``full = FullWeights``, ``lora = LoRAWeights``, ``ewc = FullWeights + EWCPenalty``,
``lora_ewc = LoRAWeights + LoRAEWCPenalty``. Every method offers the same hooks:
``prepare(model, fisher_source)``, ``trainable(model)``, ``after_backward(model) -> penalty``
and ``save(model, tokenizer, out_dir)``.

The Fisher is estimated on the *base* model before LoRA layers go in (names do not change:
``apply_lora`` keeps ``<path>.weight``), and cached as safetensors in the output directory
under a key that hashes the base weights, the Fisher data and the Fisher settings.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from trainer.checkpoint import follow_umask
from trainer.config import ConfigError, TrainConfig

# fisher_source(model) -> (fisher dict keyed by parameter name, hash of the data it used)
FisherSource = Callable[[nn.Module], dict[str, torch.Tensor]]


# --------------------------------------------------------------------- what trains


@dataclass
class FullWeights:
    """Full fine-tuning: every parameter trains; saved as an HF model directory."""

    def prepare(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)

    def save(self, model: nn.Module, tokenizer, out_dir: Path, state_dict: dict | None = None) -> Path:
        out_dir = Path(out_dir) / "model"
        model.save_pretrained(str(out_dir), state_dict=state_dict)
        tokenizer.save_pretrained(str(out_dir))
        follow_umask(out_dir)  # save_pretrained leaves model.safetensors 0600
        return out_dir


@dataclass
class LoRAWeights:
    """LoRA through kernels.lora_layers; saved as a PEFT adapter (PeftModel.from_pretrained loads it)."""

    r: int
    alpha: float
    dropout: float
    targets: list[str] | str | None
    use_rslora: bool
    init_adapter: str | None = None  # a saved adapter to continue training (its own r, alpha and targets)

    def target_paths(self, model: nn.Module) -> list[str]:
        from kernels.lora_layers import resolve_targets

        try:
            return resolve_targets(model, self.targets)
        except ValueError as e:  # lora_targets that this model does not have: the user's to fix
            raise ConfigError(f"lora_targets: {e}") from None

    def prepare(self, model: nn.Module) -> None:
        from kernels.lora_layers import apply_lora

        if self.init_adapter:
            from kernels.peft_format import AdapterFormatError, load_adapter

            try:  # the adapter's own config shapes the layers; its A and B then train on
                load_adapter(model, self.init_adapter)
            except (AdapterFormatError, FileNotFoundError) as e:
                raise ConfigError(f"init_adapter={self.init_adapter}: {e}") from None
            return
        self.target_paths(model)  # a bad lora_targets is a ConfigError naming the model's layers
        apply_lora(model, r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                   use_rslora=self.use_rslora)

    def save(self, model: nn.Module, tokenizer, out_dir: Path, state_dict: dict | None = None) -> Path:
        from kernels.peft_format import save_adapter

        out = save_adapter(model, Path(out_dir) / "adapter")
        tokenizer.save_pretrained(str(out))
        return out


# --------------------------------------------------------------------- what holds back


@dataclass
class EWCPenalty:
    """EWC: ``lam/2 sum F (w - w*)^2`` on every weight the Fisher covers.

    Its gradient ``lam F (w - w*)`` is applied inside the optimizer's own pass over the weights
    (``kernels.adamw_ewc.AdamWEWC``: two extra reads, anchor and Fisher, instead of a pass of its
    own) once the loop has :meth:`fold_into` such an optimizer; otherwise (FSDP's sharded
    parameters) the fused ``ewc_step`` adds it into ``.grad`` after backward, as before. Folded,
    the penalty's gradient is added after gradient clipping, so ``max_grad_norm`` bounds the
    data gradient only."""

    lam: float
    params: list[nn.Parameter] = field(default_factory=list)
    anchors: list[torch.Tensor] = field(default_factory=list)
    fishers: list[torch.Tensor] = field(default_factory=list)
    folded: bool = False

    def fold_into(self, make_optimizer: Callable[..., torch.optim.Optimizer]) -> torch.optim.Optimizer:
        """The optimizer ``make_optimizer(lam, anchors, fishers)`` builds, which now applies the penalty."""
        optimizer = make_optimizer(self.lam, dict(zip(self.params, self.anchors, strict=True)),
                                   dict(zip(self.params, self.fishers, strict=True)))
        self.folded = True
        return optimizer

    def fisher_params(self, model: nn.Module, weights) -> list[str]:
        return [name for name, p in model.named_parameters()]

    def attach(self, model: nn.Module, fisher: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor]) -> None:
        named = dict(model.named_parameters())
        for name, f in fisher.items():
            if name in named and named[name].requires_grad:
                p = named[name]
                self.params.append(p)
                self.anchors.append(anchors[name].to(p.device, p.dtype))
                self.fishers.append(f.to(p.device, torch.float32))

    def after_backward(self, model: nn.Module) -> float | None:
        if self.folded:
            return None  # the optimizer step applies it; its value is read at logging steps
        from kernels.ewc import ewc_step

        return float(ewc_step(self.params, self.anchors, self.fishers, self.lam))


@dataclass
class LoRAEWCPenalty:
    """LoRA + EWC: ``lam/2 sum F_W (s B A)^2`` per LoRA layer, F_W the base weight's Fisher."""

    lam: float
    terms: list[tuple] = field(default_factory=list)

    def fisher_params(self, model: nn.Module, weights) -> list[str]:
        # Only the weights LoRA will adapt need a Fisher.
        return [f"{path}.weight" for path in weights.target_paths(model)]

    def attach(self, model: nn.Module, fisher: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor]) -> None:
        from kernels.lora_layers import lora_modules

        for path, layer in lora_modules(model):
            f_w = fisher.get(f"{path}.weight")
            if f_w is None:
                raise KeyError(f"lora_ewc: no Fisher for {path}.weight")
            # GPT-2 Conv1D stores its weight [in, out]; the LoRA terms want [out, in].
            if layer.fan_in_fan_out:
                f_w = f_w.t()
            self.terms.append((layer.lora_A, layer.lora_B, f_w.contiguous().to(layer.lora_A.device, torch.float32),
                               layer.scale))

    def after_backward(self, model: nn.Module) -> float:
        from kernels.ewc import lora_ewc_step

        return float(lora_ewc_step(self.terms, self.lam))


# ------------------------------------------------------------------------- a method


@dataclass
class Method:
    name: str
    weights: FullWeights | LoRAWeights
    penalty: EWCPenalty | LoRAEWCPenalty | None = None
    fisher_file: Path | None = None  # where the Fisher came from (or went), when there is one

    def prepare(self, model: nn.Module, fisher_source: FisherSource | None = None,
                fisher_cache: Callable[[nn.Module, list[str]], Path] | None = None) -> None:
        """Estimate (or reuse) the base Fisher if the method has a penalty, then set what trains."""
        fisher = anchors = None
        if self.penalty is not None:
            if fisher_cache is None:
                raise ValueError(f"method {self.name} needs a Fisher (set fisher_data, replay_data or fisher_path)")
            names = self.penalty.fisher_params(model, self.weights)
            self.fisher_file = fisher_cache(model, names)
            fisher, anchors = load_fisher_file(self.fisher_file) if self.fisher_file.is_file() else (None, None)
            if fisher is None:
                if fisher_source is None:
                    raise ValueError(f"method {self.name} needs Fisher data (set fisher_data or replay_data)")
                for name, p in model.named_parameters():
                    p.requires_grad_(name in set(names))
                fisher = fisher_source(model)
                named = dict(model.named_parameters())
                anchors = {k: named[k].detach().clone() for k in fisher}
                save_fisher_file(self.fisher_file, fisher, anchors)
        self.weights.prepare(model)
        if self.penalty is not None:
            self.penalty.attach(model, fisher, anchors)

    def trainable(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def after_backward(self, model: nn.Module) -> float | None:
        """Add the penalty's gradient into ``.grad`` (after the data gradient is complete); returns
        the penalty, or None when the optimizer applies it (then ask the optimizer's ``penalty()``)."""
        return self.penalty.after_backward(model) if self.penalty is not None else 0.0

    def save(self, model: nn.Module, tokenizer, out_dir: str | Path, state_dict: dict | None = None) -> Path:
        return self.weights.save(model, tokenizer, Path(out_dir), state_dict)


def build_method(cfg: TrainConfig) -> Method:
    targets: list[str] | str | None = cfg.lora_targets
    if targets == ["all-linear"]:
        targets = "all-linear"
    elif targets in ([], ["default"], ["blocks"]):
        targets = None
    lora = LoRAWeights(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets, cfg.use_rslora, cfg.init_adapter)
    build = {
        "full": lambda: Method("full", FullWeights()),
        "lora": lambda: Method("lora", lora),
        "ewc": lambda: Method("ewc", FullWeights(), EWCPenalty(cfg.ewc_lambda)),
        "lora_ewc": lambda: Method("lora_ewc", lora, LoRAEWCPenalty(cfg.ewc_lambda)),
    }
    return build[cfg.method]()


# ---------------------------------------------------------------------- Fisher files


def weights_hash(model: nn.Module) -> str:
    """Hash of every parameter's bytes (the base model's identity for the Fisher cache)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if p.numel() else b"")
    return h.hexdigest()


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fisher_key(model: nn.Module, data_path: str, names: list[str], cfg: TrainConfig) -> str:
    h = hashlib.sha256()
    for part in (weights_hash(model), file_hash(data_path), cfg.fisher_kind, str(cfg.fisher_samples),
                 str(cfg.max_length), str(cfg.seed), ",".join(sorted(names)),
                 str(cfg.previous_fisher), str(cfg.ewc_online_gamma)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def save_fisher_file(path: Path, fisher: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor]) -> None:
    tensors = {f"fisher.{k}": v.detach().float().cpu().contiguous() for k, v in fisher.items()}
    tensors.update({f"anchor.{k}": v.detach().cpu().contiguous() for k, v in anchors.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # every rank writes the same bytes; never the same temp
    save_file(tensors, str(tmp), metadata={"format": "forgetless-fisher"})
    follow_umask(tmp)
    tmp.replace(path)


def load_fisher_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    fisher, anchors = {}, {}
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():
            kind, name = key.split(".", 1)
            (fisher if kind == "fisher" else anchors)[name] = fh.get_tensor(key)
    return fisher, anchors
