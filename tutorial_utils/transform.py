"""Spatial transforms: warping images and labels with a dense displacement field.

Taught in ``notebooks/03_regularisation.ipynb``. Convention (the whole project uses it):
``displacement`` [B, 2, H, W] holds (dy, dx) in pixels of the image it is applied to, and
``warped[y, x] = moving[y + dy(y, x), x + dx(y, x)]`` (a "pull" / backward warp: for every
fixed pixel, where to look in the moving image). Pixel centres are at integer coordinates
0..H-1 and 0..W-1 (``grid_sample`` with ``align_corners=True``). The 3D versions (notebook 05:
volumes [B, C, Z, Y, X], displacement [B, 3, Z, Y, X] (dz, dy, dx)) are in
:mod:`tutorial_utils.three_d.transform`.
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
]


def check_size(size: object, ndim: int) -> tuple[int, ...]:
    """``size`` as ``ndim`` positive Python ints ((H, W) or (Z, Y, X)).

    Shared with :mod:`tutorial_utils.three_d.transform`.
    """
    names = "(H, W)" if ndim == 2 else "(Z, Y, X)"
    if isinstance(size, (str, bytes)) or not hasattr(size, "__len__") or len(size) != ndim:
        raise ValueError(f"size must be {'two' if ndim == 2 else 'three'} positive integers {names}, got {size!r}")
    return tuple(check_int("size", s, minimum=1) for s in size)


def check_warp_inputs(moving: torch.Tensor, displacement: torch.Tensor, ndim: int) -> None:
    """``moving`` [B, C, *spatial] and ``displacement`` [1 or B, ndim, *spatial]: floating point, finite, one device.

    Shared with :mod:`tutorial_utils.three_d.transform` (``ndim=3``).
    """
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
    check_warp_inputs(moving, displacement, ndim=2)
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
    H, W = check_size(size, 2)
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
    H, W = check_size(size, 2)
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
    H, W = check_size(size, 2)
    return shift[:, :, None, None].expand(-1, -1, H, W).contiguous()
