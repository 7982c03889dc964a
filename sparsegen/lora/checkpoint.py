"""Training checkpoints as safetensors + JSON (no pickles).

``<out>/checkpoints/step-0000500/``::

    lora.safetensors        the trainable (LoRA) parameters, by their module names
    optimizer.safetensors   AdamW's per-parameter tensors ("<i>.exp_avg", "<i>.exp_avg_sq", "<i>.step")
    state.json              step, training config, loss history, optimizer hyper-parameters

Every random draw of a run is a function of (seed, step), so these files are all a
resumed run needs to continue exactly as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

__all__ = ["CHECKPOINTS", "save_checkpoint", "load_checkpoint", "latest_checkpoint"]

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step-(\d+)")
LORA_FILE = "lora.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors by "<param index>.<name>", JSON part: param groups and any non-tensor state)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for i, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{i}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(out: Path, step: int, *, lora: dict, optimizer: torch.optim.Optimizer, state: dict,
                    keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` (atomically: a complete folder or none), then
    delete all but the ``keep`` newest (``keep <= 0`` keeps every one)."""
    root = Path(out) / CHECKPOINTS
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, str(tmp / LORA_FILE))
    tensors, rest = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / OPTIMIZER_FILE))
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "optimizer": rest}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in _checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    return final


def _checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))


def latest_checkpoint(out: Path) -> Optional[Path]:
    """The newest complete checkpoint under ``out/checkpoints``, or None."""
    found = _checkpoints(Path(out) / CHECKPOINTS)
    return found[-1] if found else None


def load_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
    """(LoRA tensors by name, optimizer state_dict, state dict) of a checkpoint folder.

    Raises:
        ValueError: the folder is not a complete checkpoint.
    """
    folder = Path(folder)
    if not all((folder / f).is_file() for f in (LORA_FILE, OPTIMIZER_FILE, STATE_FILE)):
        raise ValueError(f"{folder} is not a train-lora checkpoint (it needs {LORA_FILE}, {OPTIMIZER_FILE} and "
                         f"{STATE_FILE}); pass --resume with a folder under <out>/{CHECKPOINTS}, or 'latest'")
    state = json.loads((folder / STATE_FILE).read_text())
    rest = state.pop("optimizer")
    per_param: dict[int, dict] = {}
    for key, value in load_file(str(folder / OPTIMIZER_FILE)).items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = value
    for key, value in rest["scalars"].items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = value
    optimizer_state = {"state": per_param, "param_groups": rest["param_groups"]}
    return load_file(str(folder / LORA_FILE)), optimizer_state, state
