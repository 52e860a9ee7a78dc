"""Checks of a run's inputs that need no model: run first, so bad input fails in seconds.

``trainer.run`` calls :func:`check_inputs` after the config is parsed and the demo's data
paths are resolved, and before anything slow (pretraining the demo base, loading or
converting a model, tokenizing). Every failure is a :class:`ConfigError` or
:class:`DataError` whose message names the config key and the path, which ``trainer.run``
turns into exit code 2 without a traceback.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from trainer.config import SELF_REPLAY, ConfigError, TrainConfig
from trainer.data import DataError, check_jsonl, file_row_format

DATA_KEYS = ("data", "eval_data", "replay_data", "fisher_data")
SUITE_KEYS = ("capability_suite", "capability_task")


def check_output_dir(path: str) -> None:
    """``output_dir`` must be a directory that exists or can be created, and be writable."""
    if not path.strip():
        raise ConfigError("output_dir is empty; give a directory (default runs/latest)")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={path}: exists and is a file, not a directory; choose another output_dir")
    existing = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not existing.is_dir():
        raise ConfigError(f"output_dir={path}: cannot be created, {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={path}: {existing} is not writable")


def check_file_key(key: str, path: str) -> Path:
    """A path given for ``key`` must be an existing regular file."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{key}={path}: is a directory; give a file")
    if not p.exists():
        raise DataError(f"{key}={path}: file not found")
    return p


