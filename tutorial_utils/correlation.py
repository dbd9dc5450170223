"""The correlation layer: dense sampling of the displacement space (taught in notebook 02).

Two implementations of the same cost volume:

* :func:`correlation_unfold` -- the teaching version, built exactly as in the 2019 tutorial
  with ``F.unfold``. Easy to read, but it materialises a ``[B, C, D*D, H*W]`` tensor.
* :func:`correlation` -- the same values, fast and lean: it never builds that tensor and has
  its own analytic backward (see "How the fast version works" below).

In 3D (notebook 05): :func:`correlation3d` (the same banded products, once per slice offset)
and :func:`sparse_correlation3d`, the pdd_net sampling of control points and displacements.

Conventions (the same in every notebook): ``cost_volume`` is ``[B, D*D, H, W]``; channel
``k = i*D + j`` holds the offset ``(dy, dx) = (i - r, j - r)`` with ``r = (D-1)//2``; the
moving features are zero outside the image.

How the fast version works
--------------------------
For SSD, ``||f - m||^2 = ||f||^2 + ||m||^2 - 2 f.m``. Appending two channels to each input,
``a = [f, ||f||^2, 1]`` and ``b = [-2m, 1, ||m||^2]``, turns the whole cost into one dot
product ``a.b`` per (pixel, offset), so every cost is an entry of a small matrix product.
Cut every image row into tiles of ``T`` pixels; for one row offset ``dy`` the fixed tile
``[T, K]`` times the moving row segment it can reach, ``[K, T + 2r]``, gives a ``[T, T+2r]``
matrix whose ``D`` diagonals are exactly the costs of the ``D`` column offsets. One
batched matrix multiplication per row offset (``D`` calls in all) therefore computes the
whole cost volume; the diagonals are read out with a strided view. The working set of each
call (a row offset of the tiled features and a ``[H*W/T, T, T+2r]`` product) stays in
cache, the largest temporary is about ``(T + 2r) / D`` times one ``[H, W, D]`` slab, and
the products run at matrix-multiplication speed. The backward pass is the same trick in
reverse: the incoming gradient is scattered into the diagonals of the same ``[T, T+2r]``
matrices and multiplied by the moving (for ``grad_fixed``) or the fixed (for
``grad_moving``) tiles; the overlapping moving segments are then summed back.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .checks import (
    check_choice,
    check_finite,
    check_int,
    check_odd,
    check_same,
    check_tensor,
    describe,
)

__all__ = [
    "METRICS",
    "SparseCost",
    "argmin_displacement",
    "argmin_displacement3d",
    "control_points3d",
    "correlation",
    "correlation3d",
    "correlation_unfold",
    "displacement_cube",
    "sparse_correlation3d",
]

METRICS = ("ssd", "dot")
"""Metrics of :func:`correlation`: sum of squared differences, negative dot product."""


def _check_inputs(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, disp_range: int, ndim: int = 2) -> int:
    """Check two feature maps [B, C, H, W] (``ndim=3``: volumes [B, C, d, h, w]) and ``disp_range``.

    Both floating point, finite, of one shape, device and dtype; returns ``disp_range`` as an int.
    """
    if ndim == 2:
        layout = "[B, C, H, W] (4 dimensions)"
    else:
        layout = "[B, C, d, h, w] (5 dimensions; use correlation for 2D feature maps)"
    for name, feat in (("feat_fixed", feat_fixed), ("feat_moving", feat_moving)):
        check_tensor(name, feat, dims=ndim + 2, layout=layout, floating=True)
        if feat.numel() == 0:
            raise ValueError(f"{name} is empty: {describe(feat)}")
    check_same("feat_fixed", feat_fixed, "feat_moving", feat_moving, shape=True, device=True)
    if feat_fixed.dtype != feat_moving.dtype:
        raise ValueError(f"feat_fixed and feat_moving must have the same dtype, got {feat_fixed.dtype} "
                         f"and {feat_moving.dtype}")
    check_finite("feat_fixed", feat_fixed)  # after the device check: a NaN test cannot run on "meta"
    check_finite("feat_moving", feat_moving)
    return check_odd("disp_range", disp_range)


def correlation_unfold(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, disp_range: int) -> torch.Tensor:
    """SSD cost volume, built exactly as in the 2019 tutorial (memory hungry, for teaching).

    Args:
        feat_fixed, feat_moving: [B, C, H, W] feature maps (B >= 1), same shape, device, dtype.
        disp_range: D, odd; displacements (dy, dx) in {-r..r}^2 with r = (D-1)//2.

    Returns:
        cost volume [B, D*D, H, W]; channel ``k = i*D + j`` holds offset ``(i - r, j - r)``
        and ``sum_c (fixed[c, y, x] - moving[c, y+dy, x+dx])**2``, zero padding outside.
        Builds a [B, C, D*D, H*W] intermediate: use :func:`correlation` for large D.
    """
    D = _check_inputs(feat_fixed, feat_moving, disp_range)
    B, C, H, W = feat_fixed.shape
    r = (D - 1) // 2
    # unfold: [B, C, H, W] -> [B, C*D*D, H*W] -> view [B, C, D*D, H*W]
    moving_unfold = F.unfold(feat_moving, (D, D), padding=r).view(B, C, D * D, H * W)
    # broadcast [B, C, 1, H*W] against [B, C, D*D, H*W], square, sum over C -> [B, D*D, H*W]
    ssd = ((feat_fixed.reshape(B, C, 1, H * W) - moving_unfold) ** 2).sum(1)
    return ssd.view(B, D * D, H, W)


# --------------------------------------------------------------------------- fast version


def _tile_width(width: int, disp_range: int) -> int:
    """Tile width T along x: near 16 (32 for large D), preferably a divisor of ``width``."""
    preferred = 16 if disp_range <= 25 else 32
    if width <= preferred * 3 // 2:
        return width
    divisors = [t for t in range(preferred // 2, 2 * preferred + 1) if width % t == 0]
    if divisors:
        return min(divisors, key=lambda t: (abs(t - preferred), -t))
    return preferred


class _Layout:
    """Shapes of the tiled problem: x is cut into ``num_tiles`` tiles of ``tile`` pixels."""

    def __init__(self, shape: torch.Size, disp_range: int, metric: str) -> None:
        self.B, self.C, self.H, self.W = shape
        self.D = disp_range
        self.r = (disp_range - 1) // 2
        self.ssd = metric == "ssd"
        self.K = self.C + 2 if self.ssd else self.C  # channels after appending ||f||^2 and 1
        self.T = _tile_width(self.W, disp_range)
        self.num_tiles = -(-self.W // self.T)
        self.Wp = self.num_tiles * self.T  # width padded to whole tiles
        self.N = self.T + 2 * self.r  # moving pixels one fixed tile can reach in a row
        self.Hm = self.H + 2 * self.r  # rows of the zero-padded moving features


def _fixed_tiles(feat_fixed: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """``a = [f, ||f||^2, 1]`` (SSD) or ``f`` (dot), channel-last and tiled: [B, H*nt, T, K]."""
    B, C, H, W = feat_fixed.shape
    fixed_t = feat_fixed.new_zeros(B, H, lay.Wp, lay.K)  # [B, H, Wp, K], zero in padded x
    fixed_t[:, :, :W, :C] = feat_fixed.permute(0, 2, 3, 1)
    if lay.ssd:
        fixed_t[:, :, :W, C] = (feat_fixed * feat_fixed).sum(1)
        fixed_t[:, :, :W, C + 1] = 1
    return fixed_t.view(B, H * lay.num_tiles, lay.T, lay.K)


def _moving_tiles(feat_moving: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """``b = [-2m, 1, ||m||^2]`` (SSD) or ``-m`` (dot), zero padded, as overlapping row
    segments of ``N = T + 2r`` pixels: [B, H + 2r, nt, K, N]."""
    B, C, H, W = feat_moving.shape
    r = lay.r
    padded = feat_moving.new_zeros(B, lay.K, lay.Hm, lay.Wp + 2 * r)  # [B, K, H+2r, Wp+2r]
    inner = padded[:, :, r:r + H, r:r + W]
    if lay.ssd:
        torch.mul(feat_moving, -2, out=inner[:, :C])
        padded[:, C] = 1  # the constant channel pairs with ||f||^2: 1 also outside the image
        inner[:, C + 1] = (feat_moving * feat_moving).sum(1)
    else:
        torch.neg(feat_moving, out=inner)
    s = padded.stride()
    segments = padded.as_strided(
        (B, lay.Hm, lay.num_tiles, lay.K, lay.N), (s[0], s[2], lay.T * s[3], s[1], s[3])
    )
    return segments.contiguous()


def _diagonals(products: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """View of the D diagonals of [H*nt, T, N] products as [H, nt, T, D]: element
    ``(y, tile, t, j)`` is ``products[y*nt + tile, t, t + j]``."""
    T, N, nt = lay.T, lay.N, lay.num_tiles
    return products.as_strided((lay.H, nt, T, lay.D), (nt * T * N, T * N, N + 1, 1))


def _correlation_forward(fixed_t: torch.Tensor, moving_t: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """Cost volume [B, D*D, H, W] from the tiled inputs [B, H*nt, T, K] and [B, H+2r, nt, K, N]."""
    B, H, D, nt, T = lay.B, lay.H, lay.D, lay.num_tiles, lay.T
    cost = fixed_t.new_empty(B, D, D, H, lay.Wp)
    products = fixed_t.new_empty(H * nt, T, lay.N)  # reused for every row offset
    diagonals = _diagonals(products, lay).permute(3, 0, 1, 2)  # [D, H, nt, T]
    for b in range(B):
        for i in range(D):  # row offset dy = i - r: fixed row y meets moving row y + i (padded)
            rows = moving_t[b, i:i + H].view(H * nt, lay.K, lay.N)
            torch.bmm(fixed_t[b], rows, out=products)  # [H*nt, T, K] @ [H*nt, K, N]
            cost[b, i].view(D, H, nt, T).copy_(diagonals)
    cost = cost.view(B, D * D, H, lay.Wp)
    return cost if lay.Wp == lay.W else cost[..., : lay.W].contiguous()


def _correlation_backward(grad_cost, feat_fixed, feat_moving, fixed_t, moving_t, lay: _Layout,
                          need_fixed: bool, need_moving: bool):
    """Gradients [B, C, H, W] (or None) of both inputs; ``fixed_t``, ``moving_t`` as in the forward."""
    B, C, H, W, D, r = lay.B, lay.C, lay.H, lay.W, lay.D, lay.r
    nt, T, N, K = lay.num_tiles, lay.T, lay.N, lay.K
    grad_cost = grad_cost.reshape(B, D, D, H, W)
    if lay.Wp != W:
        grad_cost = F.pad(grad_cost, (0, lay.Wp - W))
    banded = grad_cost.new_zeros(H * nt, T, N)  # the gradient on the diagonals, zero elsewhere
    diagonals = _diagonals(banded, lay).permute(3, 0, 1, 2)  # [D, H, nt, T]
    grad_a = feat_fixed.new_zeros(B, H * nt, T, K) if need_fixed else None
    grad_b = feat_fixed.new_zeros(B, lay.Hm, nt, K, N) if need_moving else None
    for b in range(B):
        for i in range(D):
            diagonals.copy_(grad_cost[b, i].view(D, H, nt, T))
            if need_fixed:  # d cost / d a = b: [T, N] @ [N, K]
                rows = moving_t[b, i:i + H].view(H * nt, K, N)
                grad_a[b].baddbmm_(banded, rows.transpose(1, 2))
            if need_moving:  # d cost / d b = a: [K, T] @ [T, N], summed into moving row y + i
                grad_b[b, i:i + H].view(H * nt, K, N).baddbmm_(fixed_t[b].transpose(1, 2), banded)
    grad_fixed = grad_moving = None
    if need_fixed:
        grad_a = grad_a.view(B, H, lay.Wp, K)[:, :, :W].permute(0, 3, 1, 2)  # [B, K, H, W]
        if lay.ssd:  # a = [f, ||f||^2, 1]
            grad_a = grad_a[:, :C + 1].contiguous()
            grad_fixed = torch.addcmul(grad_a[:, :C], feat_fixed, grad_a[:, C:C + 1], value=2)
        else:
            grad_fixed = grad_a.contiguous()
    if need_moving:
        # sum the overlapping row segments back into the padded image: [B, K, H+2r, Wp+2r]
        chunks = -(-N // T)
        summed = grad_b.new_zeros(B, lay.Hm, nt + chunks, T, K)
        for q in range(chunks):
            width = min(T, N - q * T)
            part = grad_b[..., q * T:q * T + width].permute(0, 1, 2, 4, 3)  # [B, Hm, nt, w, K]
            summed[:, :, q:q + nt, :width] += part
        summed = summed.view(B, lay.Hm, (nt + chunks) * T, K)[:, r:r + H, r:r + W]  # [B, H, W, K]
        summed = summed.permute(0, 3, 1, 2).contiguous()  # [B, K, H, W]
        if lay.ssd:  # b = [-2m, 1, ||m||^2]
            grad_moving = (feat_moving * summed[:, C + 1:C + 2]).sub_(summed[:, :C]).mul_(2)
        else:  # b = -m
            grad_moving = summed.neg_()
    return grad_fixed, grad_moving


class _Correlation(torch.autograd.Function):
    """Autograd wrapper: forward and analytic backward by banded matrix products."""

    @staticmethod
    def forward(ctx, feat_fixed, feat_moving, disp_range, metric):
        lay = _Layout(feat_fixed.shape, disp_range, metric)
        ctx.layout = lay
        with torch.no_grad():
            fixed_t = _fixed_tiles(feat_fixed, lay)  # [B, H*nt, T, K]
            moving_t = _moving_tiles(feat_moving, lay)  # [B, H+2r, nt, K, N]
            cost = _correlation_forward(fixed_t, moving_t, lay)
        if any(ctx.needs_input_grad[:2]):  # a few times the size of the features, not of the cost
            ctx.save_for_backward(feat_fixed, feat_moving, fixed_t, moving_t)
        return cost

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_cost):
        feat_fixed, feat_moving, fixed_t, moving_t = ctx.saved_tensors
        need_fixed, need_moving = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_fixed, grad_moving = _correlation_backward(
            grad_cost, feat_fixed, feat_moving, fixed_t, moving_t, ctx.layout, need_fixed, need_moving
        )
        return grad_fixed, grad_moving, None, None


def correlation(
    feat_fixed: torch.Tensor, feat_moving: torch.Tensor, disp_range: int, metric: str = "ssd"
) -> torch.Tensor:
    """Cost volume of all D x D displacements, fast and lean (same values as the unfold layer).

    Args:
        feat_fixed, feat_moving: [B, C, H, W] feature maps (B >= 1), same shape, device and
            dtype (float32 or float64; CPU or CUDA).
        disp_range: D, odd; displacements (dy, dx) in {-r..r}^2 with r = (D-1)//2, in pixels
            of the feature maps.
        metric: ``"ssd"``: ``sum_c (fixed[c, y, x] - moving[c, y+dy, x+dx])**2``, exactly
            :func:`correlation_unfold`; ``"dot"``: ``-sum_c fixed[c, y, x] * moving[c, y+dy, x+dx]``,
            the negative FlowNetC correlation (lower is better for both).

    Returns:
        cost volume [B, D*D, H, W], channel ``k = i*D + j`` holds offset ``(dy, dx) = (i - r,
        j - r)``; the moving features are zero outside the image. Differentiable in both
        inputs through an analytic backward. Never builds the [B, C, D*D, H*W] tensor of the
        unfold layer: its temporaries are a few times the size of the features plus one
        ``[H, W, ~D]`` slab. SSD is evaluated as ``||f||^2 + ||m||^2 - 2 f.m``, so in float32
        a cost near zero carries a rounding error of about ``1e-7 * (||f||^2 + ||m||^2)``.
    """
    D = _check_inputs(feat_fixed, feat_moving, disp_range)
    check_choice("metric", metric, METRICS)
    return _Correlation.apply(feat_fixed, feat_moving, D, metric)


# --------------------------------------------------------------------------- reading it out


def _displacement_offsets(disp_range: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The offset of every cost-volume channel: [D*D, 2], row ``k = i*D + j`` is ``(i - r, j - r)``
    = (dy, dx) in pixels of the feature maps."""
    r = (check_odd("disp_range", disp_range) - 1) // 2
    steps = torch.arange(-r, r + 1, device=device, dtype=dtype)
    dy, dx = torch.meshgrid(steps, steps, indexing="ij")  # [D, D] each
    return torch.stack([dy.reshape(-1), dx.reshape(-1)], dim=1)


