"""The correlation layer: dense sampling of the displacement space (taught in notebook 02).

Two implementations of the same cost volume:

* :func:`correlation_unfold` -- the teaching version, built exactly as in the 2019 tutorial
  with ``F.unfold``. Easy to read, but it materialises a ``[B, C, D*D, H*W]`` tensor.
* :func:`correlation` -- the same values, fast and lean: it never builds that tensor and has
  its own analytic backward (see "How the fast version works" below).

The 3D versions (notebook 05) are in :mod:`tutorial_utils.three_d`: ``correlation3d`` in
:mod:`~tutorial_utils.three_d.correlation` (the same banded products below, once per slice
offset) and the pdd_net sampling of control points and displacements in
:mod:`~tutorial_utils.three_d.sparse`.

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

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .checks import (
    check_choice,
    check_finite,
    check_odd,
    check_same,
    check_tensor,
    describe,
)
from .offsets import displacement_offsets

__all__ = [
    "METRICS",
    "argmin_displacement",
    "correlation",
    "correlation_unfold",
]

METRICS = ("ssd", "dot")
"""Metrics of :func:`correlation`: sum of squared differences, negative dot product."""


def check_inputs(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, disp_range: int, ndim: int = 2) -> int:
    """Check two feature maps [B, C, H, W] (``ndim=3``: volumes [B, C, d, h, w]) and ``disp_range``.

    Both floating point, finite, of one shape, device and dtype; returns ``disp_range`` as an int.
    Shared with :mod:`tutorial_utils.three_d` (its correlation layers check their inputs here).
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
    D = check_inputs(feat_fixed, feat_moving, disp_range)
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


class Layout:
    """Shapes of the tiled problem: x is cut into ``num_tiles`` tiles of ``tile`` pixels.

    Shared with :mod:`tutorial_utils.three_d.correlation`, which tiles every slice of a volume alike.
    """

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


def fixed_tiles(feat_fixed: torch.Tensor, lay: Layout) -> torch.Tensor:
    """``a = [f, ||f||^2, 1]`` (SSD) or ``f`` (dot), channel-last and tiled: [B, H*nt, T, K].

    Shared with :mod:`tutorial_utils.three_d.correlation`.
    """
    B, C, H, W = feat_fixed.shape
    fixed_t = feat_fixed.new_zeros(B, H, lay.Wp, lay.K)  # [B, H, Wp, K], zero in padded x
    fixed_t[:, :, :W, :C] = feat_fixed.permute(0, 2, 3, 1)
    if lay.ssd:
        fixed_t[:, :, :W, C] = (feat_fixed * feat_fixed).sum(1)
        fixed_t[:, :, :W, C + 1] = 1
    return fixed_t.view(B, H * lay.num_tiles, lay.T, lay.K)


def moving_tiles(feat_moving: torch.Tensor, lay: Layout) -> torch.Tensor:
    """``b = [-2m, 1, ||m||^2]`` (SSD) or ``-m`` (dot), zero padded, as overlapping row
    segments of ``N = T + 2r`` pixels: [B, H + 2r, nt, K, N].

    Shared with :mod:`tutorial_utils.three_d.correlation`.
    """
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


def _diagonals(products: torch.Tensor, lay: Layout) -> torch.Tensor:
    """View of the D diagonals of [H*nt, T, N] products as [H, nt, T, D]: element
    ``(y, tile, t, j)`` is ``products[y*nt + tile, t, t + j]``."""
    T, N, nt = lay.T, lay.N, lay.num_tiles
    return products.as_strided((lay.H, nt, T, lay.D), (nt * T * N, T * N, N + 1, 1))


def _correlation_forward(fixed_t: torch.Tensor, moving_t: torch.Tensor, lay: Layout) -> torch.Tensor:
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


def sum_segments(grad_b: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Sum the gradients of the overlapping moving row segments [n, Hm, nt, K, N] back into the
    padded rows they were cut from: [n, Hm, Wp + 2r (and a few), K], channel-last.

    Row segment ``tile`` starts at padded column ``tile * T``, so its pixel ``p`` lands in
    column ``tile * T + p``. Shared with :mod:`tutorial_utils.three_d.correlation` (n = B
    volumes x padded slices).
    """
    n, nt, T, N, K = grad_b.shape[0], lay.num_tiles, lay.T, lay.N, lay.K
    chunks = -(-N // T)
    summed = grad_b.new_zeros(n, lay.Hm, nt + chunks, T, K)
    for q in range(chunks):
        width = min(T, N - q * T)
        part = grad_b[..., q * T:q * T + width].permute(0, 1, 2, 4, 3)  # [n, Hm, nt, w, K]
        summed[:, :, q:q + nt, :width] += part
    return summed.view(n, lay.Hm, (nt + chunks) * T, K)


def _correlation_backward(grad_cost, feat_fixed, feat_moving, fixed_t, moving_t, lay: Layout,
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
        # sum the overlapping row segments back into the padded image
        summed = sum_segments(grad_b, lay)[:, r:r + H, r:r + W]  # [B, H, W, K]
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
        lay = Layout(feat_fixed.shape, disp_range, metric)
        ctx.layout = lay
        with torch.no_grad():
            fixed_t = fixed_tiles(feat_fixed, lay)  # [B, H*nt, T, K]
            moving_t = moving_tiles(feat_moving, lay)  # [B, H+2r, nt, K, N]
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
    D = check_inputs(feat_fixed, feat_moving, disp_range)
    check_choice("metric", metric, METRICS)
    return _Correlation.apply(feat_fixed, feat_moving, D, metric)


# --------------------------------------------------------------------------- reading it out


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
    offsets = displacement_offsets(D, device=cost_volume.device, dtype=dtype)  # [D*D, 2]
    best = cost_volume.argmin(dim=1)  # [B, H, W]
    return offsets[best].permute(0, 3, 1, 2).contiguous()  # [B, H, W, 2] -> [B, 2, H, W]
