"""What the backends read from the environment: Triton's interpreter mode, and output
allocation.

With ``SPARSEGEN_POISON_OUTPUTS=1`` (the test suite sets it) fresh outputs are filled
with NaN, so an element a kernel forgets to write fails every comparison.
"""

import os

import torch


def new_empty(shape, *, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("SPARSEGEN_POISON_OUTPUTS", "0") not in ("", "0"):
        t.fill_(float("nan"))
    return t


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
