"""Learning the features: the weakly supervised, non-local label loss and the training loop.

Taught in ``notebooks/04_training.ipynb``. Only the feature CNN is trained; the correlation
layer and the regularisation stay fixed (they have no weights). The supervision is not a
set of correspondences but the organ segmentations of both images:

1. both images go through the CNN: ``feat_fixed``, ``feat_moving`` [B, C, h, w] (h = H/4);
2. the SSD cost volume over D x D displacements, divided by its mean, is regularised
   (min-convolution + mean field) and turned into probabilities ``softmax(-alpha * cost)``
   [B, D*D, h, w] -- exactly what :func:`~tutorial_utils.registration.register_images` does;
3. the *non-local label warp*: the moving one-hot labels at feature resolution [B, L, h, w]
   are looked up at every one of the D x D displacements and averaged with these
   probabilities, ``warped[l, y, x] = sum_k p[k, y, x] * onehot_moving[l, y + dy_k, x + dx_k]``;
4. the loss is the squared difference to the fixed one-hot labels, summed over the labels
   (background included) and averaged over pixels and pairs; optionally plus a diffusion
   penalty on the expected displacement.

The gradient reaches the features through the probabilities only, so the CNN learns
features whose costs put the probability mass on displacements that carry the right label.

Speed (``python -m tutorial_utils.benchmark training`` measures it): the 2019 loop ran one
pair at a time, the CNN twice per pair, the unfold correlation layer, pooling modules and an
unfolded label tensor. Here every step draws ``images_per_step`` training images, runs the
CNN once on all of them and uses *every ordered pair* among them (n images give n(n-1)
pairs); the cost volume comes from the fast :func:`~tutorial_utils.correlation.correlation`,
the regularisation from :func:`regularise_fast` (the same values as
:func:`~tutorial_utils.regularisation.regularise`, computed with small matrix products and a
hand-written min-pool gradient), and the label warp from :func:`nonlocal_label_warp`, a sum
of shifted one-hot maps weighted by the probabilities -- the same shifted sum as the
correlation layer, with each moving map shared by all pairs that use it. The pairs are
differentiated a few at a time, so that their cost volumes stay in the CPU cache.

The settings of the fixed blocks (regularisation kernels, ``alpha``, border handling,
pre-alignment) are read from :func:`~tutorial_utils.registration.register_images`
(:func:`pipeline_defaults`), so that a trained CNN fits the pipeline it is used in.

The shipped checkpoint (:data:`CHECKPOINT`) was made by::

    python -m tutorial_utils.train --pairs 12000 --source synthetic --threads 1 --evaluate \
        --out tutorial_utils/checkpoints/feature_cnn_synthetic.pt
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checks import (
    argument_type,
    check_choice,
    check_finite,
    check_int,
    check_number,
    check_odd,
)
from .correlation import correlation_unfold
from .data import Dataset, _slice_ids
from .environment import choose_device
from .models import FeatureCNN
from .registration import DEFAULTS_2019, FEATURE_STRIDE
from .regularisation import displacement_offsets, min_convolution, normalise_cost

__all__ = [
    "CHECKPOINT",
    "DEFAULTS",
    "DEFAULT_PAIRS",
    "TRAIN_DEFAULTS_2019",
    "LossHistory",
    "add_run_arguments",
    "diffusion_penalty",
    "evaluate_registration",
    "label_onehot",
    "load_features",
    "load_state_dict",
    "loss_2019",
    "main",
    "nonlocal_label_loss",
    "nonlocal_label_loss_reference",
    "nonlocal_label_warp",
    "nonlocal_label_warp_unfold",
    "pair_loss",
    "pipeline_defaults",
    "regularise_fast",
    "save_features",
    "train_features",
    "train_features_2019",
    "train_features_settings_2019",
]

CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "feature_cnn_synthetic.pt"
"""The pretrained feature CNN shipped with the package (a ``state_dict``, see :func:`load_features`;
how it was made: the module docstring and ``checkpoints/README.md``)."""


# =========================================================================== one-hot labels


def label_onehot(labels: torch.Tensor, num_labels: int, stride: int = FEATURE_STRIDE,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot labels at feature resolution: [B, H, W] int -> [B, L, H/stride, W/stride].

    Each label's one-hot map is average-pooled over ``stride x stride`` blocks, so a value is
    the fraction of that block covered by the label and the L values of a pixel sum to 1
    (background included, L = ``num_labels``).
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 3 or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor [B, H, W], got {getattr(labels, 'shape', labels)}")
    num_labels = check_int("num_labels", num_labels, minimum=1)
    stride = check_int("stride", stride, minimum=1)
    if labels.shape[-2] % stride or labels.shape[-1] % stride:
        raise ValueError(f"H and W must be divisible by stride={stride}, got {tuple(labels.shape[-2:])}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise ValueError(f"labels hold values outside 0..{num_labels - 1}")
    onehot = F.one_hot(labels.long(), num_labels).permute(0, 3, 1, 2).to(dtype)  # [B, L, H, W]
    return F.avg_pool2d(onehot, stride) if stride > 1 else onehot  # [B, L, h, w]


# =========================================================================== the label warp


def _check_probabilities(probabilities: torch.Tensor, onehot_moving: torch.Tensor) -> int:
    """Validate [B, D*D, h, w] and [B, L, h, w]; return D."""
    if not isinstance(probabilities, torch.Tensor) or probabilities.dim() != 4:
        raise ValueError(f"probabilities must be [B, D*D, h, w], got {getattr(probabilities, 'shape', probabilities)}")
    D = math.isqrt(probabilities.shape[1])
    if D * D != probabilities.shape[1] or D % 2 == 0:
        raise ValueError(f"probabilities must have D*D channels with D odd, got {probabilities.shape[1]}")
    if not isinstance(onehot_moving, torch.Tensor) or onehot_moving.dim() != 4:
        raise ValueError(f"onehot_moving must be [B, L, h, w], got {getattr(onehot_moving, 'shape', onehot_moving)}")
    if onehot_moving.shape[0] != probabilities.shape[0] or onehot_moving.shape[-2:] != probabilities.shape[-2:]:
        raise ValueError(
            f"onehot_moving {tuple(onehot_moving.shape)} must be [B, L, h, w] with the B, h, w of the "
            f"probabilities {tuple(probabilities.shape)} (labels at feature resolution: see label_onehot)")
    return D


def nonlocal_label_warp_unfold(probabilities: torch.Tensor, onehot_moving: torch.Tensor) -> torch.Tensor:
    """The non-local label warp as in 2019, with ``F.unfold`` (clear, memory hungry).

    Args:
        probabilities: [B, D*D, h, w], channel ``k = i*D + j`` is the offset ``(i - r, j - r)``.
        onehot_moving: [B, L, h, w], the moving labels at feature resolution.

    Returns:
        [B, L, h, w]: ``sum_k p[k, y, x] * onehot_moving[l, y + dy_k, x + dx_k]`` (zero outside).
    """
    D = _check_probabilities(probabilities, onehot_moving)
    B, L, h, w = onehot_moving.shape
    unfolded = F.unfold(onehot_moving, (D, D), padding=(D - 1) // 2).view(B, L, D * D, h * w)
    warped = (unfolded * probabilities.reshape(B, 1, D * D, h * w)).sum(2)  # [B, L, h*w]
    return warped.view(B, L, h, w)


class _SharedMovingWarp(torch.autograd.Function):
    """The warp of c pairs that share one moving label map: D*D multiply-adds of shifted maps."""

    @staticmethod
    def forward(ctx, probabilities, onehot_moving, disp_range):
        c, K, h, w = probabilities.shape  # [c, D*D, h, w]
        L = onehot_moving.shape[0]  # onehot_moving: [L, h, w]
        r = (disp_range - 1) // 2
        padded = F.pad(onehot_moving, (r, r, r, r))  # [L, h+2r, w+2r], zero outside
        warped = probabilities.new_zeros(c, L, h, w)
        for k in range(K):
            i, j = divmod(k, disp_range)  # offset (dy, dx) = (i - r, j - r)
            warped.addcmul_(probabilities[:, k:k + 1], padded[None, :, i:i + h, j:j + w])
        ctx.save_for_backward(padded)
        ctx.disp_range = disp_range
        return warped

    @staticmethod
    def backward(ctx, grad_warped):
        (padded,) = ctx.saved_tensors
        D = ctx.disp_range
        c, L, h, w = grad_warped.shape
        grad = grad_warped.new_empty(c, D * D, h, w)
        for k in range(D * D):  # d warped[l] / d p_k = the map shifted by offset k
            i, j = divmod(k, D)
            torch.sum(grad_warped * padded[None, :, i:i + h, j:j + w], 1, out=grad[:, k])
        return grad, None, None


def nonlocal_label_warp(probabilities: torch.Tensor, onehot_moving: torch.Tensor,
                        moving_index: torch.Tensor | None = None) -> torch.Tensor:
    """The non-local label warp, fast: same values as :func:`nonlocal_label_warp_unfold`.

    ``warped[b, l, y, x] = sum_k probabilities[b, k, y, x] * onehot_moving[m_b, l, y + dy_k, x + dx_k]``
    (zeros outside the image), with ``m_b = moving_index[b]``: the one-hot maps shifted by
    each of the D*D offsets, weighted by the probabilities. Computed as D*D in-place
    multiply-adds per moving map (shared by all pairs that use it) instead of unfolding the
    maps into a [B, L, D*D, h*w] tensor; the gradient with respect to the probabilities is
    the product of the incoming gradient with the same shifted maps, summed over labels.
    Differentiable in ``probabilities`` (the labels are data; if ``onehot_moving`` requires
    a gradient, the unfold version is used).

    Args:
        probabilities: [B, D*D, h, w] (B pairs).
        onehot_moving: [N, L, h, w], labels at feature resolution (:func:`label_onehot`).
        moving_index: int [B], which of the N moving label maps each pair uses; default
            ``arange(B)`` (then N = B).

    Returns:
        [B, L, h, w].
    """
    B = probabilities.shape[0] if isinstance(probabilities, torch.Tensor) else 0
    if moving_index is None:
        D = _check_probabilities(probabilities, onehot_moving)
        moving_index = torch.arange(B, device=probabilities.device)
    else:
        if not isinstance(onehot_moving, torch.Tensor) or onehot_moving.dim() != 4 or not len(onehot_moving):
            raise ValueError(f"onehot_moving must be [N, L, h, w], got {getattr(onehot_moving, 'shape', onehot_moving)}")
        D = _check_probabilities(probabilities, onehot_moving[:1].expand(B, -1, -1, -1))
        moving_index = torch.as_tensor(moving_index, device=probabilities.device).long()
        if moving_index.shape != (B,):
            raise ValueError(f"moving_index must be [B] = [{B}], got {tuple(moving_index.shape)}")
        if B and (int(moving_index.min()) < 0 or int(moving_index.max()) >= onehot_moving.shape[0]):
            raise ValueError(f"moving_index must lie in 0..{onehot_moving.shape[0] - 1}")
    onehot_moving = onehot_moving.to(probabilities.dtype)
    if onehot_moving.requires_grad:
        return nonlocal_label_warp_unfold(probabilities, onehot_moving[moving_index])
    parts, order = [], []
    for m in torch.unique(moving_index).tolist():
        pairs = torch.nonzero(moving_index == m)[:, 0]  # [c]: the pairs that use moving map m
        parts.append(_SharedMovingWarp.apply(probabilities[pairs].contiguous(), onehot_moving[m].contiguous(), D))
        order.append(pairs)
    warped = torch.cat(parts)  # [B, L, h, w], pairs in the order of `order`
    order = torch.cat(order)
    if bool((order == torch.arange(B, device=order.device)).all()):
        return warped
    return warped[torch.argsort(order)]


# =========================================================================== the loss


def nonlocal_label_loss(probabilities: torch.Tensor, onehot_fixed: torch.Tensor,
                        onehot_moving: torch.Tensor, reduction: str = "mean",
                        moving_index: torch.Tensor | None = None) -> torch.Tensor:
    """The weakly supervised loss of 2019: warp the moving labels non-locally, compare.

    Args:
        probabilities: [B, D*D, h, w] (each pixel's D*D values sum to 1).
        onehot_fixed, onehot_moving: [B, L, h, w], labels at feature resolution
            (:func:`label_onehot`), background included.
        reduction: "mean" (a scalar: mean over pairs and pixels) or "none" ([B], per pair).
        moving_index: see :func:`nonlocal_label_warp` (onehot_moving is then [N, L, h, w]).

    Returns:
        ``mean_{b, y, x} sum_l (warped[b, l, y, x] - onehot_fixed[b, l, y, x])**2``.
    """
    if onehot_fixed.shape[1:] != onehot_moving.shape[1:] or (
            moving_index is None and onehot_fixed.shape != onehot_moving.shape):
        raise ValueError(f"onehot_fixed {tuple(onehot_fixed.shape)} and onehot_moving "
                         f"{tuple(onehot_moving.shape)} must have the same shape [B, L, h, w]")
    warped = nonlocal_label_warp(probabilities, onehot_moving, moving_index)  # [B, L, h, w]
    per_pixel = ((warped - onehot_fixed) ** 2).sum(1)  # [B, h, w]
    if reduction == "none":
        return per_pixel.flatten(1).mean(1)
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return per_pixel.mean()


def nonlocal_label_loss_reference(probabilities: torch.Tensor, labels_fixed: torch.Tensor,
                                  labels_moving: torch.Tensor, num_labels: int) -> torch.Tensor:
    """The loss from integer labels at image resolution (what the exercise asks for).

    Args:
        probabilities: [B, D*D, h, w]. labels_fixed, labels_moving: int [B, H, W], H = s*h.
        num_labels: L, background included.

    Returns:
        a scalar: :func:`nonlocal_label_loss` of the one-hot labels average-pooled to h x w.
    """
    h, w = probabilities.shape[-2:]
    H, W = labels_fixed.shape[-2:]
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"labels {H}x{W} are not an integer multiple of the probabilities' {h}x{w}")
    stride = H // h
    onehot_fixed = label_onehot(labels_fixed, num_labels, stride, probabilities.dtype)
    onehot_moving = label_onehot(labels_moving, num_labels, stride, probabilities.dtype)
    return nonlocal_label_loss(probabilities, onehot_fixed, onehot_moving)


def diffusion_penalty(displacement: torch.Tensor) -> torch.Tensor:
    """Mean squared finite difference of a displacement field [B, 2, h, w] (a scalar).

    ``mean (u(y+1, x) - u(y, x))**2 + mean (u(y, x+1) - u(y, x))**2`` over both channels:
    zero for a constant field, large for a rough one.
    """
    if displacement.dim() != 4 or displacement.shape[1] != 2:
        raise ValueError(f"displacement must be [B, 2, h, w], got {tuple(displacement.shape)}")
    dy = displacement[:, :, 1:] - displacement[:, :, :-1]
    dx = displacement[:, :, :, 1:] - displacement[:, :, :, :-1]
    return (dy**2).mean() + (dx**2).mean()


# =========================================================================== fast regularisation
#
# The same values as regularisation.regularise, computed without blowing the D x D grid up
# to (D + 2p) x (D + 2p) and without autograd through sliding-window views (which is what
# makes training through the reference slow on the CPU):
# * everything after the min-pooling is linear and separable, so replication padding plus
#   repeated mean-pooling along one axis is one small matrix A [n, n] (built once by pushing
#   the identity through the same pads and pools) and ``pool(x) = A_rows @ x @ A_cols^T``;
# * padding by p and min-pooling by k equals padding by (k-1)/2, min-pooling, and padding
#   the result by p - (k-1)/2, so the min-pool runs on the D x D grid itself and the rest
#   of the padding folds into A.


_MATRICES: dict = {}


def _pool_matrix(size: int, kernel: int, passes: int, pad: int, device, dtype) -> torch.Tensor:
    """A [size, size] with ``A @ x`` = ``passes`` mean-pools (``kernel``, stride 1) of ``x``
    replication-padded by ``pad`` along its first axis (pad = passes * (kernel - 1) / 2)."""
    key = (size, kernel, passes, pad, str(device), dtype)
    if key not in _MATRICES:
        basis = torch.eye(size, dtype=torch.float64)[:, None, :]  # [size, 1, size]: one column each
        basis = F.pad(basis, (pad, pad), mode="replicate") if pad else basis
        for _ in range(passes):
            basis = F.avg_pool1d(basis, kernel, stride=1)
        _MATRICES[key] = basis[:, 0, :].T.contiguous().to(device=device, dtype=dtype)  # [out, in]
    return _MATRICES[key]


class _WindowMin3(torch.autograd.Function):
    """Min over each element and its two neighbours along ``dim`` (replication padding: at
    the ends the window just has two elements). The gradient of every output goes to the
    minimum of its window: the centre if it is one, else the lower neighbour, else the upper."""

    @staticmethod
    def forward(ctx, x, dim):
        n = x.shape[dim]
        out = x.clone()
        if n > 1:
            upper, lower = out.narrow(dim, 1, n - 1), out.narrow(dim, 0, n - 1)
            torch.minimum(upper, x.narrow(dim, 0, n - 1), out=upper)  # with the neighbour below
            torch.minimum(lower, x.narrow(dim, 1, n - 1), out=lower)  # with the neighbour above
        ctx.save_for_backward(x, out)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, out = ctx.saved_tensors
        dim, n = ctx.dim, x.shape[ctx.dim]
        centre = x == out
        grad = grad_out * centre
        if n == 1:
            return grad, None
        rest = grad_out - grad  # not yet routed
        below = (x.narrow(dim, 0, n - 1) == out.narrow(dim, 1, n - 1)) & ~centre.narrow(dim, 1, n - 1)
        to_below = rest.narrow(dim, 1, n - 1) * below
        grad.narrow(dim, 0, n - 1).add_(to_below)
        rest.narrow(dim, 1, n - 1).sub_(to_below)
        grad.narrow(dim, 1, n - 1).add_(rest.narrow(dim, 0, n - 1))  # what is left: the neighbour above
        return grad, None


def _window_min(grid: torch.Tensor, dim: int) -> torch.Tensor:
    """Min-pooling by 3 (replication padded, size kept) along dim 1 or 2 of [B, n, n, m]."""
    return _WindowMin3.apply(grid, dim)


def _along(matrix: torch.Tensor, grid: torch.Tensor, dim: int) -> torch.Tensor:
    """Apply ``matrix`` [n, n] along dim 1 or 2 of ``grid`` [B, a, b, m] (that dim has size n)."""
    B, a, b, m = grid.shape
    if dim == 1:
        return torch.matmul(matrix, grid.reshape(B, a, b * m)).reshape(B, a, b, m)
    return torch.matmul(matrix, grid.reshape(B * a, b, m)).reshape(B, a, b, m)


def _min_convolution_matrices(D: int, avg_kernel: int, device, dtype):
    """(A_mid [D, D], first [D], last [D]): two mean-pools of the sequence
    ``[x_0]*q + y + [x_D-1]*q`` (q = avg_kernel - 1) are ``A_mid @ y + first * x_0 + last * x_D-1``."""
    key = ("minconv", D, avg_kernel, str(device), dtype)
    if key not in _MATRICES:
        q = avg_kernel - 1
        full = _pool_matrix(D + 2 * q, avg_kernel, 2, 0, "cpu", torch.float64)  # [D, D+2q], valid pools
        _MATRICES[key] = tuple(t.contiguous().to(device=device, dtype=dtype)
                               for t in (full[:, q:q + D], full[:, :q].sum(1), full[:, q + D:].sum(1)))
    return _MATRICES[key]


def _min_convolution_fast(cost: torch.Tensor, D: int, min_kernel: int, avg_kernel: int) -> torch.Tensor:
    """Exactly ``regularisation.min_convolution(cost, D, min_kernel, avg_kernel)``, for min_kernel 1 or 3.

    Along one axis, padding by p = 1 + q (q = avg_kernel - 1) and min-pooling by 3 give
    ``[x_0]*q + minpool(x) + [x_D-1]*q`` (the windows beyond the edge see only the edge
    value), so the axis becomes ``A_mid @ minpool(x) + first * x_0 + last * x_D-1``. In the
    reference's order (min over dy, min over dx, then the linear pools over both) this is::

        inner = A_mid @_dx minpool_dx(minpool_dy(x)) + first_dx * rows[.., 0] + last_dx * rows[.., D-1]
        out   = A_mid @_dy inner + first_dy * edge(x[0, :]) + last_dy * edge(x[D-1, :])

    with ``rows = minpool_dy(x)`` and ``edge(v) = A_mid @ minpool(v) + first * v_0 + last * v_D-1``:
    two small matrix products on the whole grid, the rest on its first and last rows only.
    """
    B, K, h, w = cost.shape
    x = cost.reshape(B, D, D, h * w)  # [B, dy, dx, hw]
    if min_kernel == 1:
        A = _pool_matrix(D, avg_kernel, 2, avg_kernel - 1, cost.device, cost.dtype)
        return _along(A, _along(A, x, 2), 1).reshape(B, K, h, w)
    mid, first, last = _min_convolution_matrices(D, avg_kernel, cost.device, cost.dtype)
    rows = _window_min(x, 1)  # min over dy: [B, D, D, hw]
    inner = _along(mid, _window_min(rows, 2), 2)  # then over dx, pooled over dx
    inner = inner + first.view(1, 1, D, 1) * rows[:, :, :1] + last.view(1, 1, D, 1) * rows[:, :, -1:]
    ends = x[:, [0, D - 1]]  # [B, 2, D, hw]: the dy rows that the padding replicates
    ends = (_along(mid, _window_min(ends, 2), 2) + first.view(1, 1, D, 1) * ends[:, :, :1]
            + last.view(1, 1, D, 1) * ends[:, :, -1:])
    out = _along(mid, inner, 1) + first.view(1, D, 1, 1) * ends[:, :1] + last.view(1, D, 1, 1) * ends[:, 1:]
    return out.reshape(B, K, h, w)


def _mean_field_fast(cost: torch.Tensor, kernel: int, passes: int) -> torch.Tensor:
    B, K, h, w = cost.shape
    pad = passes * (kernel - 1) // 2
    A_h = _pool_matrix(h, kernel, passes, pad, cost.device, cost.dtype)  # [h, h]
    A_w = _pool_matrix(w, kernel, passes, pad, cost.device, cost.dtype)  # [w, w]
    out = torch.matmul(cost.reshape(B * K, h, w), A_w.T)  # along x
    return torch.matmul(A_h, out).reshape(B, K, h, w)  # along y


_odd = check_odd  # the old name, still used by the 2019 loop's checks


def _check_reg(min_kernel: int, avg_kernel: int, meanfield_kernel: int, meanfield_iterations: int,
               meanfield_passes: int) -> tuple[int, int, int, int, int]:
    """The regularisation's kernels (odd integers >= 1) and repetitions (integers >= 0), as ints."""
    return (check_odd("min_kernel", min_kernel), check_odd("avg_kernel", avg_kernel),
            check_odd("meanfield_kernel", meanfield_kernel),
            check_int("meanfield_iterations", meanfield_iterations, minimum=0),
            check_int("meanfield_passes", meanfield_passes, minimum=0))


def regularise_fast(cost: torch.Tensor, disp_range: int, min_kernel: int = 3, avg_kernel: int = 5,
                    meanfield_kernel: int = 5, meanfield_iterations: int = 1,
                    meanfield_passes: int = 3) -> torch.Tensor:
    """:func:`~tutorial_utils.regularisation.regularise` with the same values, faster to train through.

    Min-convolution over the displacements (min-pool ``min_kernel``, two mean-pools
    ``avg_kernel``, replication padding) and mean field over space (``meanfield_passes``
    mean-pools of ``meanfield_kernel``), ``meanfield_iterations`` times, exactly as there;
    only the implementation differs (the linear pools as small matrix products, no padded
    (D + 2p) x (D + 2p) grid, no autograd through sliding-window views; at ties of the
    min-pool the gradient goes to one minimum instead of being split).

    Args:
        cost: [B, D*D, h, w] float. disp_range: D.

    Returns:
        [B, D*D, h, w].
    """
    D = check_odd("disp_range", disp_range)
    if not isinstance(cost, torch.Tensor) or cost.dim() != 4 or cost.shape[1] != D * D:
        raise ValueError(f"cost must be [B, D*D={D * D}, h, w], got {getattr(cost, 'shape', cost)}")
    min_kernel, avg_kernel, meanfield_kernel, meanfield_iterations, meanfield_passes = _check_reg(
        min_kernel, avg_kernel, meanfield_kernel, meanfield_iterations, meanfield_passes)
    belief = cost.contiguous()
    for _ in range(meanfield_iterations):  # each round applies both again, as the reference does
        if min_kernel in (1, 3):
            belief = _min_convolution_fast(belief.contiguous(), D, min_kernel, avg_kernel)
        else:
            belief = min_convolution(belief, D, min_kernel, avg_kernel)
        belief = _mean_field_fast(belief, meanfield_kernel, meanfield_passes)
    return belief


# =========================================================================== training

DEFAULT_PAIRS = 3000
"""Training pairs of the default run (:func:`train_features`)."""

DEFAULTS: dict = {
    "num_pairs": DEFAULT_PAIRS,
    "disp_range": 9,
    "lr": 4e-3,
    "images_per_step": 4,
    "diffusion_weight": 0.0,
    "label_weights": None,
}
"""The defaults of :func:`train_features` (and of ``python -m tutorial_utils.train``). The
regularisation, ``alpha``, the border handling and the pre-alignment are not listed: they are
those of :func:`~tutorial_utils.registration.register_images` (:func:`pipeline_defaults`), so
that the trained CNN fits the pipeline it will be used in."""

REG_KEYS = ("min_kernel", "avg_kernel", "meanfield_kernel", "meanfield_iterations", "meanfield_passes")


def pipeline_defaults() -> dict:
    """The fixed parts of :func:`~tutorial_utils.registration.register_images`, read from it:
    ``{"alpha", "border", "prealign", "reg": {min_kernel, ...}}``."""
    import inspect

    from .registration import DEFAULTS as REGISTRATION
    from .registration import register_images

    border = inspect.signature(register_images).parameters["border"].default
    return {"alpha": REGISTRATION["alpha"], "border": border, "prealign": REGISTRATION["prealign"],
            "reg": {key: REGISTRATION[key] for key in REG_KEYS}}


_DENORMALS = """softmax(-alpha * cost) puts values around 1e-40 on unlikely displacements: denormal
floats, which the CPU multiplies up to a hundred times slower than normal ones. Training on the
CPU therefore flushes denormals to zero (``torch.set_flush_denormal``) while it runs; this
changes nothing measurable (they are below 1.2e-38) and is switched off again afterwards."""


@contextmanager
def _cpu_settings(device: torch.device, threads: int | None):
    """While training on the CPU: flush denormals (see ``_DENORMALS``) and use ``threads``
    threads (default 1, see ``_THREADS``); both are restored afterwards."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    flushing = torch.set_flush_denormal(True)
    torch.set_num_threads(threads if threads is not None else 1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        if flushing:
            torch.set_flush_denormal(False)


_THREADS = """Training on the CPU uses one thread unless told otherwise (``threads=``). The loop is
made of many operations on small tensors; with two threads, every one of them waits for the
other thread, and when anything else runs on the machine that wait can make training ten times
slower (measured on a busy 2-core machine: 2.2 pairs/s with two threads, 20.7 with one). Pass
``threads=torch.get_num_threads()`` to use them all on an idle machine."""


class LossHistory(list):
    """The training loss, one float per optimisation step, with what the run measured.

    Attributes: ``pairs_per_step``, ``pairs`` (in all), ``seconds`` (wall time of the loop),
    ``pairs_per_second``, ``settings`` (the arguments of the run).
    """

    pairs_per_step: int = 0
    pairs: int = 0
    seconds: float = 0.0
    settings: dict

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else float("nan")


def _grid_centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    """Intensity centres of mass [N, 2] (y, x) of [N, 1, H, W]; the image centre for an empty slice."""
    H, W = images.shape[-2:]
    mass = images[:, 0].clamp_min(0)
    total = mass.sum(dim=(1, 2))
    ys = torch.arange(H, device=images.device, dtype=images.dtype)
    xs = torch.arange(W, device=images.device, dtype=images.dtype)
    centre = torch.stack([(mass.sum(2) * ys).sum(1) / total.clamp_min(1e-8),
                          (mass.sum(1) * xs).sum(1) / total.clamp_min(1e-8)], dim=1)
    middle = torch.tensor([(H - 1) / 2, (W - 1) / 2], device=images.device, dtype=images.dtype)
    return torch.where((total > 1e-8)[:, None], centre, middle)


TRAINING_PREALIGN = {None: "none", "none": "none", "com": "com", "moments": "moments", "affine": "moments"}
"""How the training slices are aligned for each ``prealign`` of register_images (see
:func:`_prepare_training_data`): a pairwise affine refinement cannot be done once per slice,
so "affine" trains on slices aligned by their moments."""


def _check_dataset(dataset: object) -> None:
    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset must be a tutorial_utils.data.Dataset, got {type(dataset).__name__}")


def _training_ids(dataset: Dataset, train_ids: Sequence[int] | None) -> list[int]:
    """The slices to train on (default ``dataset.train_ids``): at least 2 indices in 0..N-1 whose
    images are finite (a NaN pixel would make every weight NaN after one step)."""
    ids = list(dataset.train_ids if train_ids is None else _slice_ids("train_ids", train_ids))
    if len(ids) < 2:
        raise ValueError(f"training needs at least 2 training slices, the dataset has {len(ids)}")
    bad = [i for i in ids if not 0 <= i < len(dataset)]
    if bad:
        raise ValueError(f"train_ids must be slice indices in 0..{len(dataset) - 1}, got {bad}")
    check_finite("the training images (dataset.images[train_ids])", dataset.images[ids])
    return ids


def _check_training(seed: int, images_per_step: int, lr: float, diffusion_weight: float,
                    threads: int | None) -> tuple[int, int, float, float, int | None]:
    """The hyper-parameters both trainers share: (seed, images_per_step, lr, diffusion_weight, threads)."""
    return (check_int("seed", seed), check_int("images_per_step", images_per_step, minimum=2),
            check_number("lr", lr, 0, strict_minimum=True), check_number("diffusion_weight", diffusion_weight, 0),
            None if threads is None else check_int("threads", threads, minimum=1))


def _prepare_training_data(dataset: Dataset, ids: Sequence[int], prealign: str | None, device: torch.device,
                           stride: int = FEATURE_STRIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 1, H, W] and one-hot labels at feature resolution [N, L, h, w] of ``ids``.

    The pre-alignment of :func:`~tutorial_utils.registration.register_images` is pairwise;
    here every slice is aligned once, so that one CNN pass serves all the pairs it is in:
    ``"com"`` translates each slice (and its labels) so that its intensity centre of mass
    lies at the image centre; ``"moments"`` (also used for "affine") maps each slice onto the
    first one by its centre of mass and principal axes (rotation, isotropic scale,
    translation). Any two slices are then aligned with each other as the pairwise
    pre-alignment would align them (up to the affine refinement).
    """
    from .registration import moments_affine
    from .transform import affine_displacement, translation_displacement, warp

    if prealign not in TRAINING_PREALIGN:
        raise ValueError(f"prealign must be one of {sorted(k for k in TRAINING_PREALIGN if k)} or None, "
                         f"got {prealign!r}")
    mode = TRAINING_PREALIGN[prealign]
    index = torch.as_tensor(list(ids), dtype=torch.long)
    images = dataset.images[index].to(device)  # [N, 1, H, W]
    onehot = F.one_hot(dataset.labels[index].to(device), dataset.num_labels).permute(0, 3, 1, 2).float()
    H, W = images.shape[-2:]
    field = None
    if mode == "com":
        centre = torch.tensor([(H - 1) / 2, (W - 1) / 2], device=device)
        shift = _grid_centre_of_mass(images) - centre  # [N, 2]: look this far away to centre
        field = translation_displacement(shift, (H, W))  # [N, 2, H, W]
    elif mode == "moments":
        reference = images[:1].expand_as(images)
        field = affine_displacement(moments_affine(reference, images), (H, W))  # [N, 2, H, W]
    if field is not None:
        images = warp(images, field)
        onehot = warp(onehot, field)  # border padding: the edge labels continue outward
    return images, F.avg_pool2d(onehot, stride)  # [N, 1, H, W], [N, L, h, w]


def _label_weights(label_weights, onehot: torch.Tensor) -> torch.Tensor | None:
    """None (every label counts alike, the 2019 loss), "balanced" (each label weighted by the
    inverse of its area in the training slices, normalised so that sum_l w_l * area_l = 1;
    labels absent from training get 0) or explicit weights [L]."""
    if label_weights is None:
        return None
    L = onehot.shape[1]
    if isinstance(label_weights, str):
        if label_weights != "balanced":
            raise ValueError(f"label_weights must be None, 'balanced' or a tensor [L], got {label_weights!r}")
        area = onehot.mean(dim=(0, 2, 3))  # [L], fractions summing to 1
        present = area > 0
        weights = torch.where(present, 1.0 / area.clamp_min(1e-12), torch.zeros_like(area))
        return weights / (weights * area).sum()
    weights = torch.as_tensor(label_weights, dtype=onehot.dtype, device=onehot.device)
    if weights.shape != (L,):
        raise ValueError(f"label_weights must have one weight per label, [{L}], got {tuple(weights.shape)}")
    check_finite("label_weights", weights)
    if bool((weights < 0).any()):
        raise ValueError(f"label_weights must be >= 0, got {weights.tolist()}")
    return weights


def _pairs_loss(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, onehot_fixed: torch.Tensor,
                onehot_moving: torch.Tensor, disp_range: int, alpha: float, diffusion_weight: float,
                label_weights: torch.Tensor | None, reg: dict, border: str = "replicate") -> torch.Tensor:
    """Summed loss of c pairs that share one moving image: [c, C, h, w], [1, C, h, w], [c, L, h, w], [L, h, w].

    The cost volume and its regularisation are those of register_images (``border``, ``reg``)."""
    from .registration import cost_volume

    c = feat_fixed.shape[0]
    cost = cost_volume(feat_fixed, feat_moving.expand(c, -1, -1, -1), disp_range, True, border)  # [c, D*D, h, w]
    cost = regularise_fast(cost, disp_range, **reg)
    probabilities = torch.softmax(-alpha * cost, dim=1)  # [c, D*D, h, w]
    warped = _SharedMovingWarp.apply(probabilities, onehot_moving, disp_range)  # [c, L, h, w]
    squared = (warped - onehot_fixed) ** 2  # [c, L, h, w]
    if label_weights is not None:
        squared = squared * label_weights.view(1, -1, 1, 1)
    loss = squared.sum(1).mean((1, 2)).sum()
    if diffusion_weight:
        offsets = displacement_offsets(disp_range, cost.device, cost.dtype)  # [D*D, 2]
        displacement = torch.einsum("pkyx,kc->pcyx", probabilities, offsets)  # [c, 2, h, w]
        loss = loss + c * diffusion_weight * diffusion_penalty(displacement)
    return loss


class _GroupLoss(torch.autograd.Function):
    """Mean loss over all ordered pairs of n feature maps; the gradient is computed chunk by chunk
    inside the forward pass (each chunk's cost volumes are built, differentiated and dropped while
    they are still in the CPU cache) and handed out in the backward pass."""

    @staticmethod
    def forward(ctx, features, onehot, settings):
        disp_range, alpha, diffusion_weight, label_weights, reg, border, chunk_pairs, need_grad = settings
        n = features.shape[0]
        grad = torch.zeros_like(features) if need_grad else None
        total = features.new_zeros(())
        for m in range(n):
            fixed = [f for f in range(n) if f != m]
            for s in range(0, n - 1, chunk_pairs):
                index = torch.tensor(fixed[s:s + chunk_pairs], device=features.device)
                feat_fixed = features[index].detach().requires_grad_(need_grad)
                feat_moving = features[m:m + 1].detach().requires_grad_(need_grad)
                with torch.set_grad_enabled(need_grad):
                    loss = _pairs_loss(feat_fixed, feat_moving, onehot[index], onehot[m], disp_range, alpha,
                                       diffusion_weight, label_weights, reg, border)
                    if need_grad:
                        grad_fixed, grad_moving = torch.autograd.grad(loss, (feat_fixed, feat_moving))
                        grad.index_add_(0, index, grad_fixed)
                        grad[m] += grad_moving[0]
                total += loss.detach()
        scale = 1.0 / (n * (n - 1))
        if need_grad:
            ctx.save_for_backward(grad.mul_(scale))
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None


def pair_loss(model: nn.Module, images: torch.Tensor, onehot: torch.Tensor, disp_range: int = 9,
              alpha: float | None = None, diffusion_weight: float = 0.0, label_weights: torch.Tensor | None = None,
              border: str | None = None, chunk_pairs: int = 4, **reg) -> torch.Tensor:
    """The training loss of a group of n images: the CNN once, then all n(n-1) ordered pairs.

    The pairs are processed a few at a time (``chunk_pairs``, all with the same moving
    image), and when a gradient is needed each chunk is differentiated right away with
    respect to the features (``torch.autograd.grad``), so its cost volumes never have to be
    stored: a chunk's work stays in the CPU cache. ``loss.backward()`` then only carries the
    summed feature gradients through the CNN. The result is the same as differentiating the
    whole sum at once.

    Args:
        model: the feature CNN, [n, 1, H, W] -> [n, C, h, w].
        images: [n, 1, H, W]. onehot: [n, L, h, w] (:func:`label_onehot`).
        alpha, border, reg (keyword arguments of :func:`regularise_fast`): the registration
            pipeline; what is not given is taken from :func:`pipeline_defaults`.
        label_weights: [L] or None (see :func:`train_features`).

    Returns:
        a scalar: the mean over the pairs of :func:`nonlocal_label_loss` (+ ``diffusion_weight``
        times :func:`diffusion_penalty` of the expected displacement, in feature pixels).
    """
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"pair_loss needs at least 2 images, got {n}")
    defaults = pipeline_defaults()
    alpha = defaults["alpha"] if alpha is None else alpha
    border = defaults["border"] if border is None else border
    reg = {**defaults["reg"], **reg}
    features = model(images)  # [n, C, h, w]
    need_grad = torch.is_grad_enabled() and features.requires_grad
    settings = (disp_range, alpha, diffusion_weight, label_weights, reg, border, chunk_pairs, need_grad)
    return _GroupLoss.apply(features, onehot, settings)


