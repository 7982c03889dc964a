"""What diffusers' own pipeline tests found with the plugin applied: a geometry a method
cannot serve is refused only when a sparse call would happen, and a transformer replaced
after apply is reported, not silently run dense."""

import pytest
import torch

import sparsegen
from tiny_models import run_wan, tiny_wan_pipeline, tiny_wan_transformer

SIZE = dict(height=128, width=128)  # 5 x 8 x 8 tokens: a 9 x 9 window does not fit


def test_an_unservable_geometry_is_fine_when_every_call_is_dense():
    pipe = tiny_wan_pipeline()
    ref = run_wan(pipe, steps=3, **SIZE)
    for schedule in (dict(dense_steps=3), dict(dense_layers=3), dict(dense_steps=1, dense_last_steps=2)):
        with sparsegen.apply(pipe, "gna", kernel_size=(3, 9, 9), block_size=16, **schedule) as handle:
            assert torch.equal(run_wan(pipe, steps=3, **SIZE), ref)
            assert all(d == 1.0 for _, d in handle.step_densities())


def test_an_unservable_geometry_is_refused_at_the_first_forward_when_a_call_would_be_sparse():
    pipe = tiny_wan_pipeline()
    with sparsegen.apply(pipe, "gna", kernel_size=(3, 9, 9), block_size=16, dense_steps=2) as handle:
        with pytest.raises(ValueError, match="does not fit the token grid"):
            run_wan(pipe, steps=3, **SIZE)
        assert handle.step == 0  # refused before any step ran


def test_a_replaced_transformer_is_reported():
    pipe = tiny_wan_pipeline()
    handle = sparsegen.apply(pipe, "gna", kernel_size=(3, 5, 5), block_size=16)
    pipe.transformer = tiny_wan_transformer(seed=5)
    with pytest.warns(UserWarning, match=r"pipe.transformer was replaced after sparsegen.apply"):
        run_wan(pipe, steps=2, **SIZE)
    assert handle.detached and "detached" in repr(handle)
    handle.remove()


def test_compiling_the_patched_transformer_is_not_a_replacement():
    pipe = tiny_wan_pipeline()
    with sparsegen.apply(pipe, "dense") as handle:
        transformer = pipe.transformer
        pipe.transformer = torch.nn.Module()
        pipe.transformer._orig_mod = transformer  # how torch.compile's wrapper refers to the module
        handle._check_attached()
        assert not handle.detached
        pipe.transformer = transformer
