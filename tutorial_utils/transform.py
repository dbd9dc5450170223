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

from .checks import (
    check_choice,
    check_displacement,
    check_finite,
    check_int,
    check_labels,
    check_same,
    check_tensor,
    describe,
)

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


def _check_size(size: object, ndim: int) -> tuple[int, ...]:
    """``size`` as ``ndim`` positive Python ints ((H, W) or (Z, Y, X))."""
    names = "(H, W)" if ndim == 2 else "(Z, Y, X)"
    if isinstance(size, (str, bytes)) or not hasattr(size, "__len__") or len(size) != ndim:
        raise ValueError(f"size must be {'two' if ndim == 2 else 'three'} positive integers {names}, got {size!r}")
    return tuple(check_int("size", s, minimum=1) for s in size)


def _check_warp_inputs(moving: torch.Tensor, displacement: torch.Tensor, ndim: int) -> None:
    """``moving`` [B, C, *spatial] and ``displacement`` [1 or B, ndim, *spatial]: floating point, finite, one device."""
    spatial = "H, W" if ndim == 2 else "Z, Y, X"
    check_tensor("moving", moving, dims=ndim + 2, layout=f"[B, C, {spatial}]")
    if not moving.is_floating_point():  # .float() would blend label values: say what to use instead
        labels = "warp_labels" if ndim == 2 else "warp_labels3d"
        raise ValueError(f"moving must be floating point (use {labels} for label maps), got {describe(moving)}")
    check_displacement("displacement", displacement, ndim=ndim, finite=False)
    check_same("moving", moving, "displacement", displacement, device=True)
    check_finite("moving", moving)  # after the device check: a NaN test cannot run on "meta"
    check_finite("displacement", displacement)
    if displacement.shape[2:] != moving.shape[2:]:
        upsample = "upsample_displacement" if ndim == 2 else "upsample_displacement3d"
        raise ValueError(f"displacement is {tuple(displacement.shape[2:])} but moving is {tuple(moving.shape[2:])}: "
                         f"upsample the displacement first ({upsample})")
    if displacement.shape[0] not in (1, moving.shape[0]):
        raise ValueError(f"displacement batch {displacement.shape[0]} does not match moving batch {moving.shape[0]} "
                         f"(it must be equal, or 1 to share one field)")


def identity_grid(
    height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Pixel coordinates [1, 2, H, W]: channel 0 is y (row), channel 1 is x (column)."""
    height, width = check_int("height", height, minimum=1), check_int("width", width, minimum=1)
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
    _check_warp_inputs(moving, displacement, ndim=2)
    check_choice("mode", mode, ("bilinear", "nearest", "bicubic"))
    check_choice("padding_mode", padding_mode, ("border", "zeros", "reflection"))
    B, _, H, W = moving.shape
    displacement = displacement.to(moving.dtype)
    coords = identity_grid(H, W, moving.device, moving.dtype) + displacement  # [B, 2, H, W] (y, x)
    # grid_sample wants [B, H, W, 2] with (x, y) in [-1, 1] (align_corners=True: -1 and 1 are pixel centres)
    norm_y = 2 * coords[:, 0] / max(H - 1, 1) - 1
    norm_x = 2 * coords[:, 1] / max(W - 1, 1) - 1
    grid = torch.stack([norm_x, norm_y], dim=-1)  # [B, H, W, 2]
    if grid.shape[0] != B:
        grid = grid.expand(B, -1, -1, -1)
    return F.grid_sample(moving, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


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
    num_labels = check_int("num_labels", num_labels, minimum=1)
    check_labels("labels", labels, dims=3, num_labels=num_labels)
    check_displacement("displacement", displacement, finite=False)
    check_same("labels", labels, "displacement", displacement, device=True)
    check_choice("mode", mode, ("bilinear", "nearest"))
    dtype = displacement.dtype
    if mode == "nearest":
        warped = warp(labels[:, None].to(dtype), displacement, mode="nearest")  # [B, 1, H, W]
        return warped[:, 0].round().long()
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
    check_displacement("displacement", displacement)
    H, W = _check_size(size, 2)
    check_choice("mode", mode, ("bilinear", "bicubic", "nearest"))
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
    check_displacement("first", first, finite=False)
    check_displacement("second", second, finite=False)
    check_same("first", first, "second", second, spatial=2, device=True)
    check_finite("first", first)
    check_finite("second", second)
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
    check_tensor("matrix", matrix, dims=(2, 3), layout="[B, 2, 3] or [2, 3]", finite=True)
    if matrix.dim() == 2:
        matrix = matrix[None]
    if matrix.shape[1:] != (2, 3):
        raise ValueError(f"matrix must be [B, 2, 3] or [2, 3], got {tuple(matrix.shape)}")
    H, W = _check_size(size, 2)
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
    check_tensor("shift", shift, dims=2, layout="[B, 2] (dy, dx)", channels=2, finite=True)
    H, W = _check_size(size, 2)
    return shift[:, :, None, None].expand(-1, -1, H, W).contiguous()


# --------------------------------------------------------------------------- 3D (notebook 05)
#
# Volumes [B, C, Z, Y, X]; ``displacement`` [B, 3, Z, Y, X] holds (dz, dy, dx) in voxels and
# ``warped[z, y, x] = moving[z + dz, y + dy, x + dx]``; voxel centres at integer coordinates.


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
    _check_warp_inputs(moving, displacement, ndim=3)
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

    As :func:`upsample_displacement`: ``align_corners=False`` (a feature voxel covers a block
    of ``Z/d x Y/h x X/w`` voxels), dz multiplied by ``Z/d``, dy by ``Y/h``, dx by ``X/w``.

    Args:
        displacement: [B, 3, d, h, w] (dz, dy, dx) in feature voxels. size: (Z, Y, X).
        mode: "trilinear" (default) or "nearest".

    Returns:
        [B, 3, Z, Y, X] (dz, dy, dx) in voxels of the volume.
    """
    check_displacement("displacement", displacement, ndim=3)
    size = _check_size(size, 3)
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
    :func:`~tutorial_utils.correlation.control_points3d`; voxels beyond the outermost points
    take the nearest one's value. The values are not rescaled: a displacement in voxels
    stays one (the grid is a subset of the same voxels).

    Returns:
        [B, C, d, h, w]; at the control points exactly ``field``.
    """
    check_tensor("field", field, dims=5, layout="[B, C, gz, gy, gx]", floating=True, finite=True)
    grid_step = check_int("grid_step", grid_step, minimum=1)
    size = _check_size(size, 3)
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