def train_features(
    dataset: Dataset,
    num_pairs: int = DEFAULT_PAIRS,
    disp_range: int = 9,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    *,
    model: nn.Module | None = None,
    lr: float = DEFAULTS["lr"],
    images_per_step: int = DEFAULTS["images_per_step"],
    diffusion_weight: float = DEFAULTS["diffusion_weight"],
    label_weights=DEFAULTS["label_weights"],
    alpha: float | None = None,
    prealign: str | None = "default",
    border: str | None = None,
    train_ids: Sequence[int] | None = None,
    threads: int | None = None,
    **reg,
) -> tuple[nn.Module, LossHistory]:
    """Train the feature CNN with the non-local label loss on random pairs of training slices.

    Every step draws ``images_per_step`` training slices at random (``dataset.train_ids``
    only), runs the CNN once on them and uses all n(n-1) ordered pairs among them: the
    features go through the fixed correlation layer and regularisation, with the settings of
    :func:`~tutorial_utils.registration.register_images` (:func:`pipeline_defaults`, so the
    trained CNN fits that pipeline with ``features=model``), the loss is
    :func:`nonlocal_label_loss`. Adam with a cosine
    learning-rate decay; BatchNorm uses the statistics of each step's slices and the model
    is returned in ``eval()`` mode (running statistics). Deterministic on the CPU for a given
    ``seed``; the global random state is left untouched.

    Args:
        dataset: any :class:`~tutorial_utils.data.Dataset` (any number of labels, any size
            divisible by 4, pre-aligned or not).
        num_pairs: training pairs in all (rounded up to whole steps).
        disp_range: D, as in registration.
        seed: seeds the initial weights and the choice of slices.
        device: "cpu" / "cuda"; default CUDA when present, else the CPU.
        progress: show a tqdm progress bar with the running loss.
        model: a model to go on training (default: a fresh :class:`FeatureCNN`).
        lr: Adam's initial learning rate (cosine decay to 5% of it).
        images_per_step: slices per step (n; at most the number of training slices).
        diffusion_weight: weight of :func:`diffusion_penalty` (0: off, the 2019 loss).
        label_weights: None (the 2019 loss: all labels alike), "balanced" (inverse area in
            the training slices) or weights [L].
        alpha, border, reg (keyword arguments of :func:`regularise_fast`): the registration
            pipeline; default: that of register_images.
        prealign: how the training slices are aligned, once per slice ("none", "com",
            "moments"; "affine" means "moments"); default: register_images' pre-alignment.
        train_ids: slices to train on (default ``dataset.train_ids``).
        threads: CPU threads while training (default 1: robust on busy and small machines,
            see ``_THREADS``; restored afterwards). Denormals are flushed meanwhile (``_DENORMALS``).

    Returns:
        ``(model, history)``: the trained model (on ``device``, in eval mode) and a
        :class:`LossHistory` (one loss per step, plus timing).
    """
    from tqdm.auto import tqdm

    _check_dataset(dataset)
    D = check_odd("disp_range", disp_range)
    num_pairs = check_int("num_pairs", num_pairs, minimum=1)
    ids = _training_ids(dataset, train_ids)
    seed, images_per_step, lr, diffusion_weight, threads = _check_training(
        seed, images_per_step, lr, diffusion_weight, threads)
    defaults = pipeline_defaults()
    alpha = check_number("alpha", defaults["alpha"] if alpha is None else alpha, 0, strict_minimum=True)
    border = check_choice("border", defaults["border"] if border is None else border, ("replicate", "zeros"))
    prealign = defaults["prealign"] if prealign == "default" else prealign
    check_choice("prealign", prealign, tuple(TRAINING_PREALIGN))
    unknown = sorted(set(reg) - set(REG_KEYS))
    if unknown:
        raise TypeError(f"train_features() got unexpected keyword arguments {unknown}")
    reg = {**defaults["reg"], **reg}
    _check_reg(*(reg[key] for key in ("min_kernel", "avg_kernel", "meanfield_kernel", "meanfield_iterations",
                                      "meanfield_passes")))
    device = choose_device(str(device)) if device is not None else choose_device()
    n = min(images_per_step, len(ids))
    pairs_per_step = n * (n - 1)
    steps = -(-num_pairs // pairs_per_step)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if model is None:
            model = FeatureCNN()
        model = model.to(device)
        generator = torch.Generator().manual_seed(seed)
        images, onehot = _prepare_training_data(dataset, ids, prealign, device)
        weights = _label_weights(label_weights, onehot)
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps, eta_min=0.05 * lr)
        history = LossHistory()
        history.pairs_per_step = pairs_per_step
        history.settings = {"num_pairs": num_pairs, "disp_range": D, "seed": seed, "device": str(device), "lr": lr,
                            "images_per_step": n, "alpha": alpha, "diffusion_weight": diffusion_weight,
                            "prealign": prealign, "border": border, "label_weights": label_weights,
                            "steps": steps, "threads": threads, **reg}
        model.train()
        bar = tqdm(total=steps * pairs_per_step, unit="pairs", disable=not progress, desc="training")
        start = time.perf_counter()
        running = None
        with _cpu_settings(device, threads):
            for _ in range(steps):
                chosen = torch.randperm(len(ids), generator=generator)[:n].to(device)  # [n]
                loss = pair_loss(model, images[chosen], onehot[chosen], D, alpha, diffusion_weight, weights,
                                 border, **reg)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                value = float(loss.detach())
                history.append(value)
                running = value if running is None else 0.9 * running + 0.1 * value
                bar.update(pairs_per_step)
                bar.set_postfix(loss=f"{running:.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        history.seconds = time.perf_counter() - start
        history.pairs = steps * pairs_per_step
        bar.close()
    return model.eval(), history


# =========================================================================== evaluation


def evaluate_registration(dataset: Dataset, features="mind", pairs: Sequence[tuple[int, int]] | None = None,
                          batch_size: int = 8, register=None, **kwargs) -> dict:
    """Register every (fixed, moving) pair and measure Dice and folding.

    Args:
        dataset: the slices. features: ``None`` for no registration (identity), else what
            :func:`~tutorial_utils.registration.register_images` takes ("mind", a model, ...).
        pairs: (fixed, moving) slice indices; default ``dataset.test_pairs()``.
        register: optional callable ``(image_fixed [b, 1, H, W], image_moving [b, 1, H, W])
            -> displacement [b, 2, H, W]`` used instead of ``register_images`` (then
            ``features`` and ``kwargs`` are not used), so that any method (the U-Net of
            :mod:`~tutorial_utils.continuous`, instance optimisation, ...) is measured by
            exactly this code. It gets CPU tensors, ``batch_size`` pairs at a time, and is
            called under ``torch.no_grad()``.
        kwargs: passed to ``register_images``.

    Returns:
        ``{"pairs": [P, 2] ints, "dice": float64 [P, L] (per label value, NaN where a label
        is in neither map), "mean_dice": [P] (foreground labels present), "folding": [P]
        (fraction of pixels with det J <= 0), "seconds": wall time of everything,
        "seconds_per_pair": wall time of the registration alone (the ``register_images`` /
        ``register`` calls, not the Dice and folding) divided by P}``.
    """
    from .metrics import dice, folding_fraction
    from .registration import register_images
    from .transform import warp_labels

    if register is not None and not callable(register):
        raise ValueError(f"register must be a callable (image_fixed, image_moving) -> displacement, "
                         f"got {type(register).__name__}")
    _check_dataset(dataset)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    pairs = list(dataset.test_pairs() if pairs is None else pairs)
    if register is None and isinstance(features, nn.Module):
        features.eval()
    device = (next(features.parameters()).device if register is None and isinstance(features, nn.Module)
              else torch.device("cpu"))
    L = dataset.num_labels
    dices, foldings = [], []
    registering = 0.0
    start = time.perf_counter()
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        fixed = torch.tensor([f for f, _ in chunk])
        moving = torch.tensor([m for _, m in chunk])
        labels_moving = dataset.labels[moving]
        if register is None and features is None:
            warped = labels_moving
            foldings += [0.0] * len(chunk)
        else:
            image_fixed, image_moving = dataset.images[fixed].to(device), dataset.images[moving].to(device)
            begin = time.perf_counter()
            with torch.no_grad():
                if register is not None:
                    displacement = register(image_fixed, image_moving)
                else:
                    displacement = register_images(image_fixed, image_moving, features, **kwargs)
            registering += time.perf_counter() - begin
            expected = (len(chunk), 2, *dataset.image_size)
            if not isinstance(displacement, torch.Tensor) or tuple(displacement.shape) != expected:
                raise ValueError(f"register must return a displacement {list(expected)}, "
                                 f"got {getattr(displacement, 'shape', type(displacement).__name__)}")
            displacement = displacement.cpu()
            warped = warp_labels(labels_moving, displacement, L)
            foldings += folding_fraction(displacement).tolist()
        dices += [dice(dataset.labels[f], w, L) for f, w in zip(fixed.tolist(), warped)]
    per_label = torch.stack(dices)  # [P, L]
    foreground = per_label[:, 1:]
    mean = torch.where(torch.isfinite(foreground), foreground, torch.zeros(())).sum(1) / torch.isfinite(
        foreground).sum(1).clamp_min(1)
    return {"pairs": torch.tensor(pairs), "dice": per_label, "mean_dice": mean,
            "folding": torch.tensor(foldings, dtype=torch.float64), "seconds": time.perf_counter() - start,
            "seconds_per_pair": registering / max(len(pairs), 1)}


# =========================================================================== the 2019 loop

TRAIN_DEFAULTS_2019: dict = {
    **DEFAULTS_2019,
    "disp_range": 9,
    "label_downsampling": "bilinear",
    "num_pairs": 50,
    "lr": 2.5e-4,
    "accumulate": 4,
}
"""The complete 2019 training loop (:func:`loss_2019`, :func:`train_features_2019`).

The registration part is :data:`~tutorial_utils.registration.DEFAULTS_2019` itself (zero
padding of the unfold correlation, the raw SSD, the slides' min-convolution and mean field,
``softmax(-10 * cost)``; its ``upsample_mode`` is not used by the loss, and ``prealign`` /
``refine_range`` must stay "none" / None: the loop trains on the slices as they are), plus:

* ``disp_range=9``: D x D = 9 x 9 displacements (+-4 feature pixels);
* ``label_downsampling="bilinear"``: the one-hot labels of both images are bilinearly
  downsampled to 1/4 (``F.interpolate``, ``align_corners=False``); the moving ones are then
  unfolded over the same D x D window (zero padding) and weighted with the probabilities;
  the loss is the mean over the pixels of the squared difference summed over the labels;
* ``num_pairs=50`` random training pairs, one at a time; Adam with ``lr=2.5e-4``; the
  gradient accumulated over ``accumulate=4`` pairs.
"""

_LOOP_KEYS_2019 = ("num_pairs", "lr", "accumulate")


def _settings_2019(settings: dict | None = None, **overrides) -> dict:
    """:data:`TRAIN_DEFAULTS_2019`, updated by ``settings`` and then by the ``overrides`` that are not None."""
    resolved = dict(TRAIN_DEFAULTS_2019)
    if settings is not None:
        unknown = sorted(set(settings) - set(TRAIN_DEFAULTS_2019))
        if unknown:
            raise ValueError(f"unknown settings of the 2019 loop: {unknown}; known: {sorted(TRAIN_DEFAULTS_2019)}")
        resolved.update(settings)
    resolved.update({key: value for key, value in overrides.items() if value is not None})
    D = _odd("disp_range", resolved["disp_range"])
    for name in ("min_kernel", "avg_kernel", "meanfield_kernel"):
        _odd(name, resolved[name])
    for name in ("meanfield_iterations", "meanfield_passes"):
        if isinstance(resolved[name], bool) or not isinstance(resolved[name], int) or resolved[name] < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {resolved[name]!r}")
    if not resolved["alpha"] > 0:
        raise ValueError(f"alpha must be > 0, got {resolved['alpha']!r}")
    choices = {"min_order": ("first", "last"), "border": ("zeros", "replicate"),
               "label_downsampling": ("bilinear", "area")}
    for name, allowed in choices.items():
        if resolved[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {resolved[name]!r}")
    if resolved["prealign"] not in (None, "none") or resolved["refine_range"] is not None:
        raise ValueError("the 2019 loop trains on the slices as they are: prealign must be 'none' and "
                         f"refine_range None, got {resolved['prealign']!r} and {resolved['refine_range']!r}")
    resolved["disp_range"] = D
    return resolved


def _regularise_2019(ssd: torch.Tensor, disp_range: int, settings: dict | None = None) -> torch.Tensor:
    """The 2019 regulariser as on the slides (pooling modules, [1, D*D, h, w] only).

    With the kernels of ``settings`` (default :data:`TRAIN_DEFAULTS_2019`: ``minconv =
    Sequential(ReplicationPad2d(5), AvgPool2d(5), AvgPool2d(5), MaxPool2d(3))`` applied as
    ``-minconv(-cost)`` over the D x D displacements, then ``meanfield =
    Sequential(ReplicationPad2d(6), AvgPool2d(5) x 3)`` over the pixels)."""
    s = TRAIN_DEFAULTS_2019 if settings is None else settings
    D = disp_range
    _, _, h, w = ssd.shape
    min_kernel, avg_kernel, passes, kernel = (s["min_kernel"], s["avg_kernel"], s["meanfield_passes"],
                                              s["meanfield_kernel"])
    pad1 = nn.ReplicationPad2d(((min_kernel - 1) + 2 * (avg_kernel - 1)) // 2)
    pad2 = nn.ReplicationPad2d(passes * (kernel - 1) // 2)
    avg1, max1 = nn.AvgPool2d(avg_kernel, stride=1), nn.MaxPool2d(min_kernel, stride=1)
    pools = [avg1, avg1, max1] if s["min_order"] == "last" else [max1, avg1, avg1]
    minconv = nn.Sequential(pad1, *pools)
    meanfield = nn.Sequential(pad2, *[nn.AvgPool2d(kernel, stride=1)] * passes)
    cost = ssd
    for _ in range(s["meanfield_iterations"]):
        ssd_minconv = -minconv(-cost.permute(0, 2, 3, 1).reshape(1, -1, D, D))  # [1, h*w, D, D]
        cost = meanfield(ssd_minconv.permute(0, 2, 3, 1).reshape(1, -1, h, w))  # [1, D*D, h, w]
    return cost


def loss_2019(model: nn.Module, image_fixed: torch.Tensor, image_moving: torch.Tensor, labels_fixed: torch.Tensor,
              labels_moving: torch.Tensor, num_labels: int, disp_range: int | None = None,
              alpha: float | None = None, *, settings: dict | None = None) -> torch.Tensor:
    """One pair's loss as the 2019 notebook computed it (for comparison and the benchmark).

    The CNN once per image (batch 1), the unfold correlation layer (zero padding), the raw
    SSD, the slides' regulariser, ``softmax(-alpha * cost)``, one-hot labels downsampled
    bilinearly to 1/4, the moving ones unfolded over the D x D window (zero padding), the
    squared difference summed over the labels and averaged over the pixels. Images
    [1, 1, H, W], labels [1, H, W].

    Every setting comes from :data:`TRAIN_DEFAULTS_2019` (which holds
    :data:`~tutorial_utils.registration.DEFAULTS_2019`), updated by ``settings`` (a dict
    with some of its keys) and then by ``disp_range`` / ``alpha`` when they are given.
    """
    s = _settings_2019(settings, disp_range=disp_range, alpha=alpha)
    D = s["disp_range"]
    r = (D - 1) // 2
    feat_fixed = model(image_fixed)  # [1, C, h, w]
    feat_moving = model(image_moving)
    h, w = feat_fixed.shape[-2:]
    if s["border"] == "zeros":  # the layer's own zero padding, as in 2019
        ssd = correlation_unfold(feat_fixed, feat_moving, D)  # [1, D*D, h, w]
    else:  # the moving features continued with their edge values (as register_images' "replicate")
        padded = [F.pad(f, (r,) * 4, mode="replicate") for f in (feat_fixed, feat_moving)]
        ssd = correlation_unfold(*padded, D)[..., r:r + h, r:r + w]
    if s["normalise"]:
        ssd = normalise_cost(ssd)
    soft_cost = torch.softmax(-s["alpha"] * _regularise_2019(ssd, D, s), dim=1)  # [1, D*D, h, w]

    def onehot_low(labels):  # [1, H, W] -> [1, L, h, w]
        onehot = F.one_hot(labels.long(), num_labels).permute(0, 3, 1, 2).to(soft_cost.dtype)
        if s["label_downsampling"] == "area":
            return F.interpolate(onehot, size=(h, w), mode="area")
        return F.interpolate(onehot, size=(h, w), mode="bilinear", align_corners=False)

    moving_unfold = F.unfold(onehot_low(labels_moving), (D, D), padding=r)  # zero padding
    moving_unfold = moving_unfold.view(1, num_labels, D * D, h * w)
    warped = (moving_unfold * soft_cost.view(1, 1, D * D, h * w)).sum(2).view(1, num_labels, h, w)
    return ((warped - onehot_low(labels_fixed)) ** 2).sum(1).mean()


def train_features_2019(dataset: Dataset, num_pairs: int | None = None, disp_range: int | None = None, seed: int = 0,
                        device: str | torch.device | None = None, progress: bool = True, *,
                        model: nn.Module | None = None, lr: float | None = None,
                        accumulate: int | None = None, threads: int | None = None,
                        settings: dict | None = None) -> tuple[nn.Module, LossHistory]:
    """The 2019 training loop: one random training pair at a time, Adam (lr 2.5e-4), the
    gradient accumulated over ``accumulate`` (4) pairs, :func:`loss_2019`. Kept as the baseline
    of ``python -m tutorial_utils.benchmark training``. On the CPU, denormals are flushed and
    ``threads`` threads used (default 1) as in :func:`train_features`, so that a comparison
    measures the loops and not these settings.

    The settings (``num_pairs``, ``disp_range``, ``lr``, ``accumulate`` and the pipeline) are
    those of :data:`TRAIN_DEFAULTS_2019`, updated by ``settings`` and then by the arguments
    that are given (not None). Returns ``(model, history)`` with one loss per pair."""
    from tqdm.auto import tqdm

    s = _settings_2019(settings, num_pairs=num_pairs, disp_range=disp_range, lr=lr, accumulate=accumulate)
    num_pairs, lr, accumulate = (s[key] for key in _LOOP_KEYS_2019)
    for name, value in (("num_pairs", num_pairs), ("accumulate", accumulate)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    loss_settings = {key: value for key, value in s.items() if key not in _LOOP_KEYS_2019}
    device = choose_device(str(device)) if device is not None else choose_device()
    ids = list(dataset.train_ids)
    if len(ids) < 2:
        raise ValueError(f"training needs at least 2 training slices, the dataset has {len(ids)}")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = (model if model is not None else FeatureCNN()).to(device).train()
        generator = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        history = LossHistory()
        history.pairs_per_step = 1
        history.settings = {**s, "seed": seed, "device": str(device)}
        start = time.perf_counter()
        with _cpu_settings(device, threads):
            for step in tqdm(range(num_pairs), disable=not progress, desc="training (2019 loop)", unit="pairs"):
                f, m = (ids[int(i)] for i in torch.randperm(len(ids), generator=generator)[:2])
                loss = loss_2019(model, dataset.images[f:f + 1].to(device), dataset.images[m:m + 1].to(device),
                                 dataset.labels[f:f + 1].to(device), dataset.labels[m:m + 1].to(device),
                                 dataset.num_labels, settings=loss_settings)
                (loss / accumulate).backward()
                if (step + 1) % accumulate == 0 or step + 1 == num_pairs:
                    optimiser.step()
                    optimiser.zero_grad()
                history.append(float(loss.detach()))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        history.seconds = time.perf_counter() - start
        history.pairs = num_pairs
    return model.eval(), history


def train_features_settings_2019() -> dict:
    """Keyword arguments that give :func:`train_features` the 2019 settings it can take.

    ``alpha``, ``border``, ``prealign`` and the kernels of :data:`TRAIN_DEFAULTS_2019`: the
    same work per pair as :func:`train_features_2019` (the like-for-like speed comparison of
    the training benchmark). Not the same numbers: :func:`train_features` always divides the
    cost by its mean, min-pools before the average pools (``regularise_fast``) and pools the
    one-hot labels by area; :func:`train_features_2019` is the 2019 loop itself.
    """
    s = TRAIN_DEFAULTS_2019
    return {"alpha": s["alpha"], "border": s["border"], "prealign": s["prealign"], **{key: s[key] for key in REG_KEYS}}


# =========================================================================== saving and loading


def save_features(model: nn.Module, path: str | Path) -> Path:
    """Save the model's weights as a plain ``state_dict`` (tensors only, on the CPU), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_features(path: str | Path | None = None, device: str | torch.device | None = None) -> FeatureCNN:
    """A :class:`~tutorial_utils.models.FeatureCNN` with weights from a ``state_dict`` file.

    ``path`` defaults to the checkpoint shipped with the package (:data:`CHECKPOINT`, trained
    on the synthetic set, see ``checkpoints/README.md``). Loaded with ``weights_only=True`` (no code
    runs). Returns the model in ``eval()`` mode on ``device`` (default: the CPU).
    """
    return load_state_dict(FeatureCNN(), CHECKPOINT if path is None else path, device)


def load_state_dict(model: nn.Module, path: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """Load the weights of ``model`` from a ``state_dict`` file (``weights_only=True``: tensors
    only, no code runs) and return it in ``eval()`` mode on ``device`` (default: the CPU)."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state_dict of "
                         f"{type(model).__name__} weights")
    model.load_state_dict(state)
    return model.to(device if device is not None else "cpu").eval()


# =========================================================================== command line


# argparse types: a bad value gets argparse's usage line, the check's message and exit status 2
positive_int = argument_type(check_int, minimum=1)
"""An integer >= 1 on the command line (``type=positive_int``)."""
non_negative_int = argument_type(check_int, minimum=0)
"""An integer >= 0 on the command line."""
odd_int = argument_type(check_odd)
"""An odd integer >= 1 on the command line (a window such as ``--disp-range``)."""
positive_float = argument_type(check_number, float, minimum=0, strict_minimum=True)
"""A finite number > 0 on the command line."""
non_negative_float = argument_type(check_number, float, minimum=0)
"""A finite number >= 0 on the command line."""


def device_name(text: str) -> str:
    """A device on the command line ("cpu", "cuda", "cuda:1"), checked with ``choose_device``."""
    try:
        choose_device(text)
    except (RuntimeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tutorial_utils.train",
        description="Train the feature CNN with the non-local label loss and save its state_dict.")
    parser.add_argument("--pairs", type=positive_int, default=DEFAULT_PAIRS,
                        help=f"training pairs (default {DEFAULT_PAIRS})")
    parser.add_argument("--out", type=Path, required=True, help="where to write the state_dict (.pt)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the pairs (default 0)")
    parser.add_argument("--disp-range", type=odd_int, default=DEFAULTS["disp_range"], help="D, odd (default 9)")
    parser.add_argument("--lr", type=positive_float, default=DEFAULTS["lr"],
                        help=f"Adam learning rate (default {DEFAULTS['lr']})")
    parser.add_argument("--images-per-step", type=argument_type(check_int, minimum=2),
                        default=DEFAULTS["images_per_step"],
                        help=f"slices per step, all their ordered pairs are used (default {DEFAULTS['images_per_step']})")
    parser.add_argument("--diffusion-weight", type=non_negative_float, default=DEFAULTS["diffusion_weight"],
                        help="weight of the diffusion penalty (default 0)")
    parser.add_argument("--label-weights", choices=["none", "balanced"],
                        default="none" if DEFAULTS["label_weights"] is None else DEFAULTS["label_weights"],
                        help="weights of the labels in the loss (default: as in DEFAULTS)")
    add_run_arguments(parser)
    own = parser.add_argument_group("your own labelled scans (instead of the tutorial's slices)")
    own.add_argument("--scans", type=Path, default=None, metavar="FOLDER",
                     help="train on one axial slice of each NIfTI scan NAME.nii.gz in FOLDER (the slice with the "
                          "largest labelled area), with its label map NAME_seg.nii.gz beside it")
    own.add_argument("--spacing", type=positive_float, default=None, metavar="MM",
                     help="resample every scan to this in-plane voxel size first (default: as stored; give one "
                          "when the scans' voxel sizes differ)")
    own.add_argument("--test-scans", type=non_negative_int, default=0, metavar="N",
                     help="hold out the last N scans (sorted by name) for --evaluate (default 0)")
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every training command shares: device, data, threads, evaluation, progress bar."""
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--source", choices=["auto", "tcia", "synthetic"], default=None,
                        help="data: the real slices, the phantom, or auto (default: $L2R_DATA_SOURCE, else auto)")
    parser.add_argument("--data-seed", type=non_negative_int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for training (default 1) and evaluation (default: torch's)")
    parser.add_argument("--evaluate", action="store_true", help="then print the test pairs' Dice and folding")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    from .data import load_dataset

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out.is_dir():
        parser.error(f"--out must be a file to write, but {args.out} is a folder")
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # evaluation; training is told below
    if args.scans is None:
        dataset = load_dataset(source=args.source, seed=args.data_seed)
    else:
        if args.source is not None:
            parser.error("--scans and --source are two different data sets: give one of them")
        if args.evaluate and args.test_scans < 2:
            parser.error("--evaluate with --scans needs at least 2 held-out scans (--test-scans N)")
        from .scans import ScanError, dataset_from_folder
        try:
            dataset = dataset_from_folder(args.scans, num_test=args.test_scans, in_plane_spacing=args.spacing)
        except (ScanError, ValueError) as exc:
            parser.error(f"--scans: {exc}")
    print(f"data: {dataset}")
    model, history = train_features(
        dataset, num_pairs=args.pairs, disp_range=args.disp_range, seed=args.seed, device=args.device,
        progress=not args.no_progress, lr=args.lr, images_per_step=args.images_per_step,
        diffusion_weight=args.diffusion_weight, threads=args.threads,
        label_weights=None if args.label_weights == "none" else args.label_weights)
    path = save_features(model, args.out)
    print(f"trained on {history.pairs} pairs in {history.seconds:.1f} s ({history.pairs_per_second:.1f} pairs/s), "
          f"loss {history[0]:.4f} -> {sum(history[-5:]) / len(history[-5:]):.4f} (mean of the last 5 steps)")
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB)")
    if args.evaluate:
        before = evaluate_registration(dataset, None)
        after = evaluate_registration(dataset, model, disp_range=args.disp_range)
        print(f"test pairs: mean Dice {before['mean_dice'].mean():.3f} before, {after['mean_dice'].mean():.3f} "
              f"with the trained CNN; folding {100 * after['folding'].mean():.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
