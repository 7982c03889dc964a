"""Every method on every model family under ``torch.compile``: the compiled transformer gives
the eager output, and the graph breaks are counted.

Two ways users compile: the whole transformer (``torch.compile(transformer)``) and diffusers'
regional compilation (``transformer.compile_repeated_blocks()``), both after
``sparsegen.apply``. Compiled with the ``aot_eager`` backend (Dynamo's tracing and
AOTAutograd, then eager kernels: graph breaks are a property of the trace, not of the
code generator), static shapes, on the CPU backend the machine runs (``backend="auto"``:
the torch path) and on the Triton backend GPUs run (here in Triton's interpreter).

Graph breaks the plugin adds (README, "torch.compile"):

* none for dense, radial, GNA, PARO and agent attention, on either backend;
* VMoBA on the CPU torch path: the path plans its block walk from the per-call mask on the
  host, so each sparse attention call breaks the graph (it still gives the eager output);
  on the Triton backend VMoBA traces whole (its mask width is bounded on the host).

Mochi's own processor breaks the graph without sparsegen (``torch.nonzero`` on the text
mask): those breaks are the model's and are counted separately.

The default run covers every model once and every method on Wan; the whole matrix
(every model x method x compile mode, plus the Triton backend for every method) runs with
``SPARSEGEN_FULL_COMPILE_MATRIX=1 python -m pytest tests/test_compile_matrix.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import sparsegen
from sparsegen.methods.paro import ParoPlan
from sparsegen.reorder import ORDERS
from tiny_models import tiny_transformer_and_inputs

FULL = os.environ.get("SPARSEGEN_FULL_COMPILE_MATRIX", "") not in ("", "0")

MODELS = ["wan", "hunyuan_video", "cogvideox", "ltx_video", "mochi", "allegro", "skyreels_v2", "skyreels_df", "wan_vace",
          "flux", "stable_diffusion"]
METHODS = {
    "dense": {},
    "radial": dict(block_size=16, decay_factor=1.0),
    "gna": dict(kernel_size=(3, 5, 5), block_size=16),
    "vmoba": dict(temporal_block=1, spatial_block=(2, 4), spatiotemporal_block=(1, 4, 4), block_size=16,
                  top_k=(2, 3, 4)),
    "agent": dict(agent_cell=(1, 4, 4)),
    "paro": {},  # a plan is made for the model (see _options)
}
MODEL_OWN_BREAKS = {"mochi": 3}  # diffusers' Mochi processor: torch.nonzero on the text mask, per sample
REFUSED = {("stable_diffusion", "paro"): "several token resolutions",
           **{("skyreels_df", m): "frame-causal mask" for m in ("vmoba", "agent", "paro")}}
REGIONAL = {"wan", "hunyuan_video", "ltx_video", "skyreels_v2", "skyreels_df", "wan_vace", "flux", "stable_diffusion"}


def _adds_breaks(method: str, backend: str) -> bool:
    return method == "vmoba" and backend == "auto"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _random_plan(transformer, inputs) -> ParoPlan:
    """A PARO plan of random orders and masks for this model and input grid."""
    with torch.no_grad(), sparsegen.apply(transformer, "dense") as handle:
        transformer(**inputs)
        layers, grid = handle._num_layers, handle._geometry.get(0)
    heads = getattr(transformer.config, "num_attention_heads", None) or 1
    if grid is None:  # a UNet: no single grid (PARO refuses it)
        grid = sparsegen.patching.AttentionGeometry(1, 1, 1)
    n = grid.frames * grid.height * grid.width
    nb = -(-n // 16)
    g = torch.Generator().manual_seed(0)
    orders = [[ORDERS[int(i)] for i in torch.randint(0, 6, (heads,), generator=g)] for _ in range(layers)]
    masks = (torch.rand(1, layers, heads, nb, nb, generator=g) < 0.4) | torch.eye(nb, dtype=torch.bool)
    return ParoPlan(model_class=type(transformer).__name__, grid=(grid.frames, grid.height, grid.width),
                    num_layers=layers, num_heads=heads, block_size=16, orders=orders, masks=masks,
                    buckets=((0.0, 1.0),), calibration_steps=1, density=0.5)


def _compile_and_compare(model: str, method: str, *, regional: bool = False, backend: str = "auto"):
    """Eager and compiled outputs of one forward of the patched tiny model: (eager, compiled,
    compiled frames, graph breaks, densities eager, densities compiled)."""
    transformer, inputs = tiny_transformer_and_inputs(model)
    options = dict(METHODS[method], backend=backend)
    if method == "paro":
        options["plan"] = _random_plan(transformer, inputs)
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad(), sparsegen.apply(transformer, method, **options) as handle:
        handle.set_step(0, 1)  # a bare transformer told its step reads no timestep
        eager = transformer(**inputs)[0]
        eager_density = handle.step_densities()
        handle.reset_schedule()  # the compiled run's statistics alone from here
        handle.set_step(0, 1)
        counters.clear()
        if regional:
            transformer.compile_repeated_blocks(backend=counter, dynamic=False)
            compiled = transformer(**inputs)[0]
        else:
            compiled = torch.compile(transformer, backend=counter, dynamic=False)(**inputs)[0]
        density = handle.step_densities()
    breaks = sum(counters["graph_break"].values())
    return eager, compiled, counter.frame_count, breaks, eager_density, density


def _check(model, method, *, regional=False, backend="auto"):
    if (model, method) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[model, method]):
            _compile_and_compare(model, method, regional=regional, backend=backend)
        return
    eager, compiled, frames, breaks, eager_density, density = _compile_and_compare(
        model, method, regional=regional, backend=backend)
    assert torch.equal(compiled, eager), (model, method, (compiled - eager).abs().max())
    # Statistics accumulate on the device inside the graph too: the compiled run's equal the eager run's.
    assert len(eager_density) == 1 and density == eager_density, (density, eager_density)
    step, d = density[-1]
    one_frame = model in ("flux", "stable_diffusion") and method == "radial"  # radial on one frame is dense
    assert d == 1.0 if method == "dense" or one_frame else 0 < d < 1, (model, method, d)  # sparse calls happened
    own = MODEL_OWN_BREAKS.get(model, 0)
    if _adds_breaks(method, backend):
        assert breaks > own, (model, method, breaks)
    else:
        assert breaks == own, f"{model} / {method}: {breaks} graph breaks (the model's own: {own})"
        if not regional and own == 0:
            assert frames <= 2, frames  # one graph (FLUX: a second for its position-id guard)


if FULL:
    WHOLE = [(m, k) for m in MODELS for k in METHODS]
    REGION = [(m, k) for m in sorted(REGIONAL) for k in METHODS]
    TRITON = list(METHODS)
else:
    # Every model once and every method at least once (whole model); regional compilation on
    # a static mask, a joint model and the CPU path's per-call masks.
    WHOLE = [("wan", "paro"), ("hunyuan_video", "gna"), ("cogvideox", "dense"), ("ltx_video", "agent"),
             ("mochi", "radial"), ("allegro", "gna"), ("skyreels_v2", "radial"), ("skyreels_df", "gna"),
             ("wan_vace", "agent"),
             ("flux", "gna"), ("stable_diffusion", "agent")]
    REGION = [("wan", "paro"), ("flux", "agent"), ("skyreels_v2", "vmoba")]
    TRITON = ["agent"]  # radial, GNA, VMoBA: tests/test_compile_pipeline.py


@pytest.mark.parametrize("model,method", WHOLE, ids=[f"{m}-{k}" for m, k in WHOLE])
def test_whole_transformer_compiled_gives_the_eager_output(model, method):
    _check(model, method)


@pytest.mark.parametrize("model,method", REGION, ids=[f"{m}-{k}" for m, k in REGION])
def test_regional_compilation_gives_the_eager_output(model, method):
    _check(model, method, regional=True)


@pytest.mark.parametrize("method", TRITON)
def test_triton_backend_traces_without_breaks(method, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _check("wan", method, backend="triton")


def test_mochis_own_graph_breaks_are_there_without_sparsegen():
    transformer, inputs = tiny_transformer_and_inputs("mochi")
    with torch.no_grad():
        eager = transformer(**inputs)[0]
        compiled = torch.compile(transformer, backend="aot_eager", dynamic=False)(**inputs)[0]
    assert torch.equal(compiled, eager)
    assert sum(counters["graph_break"].values()) == MODEL_OWN_BREAKS["mochi"]
