"""Smoothness of 3D fields (tutorial_utils.three_d.metrics): the Jacobian determinant against
closed forms and the 2D one."""

import pytest
import torch

from tutorial_utils import metrics as M
from tutorial_utils.three_d import metrics as M3


def _affine_field3d(matrix: torch.Tensor, shape=(5, 6, 7)) -> torch.Tensor:
    """u(p) = A p for p = (z, y, x) in voxels: [1, 3, Z, Y, X] float64."""
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in shape), indexing="ij")
    points = torch.stack(grids)  # [3, Z, Y, X]
    return torch.einsum("ij,jzyx->izyx", matrix, points)[None]


def test_jacobian_determinant3d_of_affine_maps_is_det_of_identity_plus_matrix():
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        matrix = 0.4 * torch.randn(3, 3, generator=generator, dtype=torch.float64)
        det = M3.jacobian_determinant3d(_affine_field3d(matrix))
        expected = torch.linalg.det(torch.eye(3, dtype=torch.float64) + matrix).item()  # closed form
        assert torch.allclose(det, torch.full_like(det, expected), atol=1e-10)


def test_folding_fraction3d_counts_a_reflection_and_nothing_else():
    identity = torch.zeros(2, 3, 4, 5, 6)
    assert M3.folding_fraction3d(identity).tolist() == [0.0, 0.0]
    # x -> -x (u_x = -2x) everywhere in the second field: every voxel folds
    field = torch.zeros(2, 3, 4, 5, 6)
    field[1, 2] = -2 * torch.arange(6.0)
    assert M3.folding_fraction3d(field).tolist() == [0.0, 1.0]
    # a 2D field embedded in 3D (no motion along z) has the 2D determinant
    field2d = torch.randn(1, 2, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    field3d = torch.cat([torch.zeros(1, 1, 3, 5, 6, dtype=torch.float64),
                         field2d[:, :, None].expand(1, 2, 3, 5, 6)], dim=1)
    expected = M.jacobian_determinant(field2d)[:, None].expand(1, 3, 5, 6)
    assert torch.allclose(M3.jacobian_determinant3d(field3d), expected)


def test_jacobian_determinant3d_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, 3, Z, Y, X\]"):
        M3.jacobian_determinant3d(torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="at least 2 voxels"):
        M3.jacobian_determinant3d(torch.zeros(1, 3, 1, 4, 4))
