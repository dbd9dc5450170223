"""Spatial transforms of volumes: warping volumes and label volumes with a 3D displacement field.

Taught in notebook 05; the 2D versions are in :mod:`tutorial_utils.transform`, with the same
convention one dimension up: volumes [B, C, Z, Y, X]; ``displacement`` [B, 3, Z, Y, X] holds
(dz, dy, dx) in voxels and ``warped[z, y, x] = moving[z + dz, y + dy, x + dx]`` (a pull /
backward warp); voxel centres at integer coordinates (``align_corners=True``).
:func:`interpolate_control_field3d` spreads values on a grid of control points (the pdd_net
sampling of :mod:`tutorial_utils.three_d.sparse`) to every voxel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import (
    check_choice,
    check_displacement,
    check_int,
    check_labels,
    check_same,
    check_tensor,
)
from ..transform import check_size, check_warp_inputs

__all__ = [
    "identity_grid3d",
    "warp3d",
    "warp_labels3d",
    "upsample_displacement3d",
    "interpolate_control_field3d",
]


def identity_grid3d(
    depth: int, height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Voxel coordinates [1, 3, Z, Y, X]: channels z (slice), y (row), x (column)."""
    depth, height, width = (check_int(name, n, minimum=1) for name, n in
                            (("depth", depth), ("height", height), ("width", width)))
    axes = [torch.arange(n, device=device, dtype=dtype) for n in (depth, height, width)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def warp3d(
    moving: torch.Tensor, displacement: torch.Tensor, mode: str = "trilinear", padding_mode: str = "border"
) -> torch.Tensor:
    """Warp ``moving`` [B, C, Z, Y, X] so that ``warped[z, y, x] = moving[z + dz, y + dy, x + dx]``.

    Args:
        moving: [B, C, Z, Y, X] float (volumes, one-hot labels, features, fields).
        displacement: [B, 3, Z, Y, X], (dz, dy, dx) in voxels of ``moving``; B may be 1 to share it.
        mode: "trilinear" (also accepted as "bilinear", ``grid_sample``'s name) or "nearest".
        padding_mode: "border" (nearest edge value), "zeros" or "reflection".

    Returns:
        [B, C, Z, Y, X], same dtype and device as ``moving``. Differentiable in both inputs.
    """
    check_warp_inputs(moving, displacement, ndim=3)
    check_choice("mode", mode, ("trilinear", "bilinear", "nearest"))
    check_choice("padding_mode", padding_mode, ("border", "zeros", "reflection"))
    B, _, Z, Y, X = moving.shape
    coords = identity_grid3d(Z, Y, X, moving.device, moving.dtype) + displacement.to(moving.dtype)
    # grid_sample wants [B, Z, Y, X, 3] with (x, y, z) in [-1, 1] (align_corners=True: voxel centres)
    norm = [2 * coords[:, a] / max(n - 1, 1) - 1 for a, n in enumerate((Z, Y, X))]
    grid = torch.stack(norm[::-1], dim=-1)
    if grid.shape[0] != B:
        grid = grid.expand(B, -1, -1, -1, -1)
    return F.grid_sample(moving, grid, mode="nearest" if mode == "nearest" else "bilinear",
                         padding_mode=padding_mode, align_corners=True)


def warp_labels3d(
    labels: torch.Tensor, displacement: torch.Tensor, num_labels: int, mode: str = "trilinear"
) -> torch.Tensor:
    """Warp integer label volumes [B, Z, Y, X] with a displacement [B, 3, Z, Y, X].

    ``mode="trilinear"``: every label's one-hot volume is warped trilinearly and the largest
    interpolated weight wins; ``"nearest"``: nearest-neighbour look-up of the label values.

    Returns:
        int64 [B, Z, Y, X] with values in 0..num_labels-1.
    """
    num_labels = check_int("num_labels", num_labels, minimum=1)
    check_labels("labels", labels, dims=4, num_labels=num_labels)
    check_displacement("displacement", displacement, ndim=3, finite=False)
    check_same("labels", labels, "displacement", displacement, device=True)
    check_choice("mode", mode, ("trilinear", "bilinear", "nearest"))
    dtype = displacement.dtype
    if mode == "nearest":
        return warp3d(labels[:, None].to(dtype), displacement, mode="nearest")[:, 0].round().long()
    one_hot = F.one_hot(labels.long(), num_labels).permute(0, 4, 1, 2, 3).to(dtype)  # [B, L, Z, Y, X]
    return warp3d(one_hot, displacement).argmax(dim=1)


def upsample_displacement3d(
    displacement: torch.Tensor, size: tuple[int, int, int], mode: str = "trilinear"
) -> torch.Tensor:
    """Resize a displacement field [B, 3, d, h, w] to [B, 3, Z, Y, X] and rescale its values.

    As :func:`~tutorial_utils.transform.upsample_displacement`: ``align_corners=False`` (a
    feature voxel covers a block of ``Z/d x Y/h x X/w`` voxels), dz multiplied by ``Z/d``, dy
    by ``Y/h``, dx by ``X/w``.

    Args:
        displacement: [B, 3, d, h, w] (dz, dy, dx) in feature voxels. size: (Z, Y, X).
        mode: "trilinear" (default) or "nearest".

    Returns:
        [B, 3, Z, Y, X] (dz, dy, dx) in voxels of the volume.
    """
    check_displacement("displacement", displacement, ndim=3)
    size = check_size(size, 3)
    check_choice("mode", mode, ("trilinear", "nearest"))
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    resized = F.interpolate(displacement, size=size, mode=mode, **kwargs)
    scale = torch.tensor([n / m for n, m in zip(size, displacement.shape[-3:])],
                         device=displacement.device, dtype=displacement.dtype)
    return resized * scale.view(1, 3, 1, 1, 1)


def interpolate_control_field3d(
    field: torch.Tensor, size: tuple[int, int, int], grid_step: int, first: tuple[int, int, int] = (0, 0, 0)
) -> torch.Tensor:
    """Trilinear interpolation of values on a grid of control points to every voxel.

    The control point ``(n_z, n_y, n_x)`` of ``field`` [B, C, gz, gy, gx] sits at voxel
    ``first + grid_step * n`` (per axis) of a volume of ``size`` (d, h, w), the layout of
    :func:`~tutorial_utils.three_d.sparse.control_points3d`; voxels beyond the outermost points
    take the nearest one's value. The values are not rescaled: a displacement in voxels
    stays one (the grid is a subset of the same voxels).

    Returns:
        [B, C, d, h, w]; at the control points exactly ``field``.
    """
    check_tensor("field", field, dims=5, layout="[B, C, gz, gy, gx]", floating=True, finite=True)
    grid_step = check_int("grid_step", grid_step, minimum=1)
    size = check_size(size, 3)
    if len(first) != 3:
        raise ValueError(f"first must have three entries (z, y, x), got {first}")
    first = tuple(check_int("first", f, minimum=0) for f in first)
    B = field.shape[0]
    norm = []
    for n, count, start in zip(size, field.shape[-3:], first):
        coord = torch.arange(n, device=field.device, dtype=field.dtype)
        span = grid_step * (count - 1)
        norm.append(2 * (coord - start) / span - 1 if span > 0 else torch.zeros_like(coord))
    gz, gy, gx = torch.meshgrid(*norm, indexing="ij")
    grid = torch.stack([gx, gy, gz], dim=-1)[None].expand(B, -1, -1, -1, -1)  # (x, y, z) for grid_sample
    return F.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=True)
