"""Spatial transforms: warping images and labels with a dense displacement field.

Taught in ``notebooks/03_regularisation.ipynb``. Convention (the whole project uses it):
``displacement`` [B, 2, H, W] holds (dy, dx) in pixels of the image it is applied to, and
``warped[y, x] = moving[y + dy(y, x), x + dx(y, x)]`` (a "pull" / backward warp: for every
fixed pixel, where to look in the moving image). Pixel centres are at integer coordinates
0..H-1 and 0..W-1 (``grid_sample`` with ``align_corners=True``). The 3D counterparts
(notebook 05) end in ``3d``: volumes [B, C, Z, Y, X], displacement [B, 3, Z, Y, X] (dz, dy, dx).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "identity_grid",
    "warp",
    "warp_labels",
    "upsample_displacement",
    "compose_displacements",
    "affine_displacement",
    "translation_displacement",
    "identity_grid3d",
    "warp3d",
    "warp_labels3d",
    "upsample_displacement3d",
    "interpolate_control_field3d",
]


def _check_displacement(displacement: torch.Tensor, name: str = "displacement") -> None:
    if not isinstance(displacement, torch.Tensor) or displacement.dim() != 4 or displacement.shape[1] != 2:
        shape = tuple(displacement.shape) if isinstance(displacement, torch.Tensor) else type(displacement).__name__
        raise ValueError(f"{name} must be [B, 2, H, W] with channels (dy, dx), got {shape}")
    if not displacement.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {displacement.dtype}")


def identity_grid(
    height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Pixel coordinates [1, 2, H, W]: channel 0 is y (row), channel 1 is x (column)."""
    ys = torch.arange(height, device=device, dtype=dtype)
    xs = torch.arange(width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_y, grid_x])[None]  # [1, 2, H, W]


