import os
import sys
from pathlib import Path

# Triton kernels run in Triton's interpreter on CPU; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# Unwritten output elements are NaN and fail every comparison.
os.environ.setdefault("SPARSEGEN_POISON_OUTPUTS", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# evals/ holds scripts and their package `toylab` (tools around the built-in model):
# tests import both by name.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "evals"))
