"""Sparse attention under diffusers' context parallelism (Ulysses), one process per GPU.

    torchrun --nproc_per_node 2 examples/context_parallel.py --method radial --check

Every process loads the built-in model (a Wan pipeline), applies the method, enables
diffusers' Ulysses attention over all processes (``ContextParallelConfig(ulysses_degree=
world size)``) and generates the same video: each process runs the method for its slice
of the heads over the whole sequence. Rank 0 writes the video (``--out``).

``--check`` also generates the video in each process alone, before enabling parallelism,
and exits with status 1 if the two differ by more than ``--atol`` (0 otherwise).

On CUDA each process takes the GPU of its ``LOCAL_RANK`` (NCCL); without one it runs on
the CPU over gloo, where diffusers' device mesh needs ``torch.accelerator.device_count()``
to be at least 1 (tests/test_context_parallel.py runs this example that way).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="radial", help="radial, gna, vmoba, agent or dense (default radial)")
    p.add_argument("--preset", default=None, help="a named preset of the method or of the built-in model")
    p.add_argument("--prompt", default="a red circle moving right over a striped background")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--dense-steps", type=int, default=None,
                   help="dense warm-up steps (default: the preset's; the built-in model's presets use 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="compare against one process; exit 1 on mismatch")
    p.add_argument("--atol", type=float, default=1e-5, help="largest pixel difference --check accepts")
    p.add_argument("--out", default=None, help="rank 0 writes the video here (.mp4)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    import sparsegen
    import sparsegen.toy as toy
    from sparsegen.generate import method_config
    from sparsegen.toy import pipeline as toy_pipeline

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    if not cuda and torch.accelerator.device_count() < 1:
        raise SystemExit("context parallelism needs an accelerator per process here: diffusers' device mesh "
                         "divides by torch.accelerator.device_count(), which is 0 on this machine")

    pipe = toy.load_pipeline(device=device)
    config = method_config(args.method, preset=args.preset, model_presets=toy_pipeline.PRESETS,
                           model_named_presets=toy_pipeline.NAMED_PRESETS,
                           log=print if rank == 0 else (lambda *a, **k: None))
    if args.dense_steps is not None:
        config = dataclasses.replace(config, dense_steps=args.dense_steps)
        if rank == 0:
            print(f"[sparsegen] dense_steps={args.dense_steps} (given)", flush=True)
    heads = pipe.transformer.config.num_attention_heads
    if heads % world:
        raise SystemExit(f"the model has {heads} heads, which do not split over {world} processes: "
                         f"run with a process count that divides {heads}")
    handle = sparsegen.apply(pipe, config)

    def video():
        return toy.generate(pipe, [args.prompt], seed=args.seed, num_frames=args.frames,
                            num_inference_steps=args.steps)

    reference = video() if args.check else None
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    frames = video()
    densities = [round(d, 3) for _, d in handle.step_densities()]
    status = 0
    if args.check:
        err = float(abs(frames - reference).max())
        ok = err <= args.atol
        print(f"rank {rank}/{world}: {args.method} with Ulysses x{world} vs one process: max |diff| {err:.2e} "
              f"({'ok' if ok else 'MISMATCH'}, atol {args.atol:g})", flush=True)
        status = 0 if ok else 1
    if rank == 0:
        print(f"{args.method}: {args.frames} frames, {args.steps} steps on {world} processes; "
              f"per-step attention density {densities}", flush=True)
        if args.out:
            from sparsegen.generate import write_video

            write_video(frames[0], args.out, fps=8)
            print(f"wrote {args.out}", flush=True)
    handle.remove()
    dist.barrier()
    return status


if __name__ == "__main__":
    sys.exit(main())
