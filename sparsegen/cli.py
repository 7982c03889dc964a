"""``sparsegen`` command line. Each feature module contributes its subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules exposing add_cli(subparsers) (top-level commands) or add_mask_cli(subparsers)
# (kinds of `sparsegen mask ...`).
_COMMAND_MODULES = ["sparsegen.generate", "sparsegen.flops"]
_MASK_MODULES = ["sparsegen.methods.radial", "sparsegen.methods.gna", "sparsegen.methods.vmoba"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsegen", description="Sparse attention for diffusers pipelines")
    sub = parser.add_subparsers(dest="command", required=True)
    mask = sub.add_parser("mask", help="build a method's mask and report its density (and render it)")
    mask_sub = mask.add_subparsers(dest="kind", required=True)
    for name in _MASK_MODULES:
        importlib.import_module(name).add_mask_cli(mask_sub)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "generate":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # `generate` takes the chosen method's options as extra --flags.
    args._extra = extra
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
