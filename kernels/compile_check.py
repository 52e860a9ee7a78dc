"""Compile every registered Triton kernel config for real GPU targets, on a machine without a GPU.

The Triton interpreter accepts code the real compiler rejects, and says nothing about shared
memory.  The PyPI wheel ships ``ptxas``, so ``triton.compile`` can build a real cubin for
sm_80 / sm_90 on the CPU; this module does that for every config a kernel module registers
and checks that ``metadata.shared`` fits the target.

It must run in a process where ``TRITON_INTERPRET`` is unset (the kernels have to be real
``JITFunction`` objects), so tests call it as a subprocess::

    python -m kernels.compile_check --arch 80 90 --json

Registering kernels
-------------------
A kernel module (listed in :data:`SPEC_MODULES`) exposes ``COMPILE_SPECS``: a list of
:class:`CompileSpec` (or a zero-argument callable returning one, so building specs costs
nothing at import).  A spec is one launch configuration of one ``@triton.jit`` function::

    CompileSpec(
        name="lora_fwd/bf16",                   # unique, shown in reports
        fn=_lora_fwd_kernel,                    # the @triton.jit function itself
        signature={"x_ptr": "*bf16", "M": "i32", "p": "fp32", ...},  # every runtime argument
        constexprs={"BLOCK_M": 128, "DOT_DTYPE": tl.bfloat16, ...},  # every tl.constexpr argument
        num_warps=8, num_stages=3,
        divisible_by_16=("M", "stride_xm"),    # ints the launcher guarantees are multiples of 16
    )

:func:`infer_signature` builds the signature from the argument names.  Signature types are Triton's: ``*fp32 *bf16 *fp16 *i8 *i32`` for pointers, ``i32 i64 fp32``
for scalars.  Every pointer is assumed 16-byte aligned (true of torch allocations), as the
JIT would specialise it at launch; ``divisible_by_16`` adds the same hint for integers.
Constexprs are written into the signature as ``"constexpr"`` automatically (Triton 3.x's
``ASTSource`` wants them in both places).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

# Modules whose COMPILE_SPECS are compiled; a module that does not exist yet is skipped.
SPEC_MODULES = (
    "kernels.lora_triton", "kernels.fisher", "kernels.ewc", "kernels.adamw_ewc", "kernels.linear_cross_entropy_triton",
)

# Max dynamic shared memory per block (opt-in), CUDA C Programming Guide, "Technical
# Specifications per Compute Capability": 8.0 (A100) 163 KB, 8.6/8.9 99 KB, 9.0 (H100/H200) 227 KB.
SHARED_MEMORY_LIMIT_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple[str, ...] = ()


@dataclasses.dataclass
class CompileResult:
    module: str
    name: str
    arch: int
    ok: bool
    shared_bytes: int | None
    limit_bytes: int
    seconds: float
    error: str | None = None

    @property
    def fits(self) -> bool:
        return self.ok and self.shared_bytes is not None and self.shared_bytes <= self.limit_bytes


def infer_signature(
    fn: Any, pointers: dict[str, str], constexprs: dict[str, Any], floats: Iterable[str] = ()
) -> dict[str, str]:
    """A signature for ``fn``'s runtime arguments: ``pointers`` give their own types, ``floats``
    are ``fp32``, constexprs are left out (they go in ``CompileSpec.constexprs``), the rest ``i32``.

    Note that the JIT turns an integer argument equal to 1 into a constexpr at launch (a unit
    stride, typically): to compile what a launch on contiguous tensors compiles, put such
    strides in ``constexprs`` with value 1.
    """
    floats = set(floats)
    return {
        n: pointers.get(n) or ("fp32" if n in floats else "i32")
        for n in fn.arg_names
        if n not in constexprs
    }


def _attrs(spec: CompileSpec, arg_names: list[str]) -> dict[tuple[int], list[list[Any]]]:
    hinted = {n for n, t in spec.signature.items() if t.startswith("*")} | set(spec.divisible_by_16)
    return {(arg_names.index(n),): [["tt.divisibility", 16]] for n in hinted}


def compile_spec(spec: CompileSpec, arch: int, module: str = "") -> CompileResult:
    """Compile one spec for ``sm_<arch>`` and report its shared memory against the limit."""
    import triton
    from triton.backends.compiler import GPUTarget

    limit = SHARED_MEMORY_LIMIT_BYTES[arch]
    started = time.perf_counter()
    try:
        arg_names = list(spec.fn.arg_names)
        missing = [n for n in arg_names if n not in spec.signature and n not in spec.constexprs]
        unknown = [n for n in (*spec.signature, *spec.constexprs) if n not in arg_names]
        if missing or unknown:
            raise ValueError(f"spec {spec.name!r}: missing args {missing}, unknown args {unknown}")
        signature = {n: ("constexpr" if n in spec.constexprs else spec.signature[n]) for n in arg_names}
        source = triton.compiler.ASTSource(
            fn=spec.fn, signature=signature, constexprs=dict(spec.constexprs), attrs=_attrs(spec, arg_names)
        )
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        shared = int(compiled.metadata.shared)
        return CompileResult(module, spec.name, arch, True, shared, limit, time.perf_counter() - started)
    except Exception as exc:  # reported per spec: one broken kernel must not hide the others
        message = f"{type(exc).__name__}: {exc}".strip()
        return CompileResult(module, spec.name, arch, False, None, limit, time.perf_counter() - started, message[-2000:])


def discover_specs(modules: Iterable[str] = SPEC_MODULES) -> tuple[list[tuple[str, CompileSpec]], list[str]]:
    """``([(module, spec), ...], [notes about modules skipped])``."""
    found: list[tuple[str, CompileSpec]] = []
    notes: list[str] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                notes.append(f"{name}: not present, skipped")
                continue
            raise
        specs = getattr(module, "COMPILE_SPECS", None)
        if specs is None:
            notes.append(f"{name}: no COMPILE_SPECS, skipped")
            continue
        if isinstance(specs, Callable):
            specs = specs()
        found.extend((name, spec) for spec in specs)
    return found, notes


def _probe_specs() -> list[CompileSpec]:
    """Two configs of a tiny pipelined GEMM whose shared memory is known by hand: per stage a
    BLOCK x BLOCK bf16 tile of each operand.  128-wide with 4 stages holds 4 x 64 KiB = 256 KiB,
    over every target's limit; 64-wide with 2 stages, 32 KiB.  ``--probe`` compiles them, so a
    test can check that this checker sees an oversized kernel, not just that it says "ok"."""
    import triton
    import triton.language as tl

    @triton.jit
    def _smem_probe_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k in range(0, K, BLOCK):
            a = tl.load(a_ptr + offs[:, None] * K + k + offs[None, :])
            b = tl.load(b_ptr + (k + offs[:, None]) * BLOCK + offs[None, :])
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], acc)

    pointers = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32"}
    specs = []
    for name, block, stages in (("probe_over_limit", 128, 4), ("probe_small", 64, 2)):
        constexprs = {"BLOCK": block}
        signature = infer_signature(_smem_probe_kernel, pointers, constexprs)
        specs.append(CompileSpec(name, _smem_probe_kernel, signature, constexprs, 4, stages, ("K",)))
    return specs


def run(
    archs: Iterable[int], modules: Iterable[str] = SPEC_MODULES, only: str | None = None, probe: bool = False
) -> dict[str, Any]:
    """Compile every discovered spec (optionally only names containing ``only``) for each arch."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("kernels.compile_check needs TRITON_INTERPRET unset (kernels must be JIT-compiled)")
    archs = list(archs)
    specs, notes = discover_specs(modules)
    if probe:
        specs += [("kernels.compile_check", spec) for spec in _probe_specs()]
    results = [
        compile_spec(spec, arch, module)
        for module, spec in specs
        if only is None or only in spec.name
        for arch in archs
    ]
    return {"notes": notes, "results": [dataclasses.asdict(r) | {"fits": r.fits} for r in results]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_MEMORY_LIMIT_BYTES))
    parser.add_argument("--module", action="append", help="kernel module(s) to check (default: all registered)")
    parser.add_argument("--only", help="compile only specs whose name contains this")
    parser.add_argument("--probe", action="store_true", help="also compile the checker's own probes")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    report = run(args.arch, args.module or SPEC_MODULES, args.only, args.probe)
    if args.json:
        print(json.dumps(report))
    else:
        for note in report["notes"]:
            print(f"# {note}")
        for r in report["results"]:
            status = "ok " if r["fits"] else ("SMEM" if r["ok"] else "FAIL")
            shared = "-" if r["shared_bytes"] is None else f"{r['shared_bytes'] / 1024:.1f} KiB"
            print(f"{status} sm_{r['arch']} {r['module']}:{r['name']:<32} shared {shared:>10} / "
                  f"{r['limit_bytes'] / 1024:.0f} KiB  {r['seconds']:.1f}s")
            if r["error"]:
                print("    " + r["error"].replace("\n", "\n    "))
    expected_over = {"probe_over_limit"}
    return 0 if all(r["fits"] or r["name"] in expected_over for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
