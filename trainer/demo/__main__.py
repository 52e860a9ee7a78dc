"""Command line for the demo world and base model.

    python -m trainer.demo build-world OUT [--seed N]     # write the world's JSONL files to OUT
    python -m trainer.demo build-base [--recipe tiny] [--cache-dir DIR] [--quiet]
                                                          # pretrain (or find) the cached base; prints its path
"""
from __future__ import annotations

import argparse
import json
import sys

from trainer.demo.base import BaseRecipe, default_cache_dir, ensure_base_model
from trainer.demo.world import build_world


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.demo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    world = sub.add_parser("build-world", help="write the synthetic world (general corpus, suite, task)")
    world.add_argument("out", help="output folder")
    world.add_argument("--seed", type=int, default=0)
    base = sub.add_parser("build-base", help="build or find the cached demo base model")
    base.add_argument("--recipe", default="default", choices=["default", "tiny"])
    base.add_argument("--cache-dir", default=None, help=f"default: $FORGETLESS_CACHE or {default_cache_dir()}")
    base.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.command == "build-world":
        paths = build_world(args.out, seed=args.seed)
        for name, path in vars(paths).items():
            if name != "root":
                print(f"{name:14s} {path}")
        return 0
    recipe = BaseRecipe.named(args.recipe)
    path = ensure_base_model(cache_dir=args.cache_dir, progress=not args.quiet, recipe=recipe)
    log = path / "pretrain_log.json"
    if log.exists():
        print(json.dumps(json.loads(log.read_text())), file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
