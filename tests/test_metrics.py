"""Overlap (Dice) and smoothness (Jacobian) measures."""

import math

import pytest
import torch

from tutorial_utils import metrics as M


def affine_field(matrix, H, W):
    """Independent reference: u(p) = A p + t - p, written out by hand."""
    ys, xs = torch.meshgrid(torch.arange(H).double(), torch.arange(W).double(), indexing="ij")
    (a, b, t0), (c, d, t1) = matrix
    return torch.stack([a * ys + b * xs + t0 - ys, c * ys + d * xs + t1 - xs])[None]


def test_dice_of_known_shapes():
    a = torch.zeros(10, 10, dtype=torch.long)
    b = torch.zeros(10, 10, dtype=torch.long)
    a[0:4, 0:5] = 1  # 20 pixels
    b[2:6, 0:5] = 1  # 20 pixels, 10 shared
    a[8:10, 8:10] = 2  # only in a
    d = M.dice(a, b, 4)
    assert d[1].item() == pytest.approx(0.5)
    assert d[2].item() == 0.0
    assert math.isnan(d[3].item())
    assert M.mean_dice(a, b, 4) == pytest.approx(0.25)
    assert M.mean_dice(a, a, 4) == pytest.approx(1.0)


@pytest.mark.parametrize("matrix", [
    ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    ((1.2, 0.1, 3.0), (-0.3, 0.9, -1.0)),
    ((math.cos(0.3), -math.sin(0.3), 2.0), (math.sin(0.3), math.cos(0.3), 5.0)),
    ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0)),  # a reflection: determinant -1, everything folds
])
def test_jacobian_of_affine_is_its_determinant(matrix):
    field = affine_field(matrix, 9, 11)
    det = (matrix[0][0] * matrix[1][1] - matrix[0][1] * matrix[1][0])
    jac = M.jacobian_determinant(field)
    assert jac.shape == (1, 9, 11)
    assert torch.allclose(jac, torch.full_like(jac, det))
    assert M.folding_fraction(field).item() == (1.0 if det <= 0 else 0.0)


def test_jacobian_of_a_quadratic_field_against_finite_differences():
    ys, xs = torch.meshgrid(torch.arange(12).double(), torch.arange(10).double(), indexing="ij")
    field = torch.stack([0.01 * xs**2, 0.02 * ys * xs])[None]
    # analytic: d(dy)/dy = 0, d(dy)/dx = 0.02 x, d(dx)/dy = 0.02 x, d(dx)/dx = 0.02 y
    expected = (1 + 0) * (1 + 0.02 * ys) - (0.02 * xs) * (0.02 * xs)
    jac = M.jacobian_determinant(field)
    assert torch.allclose(jac[0, 1:-1, 1:-1], expected[1:-1, 1:-1])


def test_folding_fraction_counts_folded_pixels():
    field = torch.zeros(2, 2, 8, 8, dtype=torch.float64)
    # second field: compress columns 3..5 so strongly that the map reverses there
    field[1, 1, :, 4] = -3.0
    jac = M.jacobian_determinant(field)
    folded = (jac[1] <= 0).double().mean()
    assert folded > 0
    assert torch.allclose(M.folding_fraction(field), torch.stack([torch.tensor(0.0, dtype=torch.float64), folded]))


def test_log_jacobian_std():
    scaling = affine_field(((1.1, 0.0, 0.0), (0.0, 1.1, 0.0)), 8, 8)
    assert M.log_jacobian_std(scaling).item() == pytest.approx(0.0, abs=1e-12)
    torch.manual_seed(0)
    rough = torch.randn(1, 2, 16, 16, dtype=torch.float64) * 0.2
    det = M.jacobian_determinant(rough).clamp_min(1e-3)
    assert M.log_jacobian_std(rough).item() == pytest.approx(det.log().std().item())


@pytest.mark.parametrize("bad", [
    lambda: M.jacobian_determinant(torch.zeros(1, 3, 8, 8)),
    lambda: M.jacobian_determinant(torch.zeros(2, 8, 8)),
    lambda: M.jacobian_determinant(torch.zeros(1, 2, 1, 8)),
    lambda: M.folding_fraction(torch.zeros(1, 2, 8, 8, dtype=torch.long)),
    lambda: M.log_jacobian_std(torch.zeros(1, 2, 8, 8), eps=0.0),
    lambda: M.dice(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long), 2),
])
def test_bad_input_raises_value_error(bad):
    with pytest.raises(ValueError):
        bad()
