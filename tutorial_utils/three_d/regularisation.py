"""Regularisation of 3D cost volumes without trainable weights (taught in notebook 05).

One idea: the three operations of :mod:`tutorial_utils.regularisation`, one dimension up, on
a cost volume [B, D**3, d, h, w] (channel ``k = (i*D + j)*D + l`` is the offset
``(dz, dy, dx) = (i - r, j - r, l - r)``, :func:`displacement_offsets3d`):

* :func:`min_convolution3d` over the D x D x D displacement cube (exact, by brute force:
  :func:`min_convolution3d_exact`);
* :func:`mean_field3d` over the three spatial dimensions;
* :func:`soft_displacement3d`: softmax over the displacements and the expected displacement.

Both filters are separable box filters, applied one axis at a time with shifted slices (no
D**3 x (kernel)**3 window is ever built), on blocks that stay in the CPU's cache.
:func:`min_convolution_sparse` and :func:`soft_displacement_sparse` work on any set of K
displacements (the pdd_net sampling of :mod:`tutorial_utils.three_d.sparse`, or a random subset).
:func:`regularise3d` alternates min-convolution and mean field.
"""

from __future__ import annotations

import math

import torch

from ..checks import check_cost_volume as _check_cost_volume
from ..checks import check_int, check_number, check_odd, check_tensor, describe
from ..offsets import displacement_offsets

__all__ = [
    "check_cost_volume3d",
    "displacement_offsets3d",
    "min_convolution3d_exact",
    "min_convolution3d",
    "mean_field3d",
    "regularise3d",
    "soft_displacement3d",
    "min_convolution_sparse",
    "soft_displacement_sparse",
]


def check_cost_volume3d(cost: torch.Tensor, disp_range: int) -> tuple[int, int, int, int]:
    """Validate a 3D cost volume [B, D**3, d, h, w] (floating point, finite) for ``disp_range`` D;
    return ``(B, d, h, w)``. A thin wrapper of :func:`tutorial_utils.checks.check_cost_volume`."""
    return _check_cost_volume3d(cost, disp_range)[1:]


def _check_cost_volume3d(cost: torch.Tensor, disp_range: int) -> tuple[int, int, int, int, int]:
    """The shared check with the layout written as in this module; returns ``(D, B, d, h, w)``."""
    check_tensor("cost", cost, dims=5, layout="a 3D cost volume [B, D**3, d, h, w]")
    return _check_cost_volume("cost", cost, disp_range, ndim=3)


