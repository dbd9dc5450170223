"""Sparse sampling of the 3D registration, as in pdd_net (taught in notebook 05).

One idea: do not evaluate every voxel and every displacement. pdd_net (Heinrich, MICCAI 2019)
computes the costs for a regular grid of control points (:func:`control_points3d`; 32^3 over
the image) and a displacement cube sampled with a step larger than a voxel
(:func:`displacement_cube`; 15^3 labels) -- :func:`sparse_correlation3d`, which returns a
:class:`SparseCost` --, regularises them on that sparse representation (min-convolution over
the displacement cube, mean field over the control-point grid, from
:mod:`~tutorial_utils.three_d.regularisation`), and interpolates the soft arg-min back to a
dense field: :func:`register_volumes_sparse`, with a :class:`SparseSettings3d`, by default
:data:`DEFAULTS_SPARSE_3D`.
The dense version is :func:`~tutorial_utils.three_d.registration.register_volumes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..checks import (
    check_choice,
    check_int,
    check_number,
    check_odd,
    check_tensor,
    check_volume_pair,
    describe,
)
from ..correlation import METRICS, check_inputs
from ..registration import Features, _settings
from ..regularisation import normalise_cost
from .registration import RegistrationDetails3d, Settings3d, extract_features3d
from .regularisation import (
    mean_field3d,
    min_convolution3d,
    min_convolution_sparse,
    soft_displacement_sparse,
)
from .transform import interpolate_control_field3d, upsample_displacement3d

__all__ = [
    "DEFAULTS_SPARSE_3D",
    "SparseCost",
    "SparseSettings3d",
    "control_points3d",
    "displacement_cube",
    "register_volumes_sparse",
    "sparse_correlation3d",
]

@dataclass(frozen=True)
class SparseSettings3d(Settings3d):
    """Every setting of :func:`register_volumes_sparse` that shapes its result, in one frozen object.

    :data:`DEFAULTS_SPARSE_3D` is the one that comes with the package;
    ``DEFAULTS_SPARSE_3D.replace(disp_step=2, disp_range=9)`` is a copy with two settings changed.
    The attributes of :class:`~tutorial_utils.three_d.registration.Settings3d` (the min-convolution's
    kernels counted in steps of the sampled displacement cube, the mean field's in control-point
    grid steps; the moving features always continue with their edge values), and

    Attributes:
        grid_step: control points every ``grid_step`` feature voxels per axis (:func:`control_points3d`).
        disp_step: the displacement cube {-r..r}^3 sampled every ``disp_step`` feature voxels
            (:func:`displacement_cube`).
        lam: the curvature (per feature voxel^2, >= 0) of the exact min-convolution, used only
            for given ``offsets`` that are not a cube.
    """

    avg_passes: int = 1
    meanfield_passes: int = 1
    grid_step: int = 2
    disp_step: int = 1
    lam: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self._store({"grid_step": check_int("grid_step", self.grid_step, minimum=1),
                     "disp_step": check_int("disp_step", self.disp_step, minimum=1),
                     "lam": check_number("lam", self.lam, minimum=0)})


DEFAULTS_SPARSE_3D = SparseSettings3d()
"""Defaults of :func:`register_volumes_sparse`, chosen like
:data:`~tutorial_utils.three_d.registration.DEFAULTS_3D`; ``lam`` is only used for displacement
sets that are not a cube. On the phantom volumes (4.8 mm voxels, features at 9.6 mm) sampling
the displacements every 2 feature voxels (``disp_step=2``) lost more accuracy than it saved
time; it pays off where D must be large (a 256^3 CT)."""


class SparseCost(NamedTuple):
    """The costs of :func:`sparse_correlation3d` and where they were taken."""

    cost: torch.Tensor
    """[B, K, P]: cost of displacement k at control point p (lower is better)."""
    offsets: torch.Tensor
    """[K, 3] int64: the displacements (dz, dy, dx) in voxels of the feature grid."""
    points: torch.Tensor
    """[P, 3] int64: the control points (z, y, x), voxel indices of the feature grid, raster order."""
    grid_shape: tuple
    """(gz, gy, gx): the control points form this grid, P = gz*gy*gx; ``cost.view(B, K, gz, gy, gx)``."""


def _grid_axis(n: int, step: int) -> tuple[int, int]:
    """First index and count of the control points on an axis of n voxels: every ``step``-th
    voxel, the grid centred so that both ends lie at most ``step // 2`` voxels inside."""
    first = ((n - 1) % step) // 2
    return first, (n - 1 - first) // step + 1


