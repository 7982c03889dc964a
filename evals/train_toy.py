"""Train the toy Wan model shipped in sparsegen/assets/toy_wan (CPU, about 52 minutes on 2 cores).

    python evals/train_toy.py                      # the documented run, writes the assets
    python evals/train_toy.py --benchmark 5        # time 5 steps, write nothing
    python evals/train_toy.py --resume             # continue an interrupted run from its checkpoint
    python evals/train_toy.py --write-card         # (re)write the model card of --out from its summary
    python evals/train_toy.py --first-frame-probability 0 --out DIR   # a recipe tried (evals/RESULTS.md)

The run checkpoints to --run-dir every few minutes and logs one JSON line per 10 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from sparsegen.toy.pipeline import ASSET_DIR
from toylab.train import TrainConfig, train, write_model_card

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="asset directory to write (default: the shipped one)")
    parser.add_argument("--run-dir", type=Path, default=REPO / "evals" / "out" / "toy_train", help="checkpoint and log")
    parser.add_argument("--resume", action="store_true", help="continue from --run-dir's checkpoint")
    parser.add_argument("--benchmark", type=int, metavar="STEPS", help="time this many steps and exit")
    parser.add_argument("--write-card", action="store_true",
                        help="only write --out/README.md from the exported training summary, then exit")
    parser.add_argument("--card-note", default=None, help="a remark for the model card under the wall time")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(getattr(defaults, field.name)), default=getattr(defaults, field.name))
    args = parser.parse_args(argv)
    if args.write_card:
        print(f"wrote {write_model_card(args.out, note=args.card_note)}")
        return 0
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    command = "python evals/train_toy.py" + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    summary = train(config, args.out, args.run_dir, resume=args.resume, command=command, benchmark_steps=args.benchmark)
    if args.benchmark is None:
        print(f"wrote {args.out} after {summary['training_wall_minutes']} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
