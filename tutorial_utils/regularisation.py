"""Regularisation without trainable weights: min-convolution, mean field, soft arg-min.

Taught in ``notebooks/03_regularisation.ipynb``. A cost volume [B, D*D, h, w] holds, for
every pixel of the fixed feature map, the cost of each of the D x D discrete displacements
(channel ``k = i*D + j`` is the offset ``(dy, dx) = (i - r, j - r)``, ``r = (D-1)//2``).
The data cost alone is noisy; a smooth deformation needs a pairwise term that penalises
neighbours with different displacements (a Markov random field, as in deeds). The 2019
tutorial approximates inference in that MRF with three operations that have no weights:

* :func:`min_convolution` over the two *displacement* dimensions: the lower envelope
  ``min_d' cost(d') + lambda*|d - d'|^2`` (exact: :func:`min_convolution_exact`), approximated
  by a min-pooling followed by two average poolings with replication padding;
* :func:`mean_field` over the two *spatial* dimensions: average poolings of the costs, so
  every pixel sees the (min-convolved) costs of its neighbours;
* :func:`soft_displacement`: a softmax over the displacements of ``-alpha * cost`` and the
  expected displacement (soft arg-min), which is differentiable and sub-pixel accurate.

All functions work on any device and keep the input's dtype; nothing here is trained. The
3D versions (notebook 05) are in :mod:`tutorial_utils.three_d.regularisation`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_choice, check_int, check_number, check_odd, check_tensor
from .checks import check_cost_volume as _check_cost_volume
from .offsets import displacement_offsets

__all__ = [
    "check_cost_volume",
    "min_convolution_exact",
    "min_convolution",
    "mean_field",
    "regularise",
    "soft_displacement",
    "normalise_cost",
]


def check_cost_volume(cost: torch.Tensor, disp_range: int) -> tuple[int, int, int]:
    """Validate a cost volume [B, D*D, h, w] (floating point, finite) for ``disp_range`` D; return ``(B, h, w)``.

    A thin wrapper of :func:`tutorial_utils.checks.check_cost_volume`.
    """
    _, B, h, w = _check_cost_volume("cost", cost, disp_range)
    return B, h, w


def min_convolution_exact(cost: torch.Tensor, disp_range: int, lam: float = 1.0, chunk: int = 4096) -> torch.Tensor:
    """Exact min-convolution over the displacement grid, by brute force.

    ``out[b, k, y, x] = min_k' cost[b, k', y, x] + lam * |d_k - d_k'|^2`` where ``d_k`` are the
    offsets of :func:`~tutorial_utils.offsets.displacement_offsets`: the lower envelope of parabolas of curvature
    ``lam`` rooted at every displacement, their heights the costs. O((D*D)^2) per pixel, fine
    for the small D of this tutorial.

    Args:
        cost: [B, D*D, h, w]. disp_range: D (odd). lam: >= 0, cost units per pixel^2.
        chunk: pixels processed at once (bounds the memory).

    Returns:
        [B, D*D, h, w], same dtype and device. ``out <= cost`` everywhere.
    """
    D, B, h, w = _check_cost_volume("cost", cost, disp_range)
    check_number("lam", lam, minimum=0)
    chunk = check_int("chunk", chunk, minimum=1)
    offsets = displacement_offsets(D, cost.device, cost.dtype)  # [K, 2]
    penalty = lam * torch.cdist(offsets, offsets) ** 2  # [K, K]: penalty[k, k']
    K = D**2
    flat = cost.permute(0, 2, 3, 1).reshape(-1, K)  # [B*h*w, K]
    out = torch.empty_like(flat)
    for start in range(0, flat.shape[0], chunk):
        part = flat[start : start + chunk]  # [n, K']
        out[start : start + chunk] = (part[:, None, :] + penalty[None]).amin(dim=2)  # [n, K]
    return out.view(B, h, w, K).permute(0, 3, 1, 2).contiguous()


def min_convolution(
    cost: torch.Tensor,
    disp_range: int,
    min_kernel: int = 3,
    avg_kernel: int = 5,
    avg_passes: int = 2,
    padding: int | None = None,
    min_order: str = "first",
) -> torch.Tensor:
    """Differentiable, fast approximation of :func:`min_convolution_exact` (the 2019 recipe).

    For every pixel the D x D cost grid is replication-padded, min-pooled (``min_kernel``,
    stride 1) and then average-pooled ``avg_passes`` times (``avg_kernel``, stride 1). The
    padding restores the D x D size exactly: by default
    ``padding = ((min_kernel - 1) + avg_passes * (avg_kernel - 1)) // 2`` (5 for 3, 5, 2 passes).
    The min-pooling spreads low costs to neighbouring displacements (like the flat bottom of
    a wide parabola); the average poolings round the result off. It is scale- and
    shift-equivariant: ``min_convolution(a*cost + b) == a*min_convolution(cost) + b`` for a > 0.

    Note: the slides' code of 2019 applies the two average poolings first and the
    min-pooling last (``-minconv(-cost)`` with ``Sequential(pad, avg, avg, max)``); the
    default order here (min first) is the one the tutorial text describes. Both keep the
    size; ``min_order="last"`` gives the slides' order (what ``DEFAULTS_2019`` uses).

    Args:
        cost: [B, D*D, h, w]. disp_range: D (odd). min_kernel, avg_kernel: odd >= 1.
        avg_passes: number of average poolings (>= 0). padding: replication padding; must
            equal the default for the output to keep D x D displacements.
        min_order: "first" (pad, min-pool, average pools; the default) or "last" (pad,
            average pools, min-pool: the 2019 slides' code).

    Returns:
        [B, D*D, h, w], the regularised costs.
    """
    D = _check_cost_volume("cost", cost, disp_range)[0]
    min_kernel = check_odd("min_kernel", min_kernel)
    avg_kernel = check_odd("avg_kernel", avg_kernel)
    avg_passes = check_int("avg_passes", avg_passes, minimum=0)
    check_choice("min_order", min_order, ("first", "last"))
    needed = ((min_kernel - 1) + avg_passes * (avg_kernel - 1)) // 2
    if padding is not None and padding != needed:
        raise ValueError(
            f"padding={padding} would change the {D}x{D} displacement grid; "
            f"min_kernel={min_kernel} and {avg_passes} x avg_kernel={avg_kernel} need padding={needed}"
        )
    return _min_convolution(cost, D, min_kernel, avg_kernel, avg_passes, min_order)


def _min_convolution(cost: torch.Tensor, D: int, min_kernel: int, avg_kernel: int, avg_passes: int,
                     min_order: str) -> torch.Tensor:
    """:func:`min_convolution` of a checked cost volume [B, D*D, h, w]."""
    B, _, h, w = cost.shape
    padding = ((min_kernel - 1) + avg_passes * (avg_kernel - 1)) // 2
    # the memory of [B, D*D, h, w] already is [B, D, D, h*w]: pool over dims 1 and 2 directly
    grid = cost.reshape(B, 1, D, D, h * w)
    if padding > 0:
        grid = F.pad(grid, (0, 0, padding, padding, padding, padding), mode="replicate")
    grid = grid[:, 0]  # [B, D+2p, D+2p, h*w]
    # separable sliding windows (Tensor.unfold adds the window as a last dim): exactly a
    # min-pooling / average pooling with stride 1, but fast for many tiny D x D grids
    if min_order == "last":  # the 2019 slides' code: the average poolings, then the min-pooling
        for _ in range(avg_passes):
            grid = grid.unfold(1, avg_kernel, 1).mean(-1).unfold(2, avg_kernel, 1).mean(-1)
        grid = grid.unfold(1, min_kernel, 1).amin(-1).unfold(2, min_kernel, 1).amin(-1)
        return grid.reshape(B, D * D, h, w)
    grid = grid.unfold(1, min_kernel, 1).amin(-1).unfold(2, min_kernel, 1).amin(-1)
    for _ in range(avg_passes):
        grid = grid.unfold(1, avg_kernel, 1).mean(-1).unfold(2, avg_kernel, 1).mean(-1)
    return grid.reshape(B, D * D, h, w)


def mean_field(cost: torch.Tensor, kernel: int = 5, passes: int = 3, padding: int | None = None) -> torch.Tensor:
    """Average the costs over the spatial dimensions (one mean-field step, the 2019 recipe).

    ``passes`` average poolings of size ``kernel`` (stride 1) after replication padding of
    ``passes * (kernel - 1) // 2`` (6 for 5 x 5 and three passes), so the size is kept.
    Every pixel's costs become a weighted average of its neighbours' costs: with the
    min-convolution before it, this is the "sum of the messages from the neighbours" of
    loopy belief propagation / mean-field inference in the MRF, with averaging instead of
    summing (the scale of the costs is kept).

    Args:
        cost: [B, K, h, w] (K = D*D displacements; any K works). kernel: odd >= 1.
        passes: >= 0. padding: must equal the default (kept only to say so clearly).

    Returns:
        [B, K, h, w].
    """
    check_tensor("cost", cost, dims=4, layout="a cost volume [B, K, h, w] for mean_field (mean_field3d for 3D)",
                 floating=True, finite=True)
    kernel = check_odd("kernel", kernel)
    passes = check_int("passes", passes, minimum=0)
    needed = passes * (kernel - 1) // 2
    if padding is not None and padding != needed:
        raise ValueError(f"padding={padding} would change the spatial size; {passes} x kernel={kernel} need {needed}")
    return _mean_field(cost, kernel, passes)


def _mean_field(cost: torch.Tensor, kernel: int, passes: int) -> torch.Tensor:
    """:func:`mean_field` of a checked cost volume [B, K, h, w]."""
    padding = passes * (kernel - 1) // 2
    if padding > 0:
        cost = F.pad(cost, (padding,) * 4, mode="replicate")
    for _ in range(passes):
        cost = F.avg_pool2d(cost, kernel, stride=1)
    return cost


def regularise(
    cost: torch.Tensor,
    disp_range: int,
    min_kernel: int = 3,
    avg_kernel: int = 5,
    meanfield_kernel: int = 5,
    meanfield_iterations: int = 1,
    meanfield_passes: int = 3,
    min_order: str = "first",
) -> torch.Tensor:
    """Alternate :func:`min_convolution` and :func:`mean_field` ``meanfield_iterations`` times.

    One iteration is the 2019 regulariser: ``mean_field(min_convolution(cost))``.
    Each further iteration applies it again to the result, as further rounds of message
    passing let information travel further in loopy belief propagation: after t rounds a
    pixel has heard from neighbours about t mean-field radii away, and the min-convolutions
    add up to a wider parabola (a weaker penalty on large differences that are consistent).
    Zero iterations return the data cost unchanged. (Feeding the data cost back in every
    round, ``(cost + message) / 2``, was measured in notebook 03 to give rougher fields.)

    With ``min_order="last"`` (the pooling order of the 2019 slides' code, see
    :func:`min_convolution`) and the kernels 3, 5, 5 x 3, one iteration is the slides'
    ``meanfield(-minconv(-cost))`` exactly.

    Args:
        cost: [B, D*D, h, w]. disp_range: D. Kernel sizes odd; iterations >= 0.
        min_order: "first" (min-pool, then average pools) or "last" (the slides' order).

    Returns:
        [B, D*D, h, w].
    """
    D = _check_cost_volume("cost", cost, disp_range)[0]
    min_kernel = check_odd("min_kernel", min_kernel)
    avg_kernel = check_odd("avg_kernel", avg_kernel)
    meanfield_kernel = check_odd("meanfield_kernel", meanfield_kernel)
    meanfield_passes = check_int("meanfield_passes", meanfield_passes, minimum=0)
    meanfield_iterations = check_int("meanfield_iterations", meanfield_iterations, minimum=0)
    check_choice("min_order", min_order, ("first", "last"))
    belief = cost
    for _ in range(meanfield_iterations):  # checked once above, not in every round; 2 average pools
        belief = _mean_field(_min_convolution(belief, D, min_kernel, avg_kernel, 2, min_order),
                             meanfield_kernel, meanfield_passes)
    return belief


def normalise_cost(cost: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Divide each pair's cost volume by its mean so that one ``alpha`` serves every feature type.

    SSD costs are >= 0 and their scale depends on the features (number of channels, their
    range). Dividing by the mean over displacements and pixels makes the average cost 1 for
    every pair, which is about the scale of the 2019 CNN's 24 sigmoid features, so the 2019
    ``alpha = 10`` keeps its meaning. Shift-free costs (min near 0) are assumed. A pair whose
    costs are negative on average (``metric="dot"``) is divided by its mean *absolute* value
    instead: the scale is always positive, so the order of the displacements is kept.

    Args:
        cost: [B, K, h, w], floating point, finite. eps: > 0, added to the scale (no division by 0).

    Returns:
        [B, K, h, w]; for costs >= 0 the mean is 1 per batch element.
    """
    check_tensor("cost", cost, dims=4, layout="[B, K, h, w]", floating=True, finite=True)
    check_number("eps", eps, minimum=0, strict_minimum=True)
    scale = cost.mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1], > 0 for SSD costs
    if bool((scale <= 0).any()):  # negative on average (metric="dot"): a negative scale would flip the order
        scale = torch.where(scale > 0, scale, cost.abs().mean(dim=(1, 2, 3), keepdim=True))
    return cost / (scale + eps)


def soft_displacement(
    cost: torch.Tensor, disp_range: int, alpha: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities over the displacements and the expected displacement (soft arg-min).

    ``probabilities = softmax(-alpha * cost)`` over the D*D displacement channels (dim 1),
    ``displacement = sum_k probabilities[:, k] * offsets[k]``. Unlike the arg-min it is
    differentiable and lands between the grid points (sub-pixel): for a cost that is a
    parabola around a non-integer minimum the expectation is close to that minimum.

    Args:
        cost: [B, D*D, h, w]. disp_range: D (odd). alpha: > 0, inverse temperature.

    Returns:
        ``(probabilities [B, D*D, h, w], displacement [B, 2, h, w])``; the displacement
        channels are (dy, dx) in pixels of the cost volume's (feature) grid.
    """
    D = _check_cost_volume("cost", cost, disp_range)[0]
    check_number("alpha", alpha, minimum=0, strict_minimum=True)
    probabilities = torch.softmax(-alpha * cost, dim=1)  # [B, D*D, h, w]
    offsets = displacement_offsets(D, cost.device, cost.dtype)  # [D*D, 2]
    displacement = torch.einsum("bkyx,kc->bcyx", probabilities, offsets)  # [B, 2, h, w]
    return probabilities, displacement
