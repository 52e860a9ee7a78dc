"""Score cache: a report keyed by a hash of the weights, the tokenizer, the data and the settings.

A gate run compares a tuned model with its base; the base's scores do not change between
runs, so they are looked up here instead of being recomputed.  The directory is
``$FORGETLESS_CACHE/eval`` (default ``~/.cache/forgetless/eval``); deleting it is always safe.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from .report import CapabilityReport, ReportError, report_json

# Bump when a scoring rule changes, so old cached scores are not reused.
SCORING_VERSION = 1


def cache_dir() -> Path:
    root = os.environ.get("FORGETLESS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "forgetless")
    return Path(root) / "eval"


def model_hash(model: torch.nn.Module) -> str:
    """blake2b over every state-dict tensor (name, dtype, shape, bytes), in name order."""
    digest = hashlib.blake2b(digest_size=20)
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.reshape(-1).contiguous().cpu()
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    digest = hashlib.blake2b(digest_size=20)
    vocab = tokenizer.get_vocab()
    digest.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    digest.update(json.dumps(sorted(str(t) for t in tokenizer.all_special_tokens)).encode())
    return digest.hexdigest()


def score_key(weights: str, tokenizer: str, data_hashes: list[str], settings: dict) -> str:
    digest = hashlib.blake2b(digest_size=20)
    payload = {"v": SCORING_VERSION, "weights": weights, "tokenizer": tokenizer, "data": data_hashes,
               "settings": settings}
    digest.update(json.dumps(payload, sort_keys=True).encode())
    return digest.hexdigest()


def load_cached(key: str) -> CapabilityReport | None:
    path = cache_dir() / f"{key}.json"
    if not path.is_file():
        return None
    try:
        return CapabilityReport.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))
    except (ReportError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # a damaged cache entry is recomputed, not an error


def load_cached_as(key: str, run_name: str, model: dict) -> CapabilityReport | None:
    """A cached report under this run's name and model description (its own comparison dropped), or None."""
    hit = load_cached(key)
    if hit is not None:
        hit.run_name, hit.forgetting, hit.model = run_name, None, model
        hit.timing = dict(hit.timing, cached=True)
    return hit


def store_cached(key: str, report: CapabilityReport) -> None:
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key}.")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(report_json(report))
        os.replace(tmp, directory / f"{key}.json")
    except OSError:
        pass  # a read-only home must not break scoring; the cache is an optimisation