def argmin_displacement(cost_volume: torch.Tensor, disp_range: int) -> torch.Tensor:
    """Winner-takes-all read-out without any regularisation.

    Args:
        cost_volume: [B, D*D, H, W], lower is better.
        disp_range: D.

    Returns:
        displacement [B, 2, H, W] float (dy, dx) in pixels of the cost volume's grid: the
        offset of the cheapest channel at each pixel.
    """
    D = check_odd("disp_range", disp_range)
    check_tensor("cost_volume", cost_volume, dims=4, layout=f"[B, D*D={D * D}, H, W]", channels=D * D, finite=True)
    dtype = cost_volume.dtype if cost_volume.is_floating_point() else torch.float32
    offsets = _displacement_offsets(D, device=cost_volume.device, dtype=dtype)  # [D*D, 2]
    best = cost_volume.argmin(dim=1)  # [B, H, W]
    return offsets[best].permute(0, 3, 1, 2).contiguous()  # [B, H, W, 2] -> [B, 2, H, W]


# --------------------------------------------------------------------------- 3D (notebook 05)
#
# Volumes: features [B, C, d, h, w]; cost volume [B, D*D*D, d, h, w], channel
# ``k = (i*D + j)*D + l`` holds the offset ``(dz, dy, dx) = (i - r, j - r, l - r)`` (the 2D
# ordering with dz in front); the moving features are zero outside the volume.
#
# correlation3d needs no new kernel: the tiles of the 2D layer, built for every slice, and one
# batched banded product per (dz, dy) whose diagonals hold the costs of the D offsets dx.


