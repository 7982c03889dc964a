"""``sparsegen`` command line: ``generate``, ``calibrate paro``, ``mask radial|gna|vmoba``, ``flops``, ``train-lora``.

Method options are flags derived from the method's config fields in one place
(:mod:`.options`), so an option has the same name in every command and in Python
(``--decay-factor`` is ``RadialConfig.decay_factor``). Commands whose flags depend on the
chosen method (``generate``, ``flops``, ``train-lora``) read ``--method`` first, then build the parser
for it, so ``sparsegen generate --method vmoba --help`` lists VMoBA's options.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["build_parser", "main"]


def _chosen_method(argv: Sequence[str], default: str) -> str:
    """The value of ``--method`` in ``argv`` (or ``default``), read with argparse alone."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--method", default=default)
    known, _ = pre.parse_known_args(list(argv))
    return known.method


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The full parser; the method-dependent flags follow ``--method`` in ``argv``."""
    from . import calibrate, flops, generate, mask, train_lora

    parser = argparse.ArgumentParser(prog="sparsegen", allow_abbrev=False,
                                     description="Sparse attention for diffusers pipelines")
    sub = parser.add_subparsers(dest="command", required=True)
    command = argv[0] if argv else None
    rest = list(argv[1:]) if argv else []
    generate.add_command(sub, _chosen_method(rest, generate.DEFAULT_METHOD) if command == "generate"
                         else generate.DEFAULT_METHOD)
    calibrate.add_command(sub)
    mask.add_command(sub)
    flops.add_command(sub, _chosen_method(rest, flops.DEFAULT_METHOD) if command == "flops"
                      else flops.DEFAULT_METHOD)
    train_lora.add_command(sub, _chosen_method(rest, generate.DEFAULT_METHOD) if command == "train-lora"
                           else generate.DEFAULT_METHOD)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