def control_points3d(shape, grid_step: int, device=None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The control points of a feature volume of ``shape`` (d, h, w): every ``grid_step``-th voxel.

    Returns:
        ``(points [P, 3] int64 (z, y, x), grid_shape (gz, gy, gx))``; along each axis the
        points are ``first + grid_step * n`` with ``first = ((size - 1) % grid_step) // 2``.
    """
    grid_step = check_int("grid_step", grid_step, minimum=1)
    axes, counts = [], []
    for n in shape:
        first, count = _grid_axis(int(n), grid_step)
        axes.append(torch.arange(count, device=device) * grid_step + first)
        counts.append(count)
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1), tuple(counts)


def displacement_cube(disp_range: int, disp_step: int = 1, device=None) -> torch.Tensor:
    """The displacements {-r..r}^3 sampled every ``disp_step`` voxels: [K, 3] int64 (dz, dy, dx).

    Per axis the values ``s * n`` with ``|s * n| <= r`` (so 0 is always one), ``K = Ds**3``
    with ``Ds = 2 * (r // s) + 1``, in the order of the dense layer (dz slowest, dx fastest).
    ``disp_step=1`` gives all D**3 offsets of
    :func:`~tutorial_utils.three_d.correlation.correlation3d`.
    """
    r = (check_odd("disp_range", disp_range) - 1) // 2
    disp_step = check_int("disp_step", disp_step, minimum=1)
    half = r // disp_step
    steps = torch.arange(-half, half + 1, device=device) * disp_step
    grids = torch.meshgrid(steps, steps, steps, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def _check_offsets(offsets: torch.Tensor, disp_range: int, device: torch.device) -> torch.Tensor:
    """The given displacements [K, 3] of :func:`sparse_correlation3d`, checked (whole voxels
    within +-r of the already checked ``disp_range``), as int64 on ``device``."""
    r = (disp_range - 1) // 2
    check_tensor("offsets", offsets, dims=2, layout="[K, 3] (dz, dy, dx)", finite=True)
    if offsets.shape[1] != 3 or offsets.shape[0] < 1:
        raise ValueError(f"offsets must be an integer tensor [K, 3] (dz, dy, dx), got {describe(offsets)}")
    if offsets.is_floating_point() and not torch.equal(offsets, offsets.round()):
        raise ValueError("offsets must be whole voxels of the feature grid")
    offsets = offsets.round().long().to(device)
    if offsets.abs().max() > r:
        raise ValueError(f"offsets must lie within +-r = +-{r} (disp_range {disp_range}), got a component "
                         f"{int(offsets.abs().max())}")
    return offsets


def sparse_correlation3d(
    feat_fixed: torch.Tensor,
    feat_moving: torch.Tensor,
    disp_range: int,
    grid_step: int = 2,
    disp_step: int = 2,
    offsets: torch.Tensor | None = None,
    metric: str = "ssd",
    border: str = "zeros",
) -> SparseCost:
    """Costs of a sparse set of displacements at a sparse grid of control points (pdd_net style).

    The same values as :func:`~tutorial_utils.three_d.correlation.correlation3d` at the
    sampled points and offsets (``dense[b, k(o), z, y, x] == sparse.cost[b, k, p]`` for the
    point p = (z, y, x) and the offset o, where ``k(o) = ((oz + r)*D + oy + r)*D + ox + r``),
    but only ``K * P`` of them.

    Args:
        feat_fixed, feat_moving: [B, C, d, h, w], same shape, device and dtype.
        disp_range: D, odd: the displacements lie in {-r..r}^3, r = (D-1)//2 (feature voxels).
        grid_step: control points every ``grid_step`` voxels per axis (:func:`control_points3d`):
            P is about ``d*h*w / grid_step**3``.
        disp_step: the displacement cube {-r..r}^3 sampled every ``disp_step`` voxels
            (:func:`displacement_cube`), K = (2*(r // disp_step) + 1)**3; ignored when
            ``offsets`` is given.
        offsets: optional [K, 3] integer displacements (dz, dy, dx) within {-r..r}^3, e.g. a
            random or low-discrepancy subset of the cube.
        metric: "ssd" or "dot", as in :func:`~tutorial_utils.three_d.correlation.correlation3d`.
        border: what the moving features are beyond the volume: "zeros" (as
            :func:`~tutorial_utils.three_d.correlation.correlation3d`) or "replicate" (their
            edge values, as the registration's ``border="replicate"``).

    Returns:
        :class:`SparseCost` ``(cost [B, K, P], offsets [K, 3], points [P, 3], grid_shape)``.
        Differentiable in both inputs; autograd keeps only views of the inputs, so the memory
        is that of the output plus the padded moving features. One pass of a few element-wise
        operations per displacement: the time is proportional to ``K * P * C``.
    """
    D = check_inputs(feat_fixed, feat_moving, disp_range, ndim=3)
    check_choice("metric", metric, METRICS)
    check_choice("border", border, ("zeros", "replicate"))
    r = (D - 1) // 2
    device = feat_fixed.device
    if offsets is None:
        offsets = displacement_cube(D, disp_step, device=device)
    else:
        offsets = _check_offsets(offsets, D, device)
    B, C, d, h, w = feat_fixed.shape
    points, grid_shape = control_points3d((d, h, w), grid_step, device=device)
    starts = [_grid_axis(n, grid_step)[0] for n in (d, h, w)]
    ends = [first + grid_step * (count - 1) + 1 for first, count in zip(starts, grid_shape)]

    def at_points(volume, shift=(0, 0, 0), pad=0):  # [B, *, d(+2pad), ...] -> [B, *, gz, gy, gx] view
        s = [pad + a + o for a, o in zip(starts, shift)]
        e = [pad + a + o for a, o in zip(ends, shift)]
        return volume[:, :, s[0]:e[0]:grid_step, s[1]:e[1]:grid_step, s[2]:e[2]:grid_step]

    fixed = at_points(feat_fixed)  # [B, C, gz, gy, gx]
    padded = F.pad(feat_moving, (r,) * 6, mode="replicate" if border == "replicate" else "constant")
    if metric == "ssd":
        fixed_sq = (fixed * fixed).sum(1)  # [B, gz, gy, gx]
        moving_sq = (padded * padded).sum(1, keepdim=True)  # [B, 1, d+2r, h+2r, w+2r]
    costs = []
    for oz, oy, ox in offsets.tolist():
        moving = at_points(padded, (oz, oy, ox), r)  # a strided view: no copy
        dot = (fixed * moving).sum(1)  # [B, gz, gy, gx]
        if metric == "ssd":
            costs.append(fixed_sq + at_points(moving_sq, (oz, oy, ox), r)[:, 0] - 2 * dot)
        else:
            costs.append(-dot)
    cost = torch.stack(costs, dim=1).reshape(B, len(costs), -1)  # [B, K, P]
    return SparseCost(cost, offsets, points, grid_shape)


def register_volumes_sparse(
    volume_fixed: torch.Tensor,
    volume_moving: torch.Tensor,
    features: Features = "mind",
    settings: SparseSettings3d = DEFAULTS_SPARSE_3D,
    *,
    offsets: torch.Tensor | None = None,
    return_details: bool = False,
    **changes: object,
) -> torch.Tensor | tuple[torch.Tensor, RegistrationDetails3d]:
    """The pdd_net recipe: discrete registration on a sparse grid with sampled displacements.

    1. features at 1/``stride``;
    2. :func:`sparse_correlation3d`: SSD costs at control points every ``grid_step`` feature
       voxels, for the displacements {-r..r}^3 sampled every ``disp_step`` voxels (or the
       given ``offsets`` [K, 3]), the moving features continued with their edge values beyond
       the volume, normalised;
    3. regularisation on that sparse representation, ``meanfield_iterations`` times: the
       min-convolution over the sampled displacements (for a cube: the 2019 approximation
       :func:`~tutorial_utils.three_d.regularisation.min_convolution3d` with its kernels
       counted in cube steps, as pdd_net; for other ``offsets``: the exact lower envelope
       :func:`~tutorial_utils.three_d.regularisation.min_convolution_sparse` with curvature
       ``lam`` per voxel^2), then the mean field over the grid of control points
       (:func:`~tutorial_utils.three_d.regularisation.mean_field3d`, kernels in grid steps);
    4. soft arg-min over the K displacements, trilinearly interpolated from the control points
       to every feature voxel, then to the volume (x ``stride``).

    With ``grid_step=1`` and ``disp_step=1`` its data costs are those of
    :func:`~tutorial_utils.three_d.registration.register_volumes` (up to rounding). The search
    evaluates ``K * P`` costs instead of ``D**3 * d*h*w`` (``benchmarks.three_d.cost_3d``).

    Args:
        volume_fixed, volume_moving: [B, 1, Z, Y, X] float in [0, 1]; Z, Y, X divisible by stride.
        features: see :func:`~tutorial_utils.three_d.registration.extract_features3d`.
        settings: a :class:`SparseSettings3d`: :data:`DEFAULTS_SPARSE_3D` or your own.
        offsets: optional [K, 3] integer displacements (dz, dy, dx) in feature voxels within
            {-r..r}^3 instead of the sampled cube (see :func:`sparse_correlation3d`).
        return_details: also return a
            :class:`~tutorial_utils.three_d.registration.RegistrationDetails3d`.
        changes: any setting by name, changed for this call, e.g. ``disp_step=2, disp_range=9``
            (``settings.replace(**changes)``).

    Returns:
        displacement [B, 3, Z, Y, X] (dz, dy, dx) in voxels (and details with ``return_details``).
    """
    settings = _settings(settings, changes, SparseSettings3d, "DEFAULTS_SPARSE_3D")
    check_volume_pair(volume_fixed, volume_moving, settings.stride)
    stride, disp_range, grid_step = settings.stride, settings.disp_range, settings.grid_step
    feat_fixed = extract_features3d(volume_fixed, features, stride)  # [B, C, d, h, w]
    feat_moving = extract_features3d(volume_moving, features, stride)
    d, h, w = feat_fixed.shape[-3:]
    sparse = sparse_correlation3d(feat_fixed, feat_moving, disp_range, grid_step=grid_step,
                                  disp_step=settings.disp_step, offsets=offsets, border="replicate")
    B, K = sparse.cost.shape[:2]
    cost = sparse.cost.view(B, K, *sparse.grid_shape)  # [B, K, gz, gy, gx]
    if settings.normalise:
        cost = normalise_cost(cost.flatten(3)).view_as(cost)
    disp_offsets = sparse.offsets.to(cost.dtype)  # [K, 3]
    cube = offsets is None
    side = round(K ** (1 / 3))
    belief = cost
    for _ in range(settings.meanfield_iterations):
        if cube:
            belief = min_convolution3d(belief, side, settings.min_kernel, settings.avg_kernel, settings.avg_passes)
        else:
            belief = min_convolution_sparse(belief, disp_offsets, settings.lam)
        belief = mean_field3d(belief, settings.meanfield_kernel, settings.meanfield_passes)
    probabilities, field = soft_displacement_sparse(belief, disp_offsets, settings.alpha)  # [B, 3, gz, gy, gx]
    first = tuple(sparse.points[0].tolist())  # the control point (0, 0, 0), see control_points3d
    displacement_low = interpolate_control_field3d(field, (d, h, w), grid_step, first)
    displacement = upsample_displacement3d(displacement_low, volume_fixed.shape[-3:])
    if not return_details:
        return displacement
    return displacement, RegistrationDetails3d(feat_fixed, feat_moving, cost, belief, probabilities, displacement_low,
                                               sparse.offsets, stride, disp_range, sparse.points)