def warp(
    moving: torch.Tensor,
    displacement: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "border",
) -> torch.Tensor:
    """Warp ``moving`` [B, C, H, W] so that ``warped[y, x] = moving[y + dy, x + dx]``.

    Args:
        moving: [B, C, H, W] float (images, one-hot labels, feature maps, fields).
        displacement: [B, 2, H, W], (dy, dx) in pixels of ``moving``; B may be 1 to share it.
        mode: "bilinear", "nearest" or "bicubic" (``grid_sample``).
        padding_mode: what lies outside the image: "border" (nearest edge value), "zeros",
            "reflection".

    Returns:
        [B, C, H, W], same dtype and device as ``moving``. Differentiable in both inputs.
    """
    if not isinstance(moving, torch.Tensor) or moving.dim() != 4:
        raise ValueError(f"moving must be [B, C, H, W], got {getattr(moving, 'shape', moving)}")
    if not moving.is_floating_point():
        raise ValueError(f"moving must be floating point (use warp_labels for label maps), got {moving.dtype}")
    _check_displacement(displacement)
    B, _, H, W = moving.shape
    if displacement.shape[-2:] != (H, W):
        raise ValueError(
            f"displacement is {tuple(displacement.shape[-2:])} but moving is {(H, W)}: "
            "upsample the displacement first (upsample_displacement)"
        )
    if displacement.shape[0] not in (1, B):
        raise ValueError(f"displacement batch {displacement.shape[0]} does not match moving batch {B}")
    if mode not in ("bilinear", "nearest", "bicubic"):
        raise ValueError(f"mode must be 'bilinear', 'nearest' or 'bicubic', got {mode!r}")
    displacement = displacement.to(moving.dtype)
    coords = identity_grid(H, W, moving.device, moving.dtype) + displacement  # [B, 2, H, W] (y, x)
    # grid_sample wants [B, H, W, 2] with (x, y) in [-1, 1] (align_corners=True: -1 and 1 are pixel centres)
    norm_y = 2 * coords[:, 0] / max(H - 1, 1) - 1
    norm_x = 2 * coords[:, 1] / max(W - 1, 1) - 1
    grid = torch.stack([norm_x, norm_y], dim=-1)  # [B, H, W, 2]
    if grid.shape[0] != B:
        grid = grid.expand(B, -1, -1, -1)
    return F.grid_sample(moving, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def _check_labels(labels: torch.Tensor, num_labels: int, layout: str) -> None:
    """Integer label maps with values 0..num_labels-1 and one dimension per name in ``layout``."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != layout.count(",") + 1:
        raise ValueError(f"labels must be {layout} integers, got {getattr(labels, 'shape', labels)}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(f"labels hold values outside 0..{num_labels - 1}")


def warp_labels(
    labels: torch.Tensor, displacement: torch.Tensor, num_labels: int, mode: str = "bilinear"
) -> torch.Tensor:
    """Warp integer label maps [B, H, W] with a displacement [B, 2, H, W].

    ``mode="bilinear"``: each label's one-hot map is warped bilinearly and the label with the
    largest interpolated weight wins (smoother borders than nearest). ``mode="nearest"``:
    nearest-neighbour lookup of the label values.

    Returns:
        int64 [B, H, W] with values in 0..num_labels-1.
    """
    _check_labels(labels, num_labels, "[B, H, W]")
    dtype = displacement.dtype if displacement.is_floating_point() else torch.float32
    if mode == "nearest":
        warped = warp(labels[:, None].to(dtype), displacement, mode="nearest")  # [B, 1, H, W]
        return warped[:, 0].round().long()
    if mode != "bilinear":
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    one_hot = F.one_hot(labels.long(), num_labels).permute(0, 3, 1, 2).to(dtype)  # [B, L, H, W]
    return warp(one_hot, displacement, mode="bilinear").argmax(dim=1)  # [B, H, W]


def upsample_displacement(
    displacement: torch.Tensor, size: tuple[int, int], mode: str = "bilinear"
) -> torch.Tensor:
    """Resize a displacement field [B, 2, h, w] to [B, 2, H, W] and rescale its values.

    The field is interpolated (``align_corners=False``: a feature pixel covers a
    ``H/h x W/w`` block of image pixels, as after average pooling or strided convolutions)
    and dy is multiplied by ``H/h``, dx by ``W/w``, because a displacement of one feature
    pixel is ``stride`` image pixels.

    Args:
        displacement: [B, 2, h, w] (dy, dx) in feature pixels. size: (H, W).
        mode: "bilinear" (default; no overshoot) or "bicubic" (the 2019 choice).

    Returns:
        [B, 2, H, W] (dy, dx) in image pixels.
    """
    _check_displacement(displacement)
    H, W = (int(s) for s in size)
    if H < 1 or W < 1:
        raise ValueError(f"size must be positive, got {size}")
    if mode not in ("bilinear", "bicubic", "nearest"):
        raise ValueError(f"mode must be 'bilinear', 'bicubic' or 'nearest', got {mode!r}")
    h, w = displacement.shape[-2:]
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    resized = F.interpolate(displacement, size=(H, W), mode=mode, **kwargs)
    scale = torch.tensor([H / h, W / w], device=displacement.device, dtype=displacement.dtype)
    return resized * scale.view(1, 2, 1, 1)


def compose_displacements(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The single displacement equal to warping with ``first`` and then with ``second``.

    ``warp(warp(m, first), second) ~= warp(m, compose_displacements(first, second))``, i.e.
    ``u(y) = second(y) + first(y + second(y))``. Both [B, 2, H, W] in pixels.
    """
    _check_displacement(first, "first")
    _check_displacement(second, "second")
    if first.shape[-2:] != second.shape[-2:]:
        raise ValueError(f"fields must have the same size, got {tuple(first.shape)} and {tuple(second.shape)}")
    return second + warp(first, second, mode="bilinear", padding_mode="border")


def affine_displacement(
    matrix: torch.Tensor, size: tuple[int, int], center: tuple[float, float] | None = None
) -> torch.Tensor:
    """Displacement [B, 2, H, W] of an affine map in pixel coordinates.

    ``matrix`` [B, 2, 3] (or [2, 3]) maps a fixed pixel ``p = (y, x)`` to the moving position
    ``A @ (p - c) + t + c`` with ``A = matrix[:, :, :2]``, ``t = matrix[:, :, 2]`` and ``c`` the
    ``center`` (default: the image centre); the displacement is that position minus ``p``.
    Rows and columns are in (y, x) order.
    """
    if matrix.dim() == 2:
        matrix = matrix[None]
    if matrix.dim() != 3 or matrix.shape[1:] != (2, 3):
        raise ValueError(f"matrix must be [B, 2, 3] or [2, 3], got {tuple(matrix.shape)}")
    H, W = size
    if center is None:
        center = ((H - 1) / 2, (W - 1) / 2)
    dtype = matrix.dtype if matrix.is_floating_point() else torch.float32
    matrix = matrix.to(dtype)
    c = torch.tensor(center, device=matrix.device, dtype=dtype).view(1, 2, 1, 1)
    p = identity_grid(H, W, matrix.device, dtype) - c  # [1, 2, H, W], centred
    mapped = torch.einsum("bij,bjyx->biyx", matrix[:, :, :2], p.expand(matrix.shape[0], -1, -1, -1))
    return mapped + matrix[:, :, 2, None, None] - p


def translation_displacement(shift: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A constant displacement [B, 2, H, W] from ``shift`` [B, 2] (dy, dx) in pixels."""
    if shift.dim() != 2 or shift.shape[1] != 2:
        raise ValueError(f"shift must be [B, 2] (dy, dx), got {tuple(shift.shape)}")
    H, W = size
    return shift[:, :, None, None].expand(-1, -1, H, W).contiguous()


# --------------------------------------------------------------------------- 3D (notebook 05)
#
# Volumes [B, C, Z, Y, X]; ``displacement`` [B, 3, Z, Y, X] holds (dz, dy, dx) in voxels and
# ``warped[z, y, x] = moving[z + dz, y + dy, x + dx]``; voxel centres at integer coordinates.


def _check_displacement3d(displacement: torch.Tensor, name: str = "displacement") -> None:
    if not isinstance(displacement, torch.Tensor) or displacement.dim() != 5 or displacement.shape[1] != 3:
        shape = tuple(displacement.shape) if isinstance(displacement, torch.Tensor) else type(displacement).__name__
        raise ValueError(f"{name} must be [B, 3, Z, Y, X] with channels (dz, dy, dx), got {shape}")
    if not displacement.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {displacement.dtype}")


def identity_grid3d(
    depth: int, height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Voxel coordinates [1, 3, Z, Y, X]: channels z (slice), y (row), x (column)."""
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
    if not isinstance(moving, torch.Tensor) or moving.dim() != 5:
        raise ValueError(f"moving must be [B, C, Z, Y, X], got {getattr(moving, 'shape', moving)}")
    if not moving.is_floating_point():
        raise ValueError(f"moving must be floating point (use warp_labels3d for label volumes), got {moving.dtype}")
    _check_displacement3d(displacement)
    B, _, Z, Y, X = moving.shape
    if displacement.shape[-3:] != (Z, Y, X):
        raise ValueError(f"displacement is {tuple(displacement.shape[-3:])} but moving is {(Z, Y, X)}: "
                         "upsample the displacement first (upsample_displacement3d)")
    if displacement.shape[0] not in (1, B):
        raise ValueError(f"displacement batch {displacement.shape[0]} does not match moving batch {B}")
    if mode not in ("trilinear", "bilinear", "nearest"):
        raise ValueError(f"mode must be 'trilinear' or 'nearest', got {mode!r}")
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
    _check_labels(labels, num_labels, "[B, Z, Y, X]")
    dtype = displacement.dtype if displacement.is_floating_point() else torch.float32
    if mode == "nearest":
        return warp3d(labels[:, None].to(dtype), displacement, mode="nearest")[:, 0].round().long()
    if mode not in ("trilinear", "bilinear"):
        raise ValueError(f"mode must be 'trilinear' or 'nearest', got {mode!r}")
    one_hot = F.one_hot(labels.long(), num_labels).permute(0, 4, 1, 2, 3).to(dtype)  # [B, L, Z, Y, X]
    return warp3d(one_hot, displacement).argmax(dim=1)


def upsample_displacement3d(
    displacement: torch.Tensor, size: tuple[int, int, int], mode: str = "trilinear"
) -> torch.Tensor:
    """Resize a displacement field [B, 3, d, h, w] to [B, 3, Z, Y, X] and rescale its values.

    As :func:`upsample_displacement`: ``align_corners=False`` (a feature voxel covers a block
    of ``Z/d x Y/h x X/w`` voxels), dz multiplied by ``Z/d``, dy by ``Y/h``, dx by ``X/w``.

    Args:
        displacement: [B, 3, d, h, w] (dz, dy, dx) in feature voxels. size: (Z, Y, X).
        mode: "trilinear" (default) or "nearest".

    Returns:
        [B, 3, Z, Y, X] (dz, dy, dx) in voxels of the volume.
    """
    _check_displacement3d(displacement)
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"size must be three positive integers (Z, Y, X), got {size}")
    if mode not in ("trilinear", "nearest"):
        raise ValueError(f"mode must be 'trilinear' or 'nearest', got {mode!r}")
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
    :func:`~tutorial_utils.correlation.control_points3d`; voxels beyond the outermost points
    take the nearest one's value. The values are not rescaled: a displacement in voxels
    stays one (the grid is a subset of the same voxels).

    Returns:
        [B, C, d, h, w]; at the control points exactly ``field``.
    """
    if not isinstance(field, torch.Tensor) or field.dim() != 5 or not field.is_floating_point():
        raise ValueError(f"field must be a floating point tensor [B, C, gz, gy, gx], got {getattr(field, 'shape', field)}")
    if isinstance(grid_step, bool) or not isinstance(grid_step, int) or grid_step < 1:
        raise ValueError(f"grid_step must be a positive integer, got {grid_step!r}")
    size = tuple(int(s) for s in size)
    if len(size) != 3 or len(first) != 3:
        raise ValueError(f"size and first must have three entries (z, y, x), got {size} and {first}")
    B = field.shape[0]
    norm = []
    for n, count, start in zip(size, field.shape[-3:], first):
        coord = torch.arange(n, device=field.device, dtype=field.dtype)
        span = grid_step * (count - 1)
        norm.append(2 * (coord - start) / span - 1 if span > 0 else torch.zeros_like(coord))
    gz, gy, gx = torch.meshgrid(*norm, indexing="ij")
    grid = torch.stack([gx, gy, gz], dim=-1)[None].expand(B, -1, -1, -1, -1)  # (x, y, z) for grid_sample
    return F.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=True)
