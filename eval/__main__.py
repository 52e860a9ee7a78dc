"""``python -m eval`` / ``forgetless-eval``: score a model, compare with a baseline, gate.

Exit codes: 0 scored (and the gate passed, when one was asked for); 1 the gate failed (some
category lost more than --max-drop points, with its paired 95% interval above 0 under the
default --gate significant; or format rigidity rose more than
--max-format-rigidity points; named on stdout); 2 bad input (a missing or malformed file, a
model that does not load, an --out that cannot be written), with a message and no traceback,
before any scoring where it can be known before.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

from .capability import score_model
from .cli_options import add_gate_option, add_lm_eval_options, add_scoring_options
from .gate import compare_reports, gate_message
from .lm_eval_tasks import check_lm_eval_spec, score_suite_and_tasks, spec_from_options
from .render import markdown_table, write_report
from .report import ReportError, read_report
from .suite import SuiteError, load_suite

EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """Anything the user must fix before the evaluation can run."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a model on a capability suite; with a baseline, report forgetting and gate on it.",
        epilog="exit codes: 0 scored (gate passed), 1 gate failed (categories / format rigidity named), "
               "2 bad input\n"
               "CI step:    python -m eval --model out/merged --suite suite.jsonl --baseline base.json "
               "--max-drop 5 --out report.json\nsee eval/README.md for the suite format and the report schema")
    p.add_argument("--model", required=True, help="local Hugging Face model directory (config + weights + tokenizer), "
                                                   "a .gguf file, or smollm2-135m-instruct (converted once into the cache)")
    p.add_argument("--adapter", help="PEFT-format LoRA adapter directory (adapter_config.json + "
                                     "adapter_model.safetensors) applied to --model")
    p.add_argument("--suite", help="capability suite, JSONL (see eval/README.md); and/or --lm-eval-tasks")
    add_lm_eval_options(p)
    p.add_argument("--task", help="target-task suite, same JSONL format; its accuracy is the target score")
    p.add_argument("--text", help="held-out general text (UTF-8) for perplexity")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--baseline", help="REPORT.json of the base model to compare against")
    base.add_argument("--base-model", help="base model (directory, .gguf or name, as --model): scored here "
                                                "(cached by weight hash) as the baseline")
    p.add_argument("--max-drop", type=float, help="gate: exit 1 when any category drops by more than this many points")
    p.add_argument("--max-format-rigidity", type=float, metavar="P",
                   help="gate: exit 1 when the share of non-task answers in the task's format rises more than P "
                        "points over the baseline (needs a task format: --task-format or _meta.task_format)")
    add_gate_option(p)
    p.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="render every prompt with the tokenizer's chat template (a row's \"chat\": false opts "
                        "out); default: as the suite's _meta.chat says")
    p.add_argument("--out", required=True, help="REPORT.json path; .md and .png are written beside it")
    p.add_argument("--name", help="run name in the report (default: the --out file stem)")
    add_scoring_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table on stdout")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.suite is None and args.lm_eval_tasks is None:
        raise BadInput("give a capability suite (--suite FILE.jsonl), lm-eval tasks (--lm-eval-tasks NAMES), or both")
    if args.suite is None and args.max_format_rigidity is not None:
        raise BadInput("--max-format-rigidity needs --suite: it is measured on a suite's free answers, not on lm-eval tasks")
    if args.max_drop is not None and not (args.baseline or args.base_model):
        raise BadInput("--max-drop needs a baseline: pass --baseline REPORT.json or --base-model DIR")
    if args.max_drop is not None and args.max_drop < 0:
        raise BadInput(f"--max-drop must be >= 0 points, got {args.max_drop}")
    for name in ("batch_size", "max_new_tokens", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.adapter is not None:
        adapter = Path(args.adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise BadInput(f"--adapter {adapter}: no adapter_config.json (expected a PEFT-format adapter directory)")
        if not (adapter / "adapter_model.safetensors").is_file():
            raise BadInput(f"--adapter {adapter}: no adapter_model.safetensors (only safetensors adapters are read)")
    if args.text is not None and not Path(args.text).is_file():
        raise BadInput(f"--text {args.text}: file not found")
    out = Path(args.out)
    if out.is_dir():
        raise BadInput(f"--out {out}: is a directory; give a file path such as {out / 'report.json'}")


def _resolve_model(spec: str, flag: str, progress: bool) -> str:
    """A model directory, a .gguf file or a registered name -> a local HF directory (model_source)."""
    from .model_source import IncompleteCacheError, ModelSourceError, resolve_model

    try:
        return str(resolve_model(spec, progress=progress))
    except (ModelSourceError, IncompleteCacheError) as exc:
        raise BadInput(f"{flag}: {exc}") from None


def check_out(out_arg: str) -> None:
    """BadInput unless the report can be written at ``out_arg``, checked before any scoring (a
    file where a folder should be, a read-only place): minutes of scoring must not end in an
    unwritable path.  Probes the nearest folder that exists, creating nothing that stays."""
    out = Path(out_arg).absolute()
    if out.is_dir():
        raise BadInput(f"--out {out_arg}: is a directory; give a file path such as {Path(out_arg) / 'report.json'}")
    existing = next(parent for parent in out.parents if parent.exists())  # "/" always exists
    if not existing.is_dir():
        raise BadInput(f"--out {out_arg}: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".forgetless-eval-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BadInput(f"--out {out_arg}: cannot write in {existing} ({exc.strerror or exc})") from None


def _check_format_gate(args: argparse.Namespace, suite, task, baseline) -> None:
    """A format-rigidity bound with no task format to measure it would fail after scoring; say so now."""
    if args.max_format_rigidity is None:
        return
    if not (args.baseline or args.base_model):
        raise BadInput("--max-format-rigidity needs a baseline: pass --baseline REPORT.json or --base-model DIR")
    if args.max_format_rigidity < 0:
        raise BadInput(f"--max-format-rigidity must be >= 0 points, got {args.max_format_rigidity}")
    if not (args.task_format or (suite is not None and suite.meta.task_format) or (task is not None and task.meta.task_format)):
        raise BadInput("--max-format-rigidity needs the task's answer format: pass --task-format REGEX, or set "
                       "_meta.task_format in the suite or in the --task suite")
    if baseline is not None and baseline.format_rigidity is None:
        raise BadInput(f"--max-format-rigidity: the baseline {args.baseline} has no format rigidity (it was scored "
                       f"without a task format); score the base again with the same --task-format / suite")


def load_model(model_dir: str, adapter_dir: str | None, device: str | None, dtype: str | None):
    """AutoModelForCausalLM + AutoTokenizer from a local directory, optionally with a LoRA adapter."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("auto" if device.startswith("cuda") else "float32")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # the name changed in 4.56
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, **{dtype_kw: torch_dtype})
    except Exception as exc:  # noqa: BLE001 - any failure here means the directory is not a usable model
        raise BadInput(f"--model {model_dir}: cannot load a causal LM and tokenizer from it "
                       f"({type(exc).__name__}: {exc})") from None
    if adapter_dir is not None:
        try:
            from kernels.peft_format import load_adapter  # lazy: plain models need no kernels
        except ImportError as exc:
            raise BadInput(f"--adapter needs kernels.peft_format, which cannot be imported ({exc})") from None
        try:
            model = load_adapter(model, adapter_dir) or model
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise BadInput(f"--adapter {adapter_dir}: cannot apply it to {model_dir} ({exc})") from None
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise BadInput(f"--device {device}: {exc}") from None
    model.eval()
    return model, tokenizer


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        check_out(args.out)
        suite = load_suite(args.suite) if args.suite else None
        lm_spec = spec_from_options(args.lm_eval_tasks, args.lm_eval_include)
        if lm_spec is not None:  # names and datasets, before any model loads
            check_lm_eval_spec(lm_spec)
        scorer = score_model if lm_spec is None else partial(score_suite_and_tasks, lm_spec=lm_spec)
        task = load_suite(args.task) if args.task else None
        baseline = read_report(args.baseline) if args.baseline else None
        _check_format_gate(args, suite, task, baseline)
        # after the instant checks: a registered name or a .gguf file converts once (a minute)
        args.model = _resolve_model(args.model, "--model", not args.quiet)
        if args.base_model:
            args.base_model = _resolve_model(args.base_model, "--base-model", not args.quiet)
        run_name = args.name or Path(args.out).stem
        common = dict(task=task, text=args.text, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      progress=not args.quiet, task_format=args.task_format, limit=args.limit,
                      apply_chat_template=args.apply_chat_template)
        if args.base_model:
            base_model, base_tok = load_model(args.base_model, None, args.device, args.dtype)
            baseline = scorer(base_model, base_tok, suite, cache=not args.no_cache, run_name="base",
                                   model_path=args.base_model, **common)
            del base_model
        model, tokenizer = load_model(args.model, args.adapter, args.device, args.dtype)
        report = scorer(model, tokenizer, suite, cache=not args.no_cache, run_name=run_name,
                             model_path=args.model, adapter_path=args.adapter, **common)
        if baseline is not None:
            report.forgetting = compare_reports(baseline, report, args.max_drop, args.max_format_rigidity,
                                                gate=args.gate)
        try:
            paths = write_report(report, args.out)
        except OSError as exc:  # checked before scoring; this is a race (the place changed meanwhile)
            raise BadInput(f"--out {args.out}: cannot write the report ({exc})") from None
    except (BadInput, SuiteError, ReportError) as exc:
        print(f"forgetless-eval: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.quiet:
        print(markdown_table(report))
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['chart']}")
    if report.forgetting is None:
        return EXIT_OK
    for warning in report.forgetting.warnings:
        print(f"warning: {warning}")
    print(gate_message(report.forgetting))
    return EXIT_GATE_FAILED if not report.forgetting.passed else EXIT_OK


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