def displacement_offsets3d(
    disp_range: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The discrete displacements [D**3, 3]; row ``k = (i*D + j)*D + l`` is ``(i - r, j - r, l - r)``
    = (dz, dy, dx) in voxels of the feature volume.

    :func:`tutorial_utils.offsets.displacement_offsets` with ``ndim=3`` (one definition for 2D and 3D).
    """
    return displacement_offsets(disp_range, device, dtype, ndim=3)  # [D**3, 3]


def _check_sparse(cost: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Check costs [B, K, *spatial] and offsets [K, n]; return the offsets on the costs' device and dtype."""
    check_tensor("cost", cost, dims=range(2, 9), layout="[B, K, ...]", floating=True, finite=True)
    layout = f"[K, n] with K = cost.shape[1] = {cost.shape[1]}"
    check_tensor("offsets", offsets, dims=2, layout=layout, finite=True)
    if offsets.shape[0] != cost.shape[1]:
        raise ValueError(f"offsets must be {layout}, got {describe(offsets)}")
    return offsets.to(device=cost.device, dtype=cost.dtype)


def _min_convolution_offsets(cost: torch.Tensor, offsets: torch.Tensor, lam: float, chunk: int) -> torch.Tensor:
    """``out[b, k, ...] = min_k' cost[b, k', ...] + lam * |o_k - o_k'|^2`` by brute force over K x K."""
    check_number("lam", lam, minimum=0)
    chunk = check_int("chunk", chunk, minimum=1)
    B, K = cost.shape[:2]
    spatial = cost.shape[2:]
    penalty = lam * ((offsets[:, None, :] - offsets[None, :, :]) ** 2).sum(-1)  # [K, K']
    flat = cost.reshape(B, K, -1).transpose(1, 2).reshape(-1, K)  # [B*N, K']
    out = torch.empty_like(flat)
    for start in range(0, flat.shape[0], chunk):
        part = flat[start:start + chunk]  # [n, K']
        out[start:start + chunk] = (part[:, None, :] + penalty[None]).amin(dim=2)  # [n, K]
    return out.view(B, -1, K).transpose(1, 2).reshape(B, K, *spatial)


def min_convolution3d_exact(cost: torch.Tensor, disp_range: int, lam: float = 1.0, chunk: int = 1024) -> torch.Tensor:
    """Exact min-convolution over the D x D x D displacement cube, by brute force (a test reference).

    ``out[b, k, z, y, x] = min_k' cost[b, k', z, y, x] + lam * |d_k - d_k'|^2`` with ``d_k`` the
    offsets of :func:`displacement_offsets3d`: the lower envelope of paraboloids of curvature
    ``lam`` rooted at every displacement. O(D**6) per voxel: only for small D.

    Args:
        cost: [B, D**3, d, h, w]. disp_range: D (odd). lam: >= 0 (cost units per voxel^2).
        chunk: voxels processed at once (bounds the memory: chunk * D**6 values).

    Returns:
        [B, D**3, d, h, w], same dtype and device; ``out <= cost`` everywhere.
    """
    check_cost_volume3d(cost, disp_range)
    offsets = displacement_offsets3d(disp_range, cost.device, cost.dtype)
    return _min_convolution_offsets(cost, offsets, lam, chunk)


def _replicate_pad(x: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    """Replication padding of ``pad`` on both sides of dimension ``dim``."""
    if pad == 0:
        return x
    n = x.shape[dim]
    index = torch.arange(-pad, n + pad, device=x.device).clamp(0, n - 1)
    return x.index_select(dim, index)


def _box_filter(x: torch.Tensor, dim: int, kernel: int, reduce: str) -> torch.Tensor:
    """Sliding min or mean of width ``kernel`` (stride 1, no padding) along ``dim``, by shifted slices."""
    if kernel == 1:
        return x
    n = x.shape[dim] - kernel + 1
    out = x.narrow(dim, 0, n)
    if reduce == "min":
        if torch.is_grad_enabled() and x.requires_grad:  # autograd does not record out=
            for s in range(1, kernel):
                out = torch.minimum(out, x.narrow(dim, s, n))
            return out
        out = out.clone()
        for s in range(1, kernel):
            torch.minimum(out, x.narrow(dim, s, n), out=out)
        return out
    out = out.clone()
    for s in range(1, kernel):
        out += x.narrow(dim, s, n)
    return out.div_(kernel)


_CHUNK_VALUES = 1 << 18
"""Values per block of the 3D filters on the CPU (1 MiB in float32): blocks that stay in the cache."""

_CHUNK_VALUES_ACCELERATOR = 1 << 24
"""Values per block on a GPU: there every block costs kernel launches, and bandwidth is plenty."""


def _block_values(x: torch.Tensor) -> int:
    return _CHUNK_VALUES if x.device.type == "cpu" else _CHUNK_VALUES_ACCELERATOR


def _min_convolution_block(grid: torch.Tensor, padding: int, min_kernel: int, avg_kernel: int,
                           avg_passes: int) -> torch.Tensor:
    """The filters of :func:`min_convolution3d` on a block [B, D, D, D, n] of voxels."""
    # index padding along one axis commutes with any filter along another, so each axis is
    # padded just before it is first filtered; all min-pools come before all averages
    for dim in (1, 2, 3):
        grid = _box_filter(_replicate_pad(grid, dim, padding), dim, min_kernel, "min")
    for _ in range(avg_passes):
        for dim in (1, 2, 3):
            grid = _box_filter(grid, dim, avg_kernel, "mean")
    return grid


def min_convolution3d(
    cost: torch.Tensor,
    disp_range: int,
    min_kernel: int = 3,
    avg_kernel: int = 3,
    avg_passes: int = 2,
) -> torch.Tensor:
    """The 2019 approximation of the min-convolution, over the D x D x D displacement cube.

    For every voxel its D x D x D cost cube is replication-padded by
    ``p = ((min_kernel - 1) + avg_passes * (avg_kernel - 1)) // 2``, min-pooled
    (``min_kernel``^3, stride 1) and average-pooled ``avg_passes`` times (``avg_kernel``^3,
    stride 1), which restores the D x D x D size (as pdd_net: pad 3, min 3, two averages of 3).
    Cube pools are separable, so they run along one displacement axis at a time, on blocks of
    voxels small enough to stay in the CPU's cache (larger blocks on a GPU; the temporaries
    are those of one block, the result is the only full-size allocation). Without averaging (``avg_passes=0``) the
    result is exact: the min over the displacements within ``(min_kernel-1)/2`` per axis (a
    penalty of 0 inside that cube and infinity outside). Scale- and shift-equivariant like
    the 2D version; differentiable.

    Args:
        cost: [B, D**3, d, h, w]. disp_range: D (odd). min_kernel, avg_kernel: odd >= 1.
        avg_passes: number of average poolings (>= 0).

    Returns:
        [B, D**3, d, h, w], the regularised costs.
    """
    D = _check_cost_volume3d(cost, disp_range)[0]
    min_kernel = check_odd("min_kernel", min_kernel)
    avg_kernel = check_odd("avg_kernel", avg_kernel)
    avg_passes = check_int("avg_passes", avg_passes, minimum=0)
    return _min_convolution3d(cost, D, min_kernel, avg_kernel, avg_passes)


def _min_convolution3d(cost: torch.Tensor, D: int, min_kernel: int, avg_kernel: int, avg_passes: int) -> torch.Tensor:
    """:func:`min_convolution3d` of a checked cost volume [B, D**3, d, h, w]."""
    B, _, d, h, w = cost.shape
    padding = ((min_kernel - 1) + avg_passes * (avg_kernel - 1)) // 2
    n = d * h * w
    grid = cost.reshape(B, D, D, D, n)  # the displacement axes are dims 1, 2, 3
    block = max(1, _block_values(cost) // (B * (D + 2 * padding) ** 3))
    if block >= n:
        return _min_convolution_block(grid, padding, min_kernel, avg_kernel, avg_passes).reshape(cost.shape)
    out = cost.new_empty(B, D, D, D, n)
    for start in range(0, n, block):
        out[..., start:start + block] = _min_convolution_block(grid[..., start:start + block], padding, min_kernel,
                                                               avg_kernel, avg_passes)
    return out.view(cost.shape)


def mean_field3d(cost: torch.Tensor, kernel: int = 3, passes: int = 2) -> torch.Tensor:
    """Average the costs over the three spatial dimensions (one mean-field step).

    ``passes`` cube average poolings of size ``kernel`` (stride 1) after replication padding
    of ``passes * (kernel - 1) // 2`` per side, so the size is kept: every voxel's costs
    become a weighted average of its neighbours' (the messages of the 3D grid graph, as in
    pdd_net: pad 2, two averages of 3). Separable (one axis at a time), on blocks of
    displacement channels that stay in the cache.

    Args:
        cost: [B, K, d, h, w] (any K, e.g. D**3 or a sparse set). kernel: odd >= 1. passes: >= 0.

    Returns:
        [B, K, d, h, w].
    """
    check_tensor("cost", cost, dims=5, layout="a cost volume [B, K, d, h, w] for mean_field3d (mean_field for 2D)",
                 floating=True, finite=True)
    kernel = check_odd("kernel", kernel)
    passes = check_int("passes", passes, minimum=0)
    return _mean_field3d(cost, kernel, passes)


def _mean_field3d(cost: torch.Tensor, kernel: int, passes: int) -> torch.Tensor:
    """:func:`mean_field3d` of a checked cost volume [B, K, d, h, w]."""
    padding = passes * (kernel - 1) // 2

    def block_filter(x):
        for dim in (2, 3, 4):
            x = _replicate_pad(x, dim, padding)
            for _ in range(passes):
                x = _box_filter(x, dim, kernel, "mean")
        return x

    B, K = cost.shape[:2]
    padded_size = B * math.prod(n + 2 * padding for n in cost.shape[2:])
    block = max(1, _block_values(cost) // padded_size)
    if block >= K:
        return block_filter(cost)
    out = torch.empty_like(cost)
    for start in range(0, K, block):
        out[:, start:start + block] = block_filter(cost[:, start:start + block])
    return out


def regularise3d(
    cost: torch.Tensor,
    disp_range: int,
    min_kernel: int = 3,
    avg_kernel: int = 3,
    avg_passes: int = 2,
    meanfield_kernel: int = 3,
    meanfield_passes: int = 2,
    meanfield_iterations: int = 1,
) -> torch.Tensor:
    """``meanfield_iterations`` times ``mean_field3d(min_convolution3d(cost))`` (see
    :func:`~tutorial_utils.regularisation.regularise`).

    Args:
        cost: [B, D**3, d, h, w]. Returns: [B, D**3, d, h, w].
    """
    D = _check_cost_volume3d(cost, disp_range)[0]
    min_kernel = check_odd("min_kernel", min_kernel)
    avg_kernel = check_odd("avg_kernel", avg_kernel)
    avg_passes = check_int("avg_passes", avg_passes, minimum=0)
    meanfield_kernel = check_odd("meanfield_kernel", meanfield_kernel)
    meanfield_passes = check_int("meanfield_passes", meanfield_passes, minimum=0)
    meanfield_iterations = check_int("meanfield_iterations", meanfield_iterations, minimum=0)
    belief = cost
    for _ in range(meanfield_iterations):  # checked once above, not in every round
        belief = _mean_field3d(_min_convolution3d(belief, D, min_kernel, avg_kernel, avg_passes),
                               meanfield_kernel, meanfield_passes)
    return belief


def soft_displacement_sparse(
    cost: torch.Tensor, offsets: torch.Tensor, alpha: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft arg-min over any set of K displacements: ``softmax(-alpha * cost)`` and its expectation.

    Args:
        cost: [B, K, *spatial] (e.g. [B, K, P] or [B, K, gz, gy, gx]). offsets: [K, n], the
            displacement of every channel (n = 3 for (dz, dy, dx)). alpha: > 0.

    Returns:
        ``(probabilities [B, K, *spatial], displacement [B, n, *spatial])`` in the units of ``offsets``.
    """
    offsets = _check_sparse(cost, offsets)
    check_number("alpha", alpha, minimum=0, strict_minimum=True)
    return _soft_displacement_sparse(cost, offsets, alpha)


def _soft_displacement_sparse(cost: torch.Tensor, offsets: torch.Tensor, alpha: float
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`soft_displacement_sparse` of checked costs [B, K, ...] and offsets [K, n] (same device, dtype)."""
    B, K = cost.shape[:2]
    flat = cost.reshape(B, K, -1)  # [B, K, N]
    n = flat.shape[2]
    block = max(1, _block_values(cost) // (B * K))  # blocks of positions: no full-size temporaries

    def soft(part):  # [B, K, n] -> probabilities [B, K, n], displacement [B, dims, n]
        p = torch.softmax(part * -alpha, dim=1)
        return p, torch.einsum("bkn,kc->bcn", p, offsets)

    if block >= n:
        probabilities, displacement = soft(flat)
    else:
        probabilities = torch.empty_like(flat)
        displacement = flat.new_empty(B, offsets.shape[1], n)
        for start in range(0, n, block):
            probabilities[..., start:start + block], displacement[..., start:start + block] = soft(
                flat[..., start:start + block])
    spatial = cost.shape[2:]
    return probabilities.view(cost.shape), displacement.view(B, offsets.shape[1], *spatial)


def soft_displacement3d(
    cost: torch.Tensor, disp_range: int, alpha: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities over the D**3 displacements and the expected displacement (soft arg-min).

    As :func:`~tutorial_utils.regularisation.soft_displacement`, one dimension up.

    Args:
        cost: [B, D**3, d, h, w]. disp_range: D (odd). alpha: > 0, inverse temperature.

    Returns:
        ``(probabilities [B, D**3, d, h, w], displacement [B, 3, d, h, w])``; the displacement
        channels are (dz, dy, dx) in voxels of the cost volume's (feature) grid.
    """
    check_cost_volume3d(cost, disp_range)
    check_number("alpha", alpha, minimum=0, strict_minimum=True)
    return _soft_displacement_sparse(cost, displacement_offsets3d(disp_range, cost.device, cost.dtype), alpha)


def min_convolution_sparse(cost: torch.Tensor, offsets: torch.Tensor, lam: float = 1.0,
                           chunk: int = 1024) -> torch.Tensor:
    """Exact min-convolution over an arbitrary (sparse) set of K displacements.

    ``out[b, k, ...] = min_k' cost[b, k', ...] + lam * |o_k - o_k'|^2``. For displacements that
    form a regular cube (:func:`~tutorial_utils.three_d.sparse.displacement_cube`) the fast
    :func:`min_convolution3d` applies instead (kernels in units of the cube's step); this
    brute force (K x K per point) serves random or low-discrepancy subsets.

    Args:
        cost: [B, K, *spatial]. offsets: [K, n] (voxels). lam: >= 0, cost units per voxel^2.
        chunk: points processed at once (memory: chunk * K * K values).

    Returns:
        [B, K, *spatial]; ``out <= cost``.
    """
    return _min_convolution_offsets(cost, _check_sparse(cost, offsets), lam, chunk)
