"""The 3D correlation layer: dense sampling of the D x D x D displacement cube (taught in notebook 05).

One idea: :func:`correlation3d` computes the cost of every displacement (dz, dy, dx) in
{-r..r}^3 at every voxel of two feature volumes; :func:`argmin_displacement3d` reads the
cheapest one out (winner takes all, no regularisation).

Conventions: features [B, C, d, h, w]; cost volume [B, D*D*D, d, h, w], channel
``k = (i*D + j)*D + l`` holds the offset ``(dz, dy, dx) = (i - r, j - r, l - r)`` (the 2D
ordering of :mod:`tutorial_utils.correlation` with dz in front); the moving features are zero
outside the volume.

How: no new kernel. The tiles of the 2D layer (:class:`~tutorial_utils.correlation.Layout`,
:func:`~tutorial_utils.correlation.fixed_tiles`, :func:`~tutorial_utils.correlation.moving_tiles`)
are built for every slice, and one batched banded product per (dz, dy) gives, on its
diagonals, the costs of the D offsets dx. The pdd_net-style sparse sampling is in
:mod:`tutorial_utils.three_d.sparse`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..checks import check_choice, check_odd, check_tensor
from ..correlation import METRICS, Layout, check_inputs, fixed_tiles, moving_tiles, sum_segments
from ..offsets import displacement_offsets

__all__ = [
    "argmin_displacement3d",
    "correlation3d",
]


def _diagonals3d(products: torch.Tensor, lay: Layout, depth: int) -> torch.Tensor:
    """View of the D diagonals of [d*h*nt, T, N] products as [D, d, h, nt, T]: element
    ``(l, z, y, tile, t)`` is ``products[(z*h + y)*nt + tile, t, t + l]``."""
    T, N, nt, h = lay.T, lay.N, lay.num_tiles, lay.H
    view = products.as_strided((depth, h, nt, T, lay.D), (h * nt * T * N, nt * T * N, T * N, N + 1, 1))
    return view.permute(4, 0, 1, 2, 3)


def _moving_rows3d(moving_t: torch.Tensor, i: int, j: int, depth: int, lay: Layout) -> torch.Tensor:
    """The moving row segments that fixed slice z, row y meets at offsets (i - r, j - r):
    padded slice z + i, padded row y + j, as a contiguous [d*h*nt, K, N] batch (a copy)."""
    return moving_t[i:i + depth, j:j + lay.H].reshape(depth * lay.H * lay.num_tiles, lay.K, lay.N)


class _Correlation3d(torch.autograd.Function):
    """D*D batched banded products per volume (slices, rows and tiles in one batch); analytic backward."""

    @staticmethod
    def forward(ctx, feat_fixed, feat_moving, disp_range, metric):
        B, C, d, h, w = feat_fixed.shape
        D, r = disp_range, (disp_range - 1) // 2
        lay = Layout(torch.Size((d, C, h, w)), D, metric)  # the 2D layout of one slice (rows h, width w)
        nt, T = lay.num_tiles, lay.T
        with torch.no_grad():
            # per volume: fixed tiles of all slices [d*h*nt, T, K]; moving slices zero-padded by r
            # in z (beyond the volume b = [0, 1, 0] for SSD: cost ||f||^2, as with 2D zero padding)
            fixed_t = torch.stack([fixed_tiles(feat_fixed[b].transpose(0, 1), lay) for b in range(B)])
            fixed_t = fixed_t.view(B, d * h * nt, T, lay.K)
            padded = F.pad(feat_moving, (0, 0, 0, 0, r, r))  # [B, C, d+2r, h, w]
            moving_t = torch.stack([moving_tiles(padded[b].transpose(0, 1), lay) for b in range(B)])
            cost = fixed_t.new_empty(B, D, D, D, d, h, lay.Wp)
            products = fixed_t.new_empty(d * h * nt, T, lay.N)  # reused for every (dz, dy)
            diagonals = _diagonals3d(products, lay, d)  # [D, d, h, nt, T]
            for b in range(B):
                for i in range(D):  # dz = i - r
                    for j in range(D):  # dy = j - r; the D offsets dx are the diagonals
                        torch.bmm(fixed_t[b], _moving_rows3d(moving_t[b], i, j, d, lay), out=products)
                        cost[b, i, j].view(D, d, h, nt, T).copy_(diagonals)
        ctx.layout = lay
        if any(ctx.needs_input_grad[:2]):  # a few times the size of the features, not of the cost
            ctx.save_for_backward(feat_fixed, padded, fixed_t, moving_t)
        cost = cost.view(B, D**3, d, h, lay.Wp)
        return cost if lay.Wp == w else cost[..., :w].contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_cost):
        feat_fixed, padded, fixed_t, moving_t = ctx.saved_tensors
        lay = ctx.layout
        need_fixed, need_moving = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        B, C, d, h, w = feat_fixed.shape
        D, r, nt, T, N, K = lay.D, lay.r, lay.num_tiles, lay.T, lay.N, lay.K
        grad_cost = grad_cost.reshape(B, D, D, D, d, h, w)
        if lay.Wp != w:
            grad_cost = F.pad(grad_cost, (0, lay.Wp - w))
        banded = grad_cost.new_zeros(d * h * nt, T, N)  # the gradient on the diagonals, zero elsewhere
        diagonals = _diagonals3d(banded, lay, d)
        grad_a = fixed_t.new_zeros(fixed_t.shape) if need_fixed else None  # [B, d*h*nt, T, K]
        grad_b = moving_t.new_zeros(moving_t.shape) if need_moving else None  # [B, d+2r, h+2r, nt, K, N]
        for b in range(B):
            for i in range(D):
                for j in range(D):
                    diagonals.copy_(grad_cost[b, i, j].view(D, d, h, nt, T))
                    if need_fixed:  # d cost / d a = b: [T, N] @ [N, K]
                        rows = _moving_rows3d(moving_t[b], i, j, d, lay)
                        grad_a[b].baddbmm_(banded, rows.transpose(1, 2))
                    if need_moving:  # d cost / d b = a: [K, T] @ [T, N], into moving slice z+i, row y+j
                        part = torch.bmm(fixed_t[b].transpose(1, 2), banded)  # [d*h*nt, K, N]
                        grad_b[b, i:i + d, j:j + h] += part.view(d, h, nt, K, N)
        grad_fixed = grad_moving = None
        if need_fixed:
            grad_a = grad_a.view(B, d, h, lay.Wp, K)[:, :, :, :w].permute(0, 4, 1, 2, 3)  # [B, K, d, h, w]
            if lay.ssd:  # a = [f, ||f||^2, 1]
                grad_fixed = torch.addcmul(grad_a[:, :C], feat_fixed, grad_a[:, C:C + 1], value=2)
            else:
                grad_fixed = grad_a.contiguous()
        if need_moving:
            # sum the overlapping row segments back into the padded slices (as in 2D)
            Zp = d + 2 * r
            summed = sum_segments(grad_b.view(B * Zp, lay.Hm, nt, K, N), lay)
            summed = summed.view(B, Zp, *summed.shape[1:])[:, r:r + d, r:r + h, r:r + w]
            summed = summed.permute(0, 4, 1, 2, 3)  # [B, K, d, h, w]
            moving = padded[:, :, r:r + d]
            if lay.ssd:  # b = [-2m, 1, ||m||^2]
                grad_moving = (moving * summed[:, C + 1:C + 2]).sub_(summed[:, :C]).mul_(2)
            else:  # b = -m
                grad_moving = summed.neg()
        return grad_fixed, grad_moving, None, None


def correlation3d(
    feat_fixed: torch.Tensor, feat_moving: torch.Tensor, disp_range: int, metric: str = "ssd"
) -> torch.Tensor:
    """Cost volume of all D x D x D displacements of two feature volumes.

    Args:
        feat_fixed, feat_moving: [B, C, d, h, w] feature volumes (B >= 1), same shape, device
            and dtype (float32 or float64).
        disp_range: D, odd; displacements (dz, dy, dx) in {-r..r}^3 with r = (D-1)//2, in
            voxels of the feature volumes. D may exceed the volume (those costs see only the
            zero padding), as in 2D.
        metric: ``"ssd"``: ``sum_c (fixed[c, z, y, x] - moving[c, z+dz, y+dy, x+dx])**2``;
            ``"dot"``: the negative dot product (lower is better for both).

    Returns:
        cost volume [B, D**3, d, h, w]; channel ``k = (i*D + j)*D + l`` holds the offset
        ``(dz, dy, dx) = (i - r, j - r, l - r)``; the moving features are zero outside the
        volume (the border convention of :func:`~tutorial_utils.correlation.correlation`).
        Differentiable in both inputs.

    How: the banded matrix products of :func:`~tutorial_utils.correlation.correlation`, with
    the rows of all slices in one batch: for each (dz, dy) one batched product of the fixed
    tiles and the moving row segments dz slices and dy rows further on, whose D diagonals are
    the costs of the D offsets dx (D*D products per volume). Its temporaries are a few times
    the size of the features (the same holds for the backward pass), never a multiple of the
    cost volume. SSD is evaluated as ``||f||^2 + ||m||^2 - 2 f.m`` (float32 rounding as in 2D).
    """
    D = check_inputs(feat_fixed, feat_moving, disp_range, ndim=3)
    check_choice("metric", metric, METRICS)
    return _Correlation3d.apply(feat_fixed, feat_moving, D, metric)


def argmin_displacement3d(cost_volume: torch.Tensor, disp_range: int) -> torch.Tensor:
    """Winner-takes-all read-out of a 3D cost volume [B, D**3, d, h, w].

    Returns:
        displacement [B, 3, d, h, w] float (dz, dy, dx) in voxels of the cost volume's grid.
    """
    D = check_odd("disp_range", disp_range)
    check_tensor("cost_volume", cost_volume, dims=5, layout=f"[B, D**3={D**3}, d, h, w]", channels=D**3, finite=True)
    dtype = cost_volume.dtype if cost_volume.is_floating_point() else torch.float32
    offsets = displacement_offsets(D, device=cost_volume.device, dtype=dtype, ndim=3)  # [D**3, 3]
    best = cost_volume.argmin(dim=1)  # [B, d, h, w]
    return offsets[best].permute(0, 4, 1, 2, 3).contiguous()
