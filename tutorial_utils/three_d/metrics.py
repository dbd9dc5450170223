"""Smoothness of 3D displacement fields: Jacobian determinant and folding (taught in notebook 05).

The 3D versions of :func:`~tutorial_utils.metrics.jacobian_determinant` and
:func:`~tutorial_utils.metrics.folding_fraction`; the overlap measures
(:func:`~tutorial_utils.metrics.dice`) take label maps of any shape and serve volumes as they are.
"""

from __future__ import annotations

import torch

from ..metrics import _check_field

__all__ = [
    "jacobian_determinant3d",
    "folding_fraction3d",
]


def jacobian_determinant3d(displacement: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of the map ``p -> p + u(p)`` at every voxel of a 3D field.

    Args:
        displacement: [B, 3, Z, Y, X], channels (dz, dy, dx) in voxels.

    Returns:
        [B, Z, Y, X]: ``det(I + grad u)`` with the same differences as
        :func:`~tutorial_utils.metrics.jacobian_determinant` (exact for affine maps); <= 0 = folding.
    """
    _check_field(displacement, ndim=3)
    rows = [torch.stack(torch.gradient(displacement[:, c], dim=(1, 2, 3)), dim=-1)  # [B, Z, Y, X, 3]
            for c in range(3)]
    jacobian = torch.stack(rows, dim=-2) + torch.eye(3, dtype=displacement.dtype, device=displacement.device)
    return torch.linalg.det(jacobian)


def folding_fraction3d(displacement: torch.Tensor) -> torch.Tensor:
    """Fraction of voxels with a non-positive Jacobian determinant, per field: [B] in [0, 1]."""
    return (jacobian_determinant3d(displacement) <= 0).flatten(1).double().mean(dim=1)