def _diagonals3d(products: torch.Tensor, lay: _Layout, depth: int) -> torch.Tensor:
    """View of the D diagonals of [d*h*nt, T, N] products as [D, d, h, nt, T]: element
    ``(l, z, y, tile, t)`` is ``products[(z*h + y)*nt + tile, t, t + l]``."""
    T, N, nt, h = lay.T, lay.N, lay.num_tiles, lay.H
    view = products.as_strided((depth, h, nt, T, lay.D), (h * nt * T * N, nt * T * N, T * N, N + 1, 1))
    return view.permute(4, 0, 1, 2, 3)


def _moving_rows3d(moving_t: torch.Tensor, i: int, j: int, depth: int, lay: _Layout) -> torch.Tensor:
    """The moving row segments that fixed slice z, row y meets at offsets (i - r, j - r):
    padded slice z + i, padded row y + j, as a contiguous [d*h*nt, K, N] batch (a copy)."""
    return moving_t[i:i + depth, j:j + lay.H].reshape(depth * lay.H * lay.num_tiles, lay.K, lay.N)


class _Correlation3d(torch.autograd.Function):
    """D*D batched banded products per volume (slices, rows and tiles in one batch); analytic backward."""

    @staticmethod
    def forward(ctx, feat_fixed, feat_moving, disp_range, metric):
        B, C, d, h, w = feat_fixed.shape
        D, r = disp_range, (disp_range - 1) // 2
        lay = _Layout(torch.Size((d, C, h, w)), D, metric)  # the 2D layout of one slice (rows h, width w)
        nt, T = lay.num_tiles, lay.T
        with torch.no_grad():
            # per volume: fixed tiles of all slices [d*h*nt, T, K]; moving slices zero-padded by r
            # in z (beyond the volume b = [0, 1, 0] for SSD: cost ||f||^2, as with 2D zero padding)
            fixed_t = torch.stack([_fixed_tiles(feat_fixed[b].transpose(0, 1), lay) for b in range(B)])
            fixed_t = fixed_t.view(B, d * h * nt, T, lay.K)
            padded = F.pad(feat_moving, (0, 0, 0, 0, r, r))  # [B, C, d+2r, h, w]
            moving_t = torch.stack([_moving_tiles(padded[b].transpose(0, 1), lay) for b in range(B)])
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
            grad_b = grad_b.view(B * Zp, lay.Hm, nt, K, N)
            chunks = -(-N // T)
            summed = grad_b.new_zeros(B * Zp, lay.Hm, nt + chunks, T, K)
            for q in range(chunks):
                width = min(T, N - q * T)
                summed[:, :, q:q + nt, :width] += grad_b[..., q * T:q * T + width].permute(0, 1, 2, 4, 3)
            summed = summed.view(B, Zp, lay.Hm, (nt + chunks) * T, K)[:, r:r + d, r:r + h, r:r + w]
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
        volume (the border convention of :func:`correlation`). Differentiable in both inputs.

    How: the banded matrix products of :func:`correlation`, with the rows of all slices in
    one batch: for each (dz, dy) one batched product of the fixed tiles and the moving row
    segments dz slices and dy rows further on, whose D diagonals are the costs of the D
    offsets dx (D*D products per volume). Its temporaries are a few times the size of the
    features (the same holds for the backward pass), never a multiple of the cost volume. SSD is evaluated as
    ``||f||^2 + ||m||^2 - 2 f.m`` (float32 rounding as in 2D).
    """
    D = _check_inputs(feat_fixed, feat_moving, disp_range, ndim=3)
    check_choice("metric", metric, METRICS)
    return _Correlation3d.apply(feat_fixed, feat_moving, D, metric)


def _displacement_offsets3d(disp_range: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[D**3, 3]: row ``k = (i*D + j)*D + l`` is ``(i - r, j - r, l - r)`` = (dz, dy, dx)."""
    r = (check_odd("disp_range", disp_range) - 1) // 2
    steps = torch.arange(-r, r + 1, device=device, dtype=dtype)
    grids = torch.meshgrid(steps, steps, steps, indexing="ij")  # [D, D, D] each
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def argmin_displacement3d(cost_volume: torch.Tensor, disp_range: int) -> torch.Tensor:
    """Winner-takes-all read-out of a 3D cost volume [B, D**3, d, h, w].

    Returns:
        displacement [B, 3, d, h, w] float (dz, dy, dx) in voxels of the cost volume's grid.
    """
    D = check_odd("disp_range", disp_range)
    check_tensor("cost_volume", cost_volume, dims=5, layout=f"[B, D**3={D**3}, d, h, w]", channels=D**3, finite=True)
    dtype = cost_volume.dtype if cost_volume.is_floating_point() else torch.float32
    offsets = _displacement_offsets3d(D, device=cost_volume.device, dtype=dtype)  # [D**3, 3]
    best = cost_volume.argmin(dim=1)  # [B, d, h, w]
    return offsets[best].permute(0, 4, 1, 2, 3).contiguous()


# ----------------------------------------------------------- sparse sampling (pdd_net style)
#
# pdd_net (Heinrich, MICCAI 2019) does not evaluate every voxel and every displacement: the
# costs are computed for a regular grid of control points (32^3 over the image) and a
# displacement cube sampled with a step larger than a voxel (15^3 labels), then regularised
# on that sparse representation (min-convolution over the displacement cube, mean field over
# the control-point grid), and the soft arg-min is interpolated back to a dense field.


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
    ``disp_step=1`` gives all D**3 offsets of :func:`correlation3d`.
    """
    r = (check_odd("disp_range", disp_range) - 1) // 2
    disp_step = check_int("disp_step", disp_step, minimum=1)
    half = r // disp_step
    steps = torch.arange(-half, half + 1, device=device) * disp_step
    grids = torch.meshgrid(steps, steps, steps, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


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

    The same values as :func:`correlation3d` at the sampled points and offsets
    (``dense[b, k(o), z, y, x] == sparse.cost[b, k, p]`` for the point p = (z, y, x) and the
    offset o, where ``k(o) = ((oz + r)*D + oy + r)*D + ox + r``), but only ``K * P`` of them.

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
        metric: "ssd" or "dot", as in :func:`correlation3d`.
        border: what the moving features are beyond the volume: "zeros" (as
            :func:`correlation3d`) or "replicate" (their edge values, as the registration's
            ``border="replicate"``).

    Returns:
        :class:`SparseCost` ``(cost [B, K, P], offsets [K, 3], points [P, 3], grid_shape)``.
        Differentiable in both inputs; autograd keeps only views of the inputs, so the memory
        is that of the output plus the padded moving features. One pass of a few element-wise
        operations per displacement: the time is proportional to ``K * P * C``.
    """
    D = _check_inputs(feat_fixed, feat_moving, disp_range, ndim=3)
    check_choice("metric", metric, METRICS)
    check_choice("border", border, ("zeros", "replicate"))
    r = (D - 1) // 2
    device = feat_fixed.device
    if offsets is None:
        offsets = displacement_cube(D, disp_step, device=device)
    else:
        check_tensor("offsets", offsets, dims=2, layout="[K, 3] (dz, dy, dx)", finite=True)
        if offsets.shape[1] != 3 or offsets.shape[0] < 1:
            raise ValueError(f"offsets must be an integer tensor [K, 3] (dz, dy, dx), got {describe(offsets)}")
        if offsets.is_floating_point() and not torch.equal(offsets, offsets.round()):
            raise ValueError("offsets must be whole voxels of the feature grid")
        offsets = offsets.round().long().to(device)
        if offsets.abs().max() > r:
            raise ValueError(f"offsets must lie within +-r = +-{r} (disp_range {D}), got a component "
                             f"{int(offsets.abs().max())}")
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