def check_data_files(cfg: TrainConfig) -> None:
    """Every JSONL the run reads, row by row (plain Python: no torch, no tokenizer)."""
    seen: set[str] = set()
    for key in DATA_KEYS:
        path = getattr(cfg, key)
        if not path or path in seen or path == SELF_REPLAY:
            continue
        seen.add(path)
        check_file_key(key, path)
        try:
            check_jsonl(path)
        except UnicodeDecodeError as e:
            raise DataError(f"{key}={path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if cfg.self_replay_prompts:
        from trainer.self_replay import read_prompt_file

        read_prompt_file(cfg.self_replay_prompts)  # FILE:LINE errors before the model loads


def check_suites(cfg: TrainConfig) -> None:
    """The capability suites scored at the end of the run are read now, not after training."""
    from eval.suite import SuiteError, load_suite

    for key in SUITE_KEYS:
        path = getattr(cfg, key)
        if not path:
            continue
        if key == "capability_suite" and path.startswith("lm-eval:"):  # lm-evaluation-harness tasks by name
            from eval.lm_eval_tasks import check_lm_eval_spec, parse_lm_eval_spec

            try:
                check_lm_eval_spec(parse_lm_eval_spec(path))  # names known, datasets readable
            except SuiteError as e:
                raise ConfigError(f"{key}={path}: {e}") from None
            continue
        check_file_key(key, path)
        try:
            load_suite(path)
        except SuiteError as e:
            raise ConfigError(f"{key}: {e}") from None


def check_model_dir(key: str, path: str) -> None:
    """A local Hugging Face model directory with safetensors weights (what load_model reads)."""
    p = Path(path)
    if not p.exists():
        from eval.model_source import REGISTERED_MODELS

        names = ", ".join(["demo", *REGISTERED_MODELS])
        raise ConfigError(f"{key}={path}: no such directory (give a local Hugging Face model directory, a .gguf "
                          f"file, or a known name; known: {names})")
    if not p.is_dir():
        raise ConfigError(f"{key}={path}: is a file; give the model's directory (config.json + *.safetensors)")
    if key != "model":
        return
    if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        raise ConfigError(f"model={path}: is a LoRA adapter, not a model; give its base model as model= "
                          "(to score base + adapter: python -m eval --model BASE --adapter DIR)")
    if not (p / "config.json").is_file() and ((p / "adapter").is_dir() or (p / "model").is_dir()):
        inside = "model" if (p / "model").is_dir() else "adapter"
        raise ConfigError(f"model={path}: is a run's output_dir, not a model; the model it saved is "
                          f"{p / inside}" + (" (an adapter: its base model is the model)" if inside == "adapter" else ""))
    if not any(p.glob("*.safetensors")):
        raise ConfigError(f"model={path}: no *.safetensors weights; forgetless loads weights only from "
                          "safetensors (convert with `model.save_pretrained(dir, safe_serialization=True)`)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"model={path}: no config.json; give a Hugging Face model directory "
                          "(what save_pretrained writes)")


def check_device(device: str) -> None:
    """``device=cuda`` where torch sees no CUDA device is the user's to fix, not a traceback."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"device={device!r}: must be auto, cpu, cuda or cuda:N")
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if count == 0:
        raise ConfigError(f"device={device}: torch {torch.__version__} sees no CUDA device; use device=cpu or auto")
    if index >= count:
        raise ConfigError(f"device={device}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def check_resume_and_fisher_files(cfg: TrainConfig) -> None:
    from trainer.checkpoint import resolve_resume

    for key in ("fisher_path", "previous_fisher"):
        if getattr(cfg, key):
            check_file_key(key, getattr(cfg, key))
    if cfg.init_adapter and not (Path(cfg.init_adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"init_adapter={cfg.init_adapter}: not an adapter directory (no adapter_config.json)")
    if cfg.resume_from_checkpoint:
        resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)  # FileNotFoundError with a message
    # ewc / lora_ewc with no fisher_data and no replay_data estimate the Fisher on the base
    # model's own answers (self-replay, trainer.setup_phases.self_replay) instead of failing.
    if cfg.interpolate == "auto" and (not cfg.capability_suite or cfg.capability_max_drop is None):
        raise ConfigError("interpolate=auto needs capability_suite and capability_max_drop (the gate it mixes to)")


def tokenizer_has_chat_template(path: str) -> bool:
    """A local tokenizer directory ships a chat template (what transformers reads into
    ``tokenizer.chat_template``): tokenizer_config.json's ``chat_template``, or a template file."""
    p = Path(path)
    if (p / "chat_template.jinja").is_file() or (p / "chat_template.json").is_file():
        return True
    config = p / "tokenizer_config.json"
    if not config.is_file():
        return False
    import json

    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (ValueError, OSError):
        return False


def check_objective(cfg: TrainConfig, model_is_local: bool) -> None:
    """``objective=sdft`` needs a demonstration in every task row, and chat rows need a chat
    template to render the student's prompt and the teacher's context."""
    if cfg.objective != "sdft":
        return
    fmt = file_row_format(cfg.data)
    if fmt == "text":
        raise ConfigError(f'objective=sdft: data={cfg.data} holds {{"text"}} rows, which have no demonstration for '
                          'the teacher to see; write {"messages": [..., {"role": "assistant", ...}]}, '
                          '{"prompt", "completion"} or {"prompt", "privileged_context"} rows, or use objective=sft')
    tokenizer_dir = cfg.tokenizer or cfg.model
    if fmt in ("messages", "prompt_privileged") and model_is_local and Path(tokenizer_dir).is_dir() \
            and not tokenizer_has_chat_template(tokenizer_dir):
        raise ConfigError(f"objective=sdft: data={cfg.data} holds chat rows, but the tokenizer at {tokenizer_dir} has "
                          "no chat template to render the student's prompt and the teacher's context; give "
                          "tokenizer=DIR with one (tokenizer_config.json \"chat_template\" or chat_template.jinja), "
                          "or write {\"prompt\", \"completion\"} rows")
    if cfg.fsdp:
        raise ConfigError("objective=sdft samples with the whole model, which fsdp=true shards; use fsdp=false "
                          "(DDP under torchrun)")
    if not cfg.fused_head:
        raise ConfigError("objective=sdft computes its divergence on the hidden states (no [tokens, vocab] logits); "
                          "set fused_head=true")
    if cfg.kl_to_base > 0 and cfg.kl_cache and cfg.kl_on != "replay":
        raise ConfigError("kl_cache=true stores the base's top-k at the data's own tokens, but objective=sdft trains "
                          "on tokens sampled each step; set kl_cache=false (a frozen copy) or kl_on=replay")


def check_stop_config(cfg: TrainConfig) -> None:
    """early_stopping_metric / max_kl_to_base needs (trainer.forgetting_proxy), before any model loads."""
    from trainer.forgetting_proxy import check_stop_config as check

    check(cfg)


def check_inputs(cfg: TrainConfig, model_is_local: bool = True) -> None:
    """Everything checkable without a model, cheapest first. ``model_is_local``: ``cfg.model``
    is a directory path (not a name still to be resolved, such as ``demo``)."""
    check_output_dir(cfg.output_dir)
    check_device(cfg.device)
    check_data_files(cfg)
    check_objective(cfg, model_is_local)
    check_stop_config(cfg)
    check_suites(cfg)
    check_resume_and_fisher_files(cfg)
    if model_is_local:
        check_model_dir("model", cfg.model)
    if cfg.tokenizer:
        check_model_dir("tokenizer", cfg.tokenizer)
