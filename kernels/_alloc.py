"""Output allocation shared by the backends.

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
