"""The displacement vocabulary of every cost volume: channel ``k`` holds one discrete offset.

Taught in notebook 02 (the correlation layer makes one cost per offset) and used by every
notebook after it. A search range of ``disp_range`` = D (odd) displacements per axis has
``r = (D - 1) // 2``; channel ``k = i*D + j`` of a 2D cost volume [B, D*D, h, w] is the
offset ``(dy, dx) = (i - r, j - r)`` in pixels of the feature maps, and channel
``k = (i*D + j)*D + l`` of a 3D one [B, D**3, d, h, w] is ``(dz, dy, dx) = (i - r, j - r, l - r)``.
The correlation layer, the regularisation, the arg-min and the 3D outlook all read the
offsets from :func:`displacement_offsets`, the one definition.
"""

from __future__ import annotations

import torch

from .checks import check_int, check_odd

__all__ = ["displacement_offsets"]


def displacement_offsets(
    disp_range: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    ndim: int = 2,
) -> torch.Tensor:
    """The discrete displacements [D**ndim, ndim]; in 2D row ``k = i*D + j`` holds ``(dy, dx) = (i - r, j - r)``.

    Units: pixels of the feature map the cost volume was computed on. ``ndim=3`` gives the
    channels of a 3D cost volume, [D**3, 3] with row ``k = (i*D + j)*D + l`` holding
    ``(dz, dy, dx) = (i - r, j - r, l - r)``.
    """
    r = (check_odd("disp_range", disp_range) - 1) // 2
    ndim = check_int("ndim", ndim, minimum=1)
    steps = torch.arange(-r, r + 1, device=device, dtype=dtype)
    grids = torch.meshgrid(*[steps] * ndim, indexing="ij")  # ndim tensors [D, ..., D], (dy, dx) in 2D
    return torch.stack([g.reshape(-1) for g in grids], dim=1)  # [D**ndim, ndim]
