"""The regularisation used in training against the reference regulariser of tutorial_utils.regularisation.

Independent references: ``regularisation.regularise`` (pooling modules on the padded grid)
and torch.autograd.gradcheck.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from tutorial_utils.regularisation import regularise
from tutorial_utils.regularisation_fast import REG_KEYS, regularise_fast


@pytest.mark.parametrize("settings", [
    dict(disp_range=9),
    dict(disp_range=5, min_kernel=1, avg_kernel=3, meanfield_kernel=3, meanfield_iterations=2),
    dict(disp_range=7, avg_kernel=3),
    dict(disp_range=3),
    dict(disp_range=5, min_kernel=5),  # falls back to the reference min-convolution
    dict(disp_range=5, meanfield_iterations=0),
])
def test_regularise_fast_matches_reference(settings):
    D = settings["disp_range"]
    cost = torch.rand(2, D * D, 7, 6, generator=torch.Generator().manual_seed(D), dtype=torch.float64)
    rest = {k: v for k, v in settings.items() if k != "disp_range"}
    assert torch.allclose(regularise_fast(cost, D, **rest), regularise(cost, D, **rest), atol=1e-12)


def test_regularise_fast_gradients():
    cost = torch.rand(2, 25, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda c: regularise_fast(c, 5), (cost.requires_grad_(True),))
    # random costs have no ties, so the gradient equals the reference's exactly
    weights = torch.randn(2, 25, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (fast,) = torch.autograd.grad((regularise_fast(cost, 5) * weights).sum(), cost)
    (ref,) = torch.autograd.grad((regularise(cost, 5) * weights).sum(), cost)
    assert torch.allclose(fast, ref)


def test_regularise_fast_float32_large():
    cost = torch.rand(1, 81, 16, 20, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(regularise_fast(cost, 9), regularise(cost, 9), atol=1e-5)



def test_reg_keys_are_the_keyword_arguments_of_both_regularisers():
    for function in (regularise_fast, regularise):
        assert set(REG_KEYS) <= set(inspect.signature(function).parameters)


@pytest.mark.parametrize("kwargs, match", [(dict(disp_range=4), "disp_range"), (dict(min_kernel=2), "min_kernel"),
                                           (dict(meanfield_passes=-1), "meanfield_passes")])
def test_regularise_fast_refuses_bad_settings(kwargs, match):
    settings = {"disp_range": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        regularise_fast(torch.rand(1, 25, 4, 4), **settings)
