"""A patched pipeline under ``torch.compile(fullgraph=True)``: no host reads on the attention path.

The tiny Wan pipeline is patched first, then its transformer is compiled with static
shapes (``dynamic=False``), as the README says to. Static-mask methods (radial, GNA) must
trace the whole transformer as one graph per schedule phase (dense steps, sparse steps),
with masks built outside the graph, and give the eager output bit for bit (same kernels:
the Triton backend runs as an opaque custom op, here in Triton's interpreter; compiled
with ``aot_eager``). The per-step densities must match the eager run's: statistics
accumulate on the device without breaking the graph.

VMoBA selects blocks from q and k on every call; its mask's width is bounded on the host
(top-k's k, or every block in the threshold modes), so the selection and the mask stay in
the graph too.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import sparsegen
from tiny_models import run_wan, text_embeds, tiny_wan_pipeline, tiny_wan_transformer

# The slower Triton-interpreter cases run with the full compile matrix (tests/test_compile_matrix.py).
FULL = os.environ.get("SPARSEGEN_FULL_COMPILE_MATRIX", "") not in ("", "0")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _eager_and_compiled(pipe, run, method, options, backend="triton"):
    """Run ``pipe`` patched (first step dense) eagerly, then with its transformer compiled
    fullgraph: (eager, compiled, eager densities, compiled densities, compile counter)."""
    with torch.no_grad(), sparsegen.apply(pipe, method, backend=backend, dense_steps=1, **options) as handle:
        eager = run()
        eager_densities = handle.step_densities()
        counter = CompileCounterWithBackend("aot_eager")
        transformer = pipe.transformer
        pipe.transformer = torch.compile(transformer, backend=counter, fullgraph=True, dynamic=False)
        try:
            compiled = run()
        finally:
            pipe.transformer = transformer
        return eager, compiled, eager_densities, handle.step_densities(), counter


@pytest.mark.parametrize("method,options,backend", [
    ("radial", dict(block_size=32, decay_factor=0.5), "auto"),  # the CPU path (radial on Triton: FULL below)
    ("gna", dict(kernel_size=(3, 3, 3), block_size=32), "triton"),
    *([("radial", dict(block_size=32, decay_factor=0.5), "triton")] if FULL else []),
], ids=["radial-cpu", "gna-triton", *(["radial-triton"] if FULL else [])])
def test_patched_transformer_compiles_fullgraph_and_matches_eager(method, options, backend):
    pipe = tiny_wan_pipeline()
    eager, compiled, eager_densities, compiled_densities, counter = _eager_and_compiled(
        pipe, lambda: run_wan(pipe, frames=9, height=128, width=128, steps=2, guidance=2.0), method, options,
        backend)
    assert torch.equal(compiled, eager)
    # One graph for the dense step, one for the sparse steps: the step itself is not traced.
    assert counter.frame_count == 2, counter.frame_count
    assert compiled_densities == eager_densities
    assert eager_densities[0] == (0, 1.0) and all(0.0 < d < 1.0 for _, d in eager_densities[1:])


@pytest.mark.parametrize("selection", ["topk", *(["threshold_global"] if FULL else [])])
def test_vmoba_selection_compiles_fullgraph(selection):
    t = tiny_wan_transformer()
    x, enc = torch.randn(1, 4, 3, 16, 16), text_embeds(1)
    opts = dict(temporal_block=1, spatial_block=(2, 4), spatiotemporal_block=(1, 4, 4), block_size=16,
                top_k=(2, 3, 4), selection=selection)
    with torch.no_grad(), sparsegen.apply(t, "vmoba", backend="triton", **opts) as handle:
        handle.set_step(0)  # a bare transformer told its step reads no timestep
        eager = t(x, torch.tensor([500.0]), enc, return_dict=False)[0]
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(t, backend=counter, fullgraph=True, dynamic=False)(
            x, torch.tensor([500.0]), enc, return_dict=False)[0]
        density = handle.step_densities()
    assert counter.frame_count == 1 and torch.equal(compiled, eager)
    assert len(density) == 1 and 0.0 < density[0][1] < 1.0


def test_a_processor_calling_sdpa_directly_compiles_fullgraph():
    """CogVideoX's processor reaches attention through ``F.scaled_dot_product_attention``;
    the redirected ``F`` (a copy of torch.nn.functional with the trampoline) must trace."""
    from tiny_models import run_cogvideox, tiny_cogvideox_pipeline

    pipe = tiny_cogvideox_pipeline()
    eager, compiled, eager_densities, compiled_densities, counter = _eager_and_compiled(
        pipe, lambda: run_cogvideox(pipe, steps=2, guidance=2.0), "gna", dict(kernel_size=(3, 3, 3), block_size=32),
        "auto")  # the interception is what is tested; the CPU path traces whole too
    assert compiled_densities == eager_densities
    assert torch.equal(compiled, eager)
    assert counter.frame_count == 2, counter.frame_count
