"""The training losses: organ labels compared after a warp, and the smoothness of a displacement.

Taught in ``notebooks/04_training.ipynb`` (the non-local label loss) and
``notebooks/05_why_discrete.ipynb`` (the U-Net's label loss, the diffusion penalty). The
supervision is not a set of correspondences but the organ segmentations of both images:

1. the labels become one-hot maps, average-pooled to the resolution of the features
   (:func:`label_onehot`: [B, H, W] int -> [B, L, h, w], h = H/4, background included);
2. the *non-local label warp* (discrete network): the moving one-hot maps are looked up at
   every one of the D x D displacements and averaged with the probabilities of the
   regularised cost volume, ``warped[l, y, x] = sum_k p[k, y, x] * onehot_moving[l, y + dy_k,
   x + dx_k]`` (:func:`nonlocal_label_warp`);
3. the loss is the squared difference to the fixed one-hot maps, summed over the labels
   (optionally weighted per label) and averaged over pixels and pairs
   (:func:`nonlocal_label_loss`; :func:`label_loss` is the same comparison for a continuous
   network, whose moving maps are warped with its field);
4. optionally plus a diffusion penalty on the displacement (:func:`diffusion_penalty`), the
   same one that instance optimisation puts on its grid.

The gradient reaches a discrete network's features through the probabilities only, so the
CNN learns features whose costs put the probability mass on displacements that carry the
right label.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checks import check_finite, check_int, check_number
from .registration import FEATURE_STRIDE

__all__ = [
    "LABEL_LOSSES",
    "diffusion_penalty",
    "label_loss",
    "label_onehot",
    "nonlocal_label_loss",
    "nonlocal_label_loss_reference",
    "nonlocal_label_warp",
    "nonlocal_label_warp_unfold",
]

LABEL_LOSSES = ("mse", "dice")
"""The kinds of :func:`label_loss`."""


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


def _check_moving_index(probabilities: torch.Tensor, onehot_moving: torch.Tensor,
                        moving_index) -> tuple[int, torch.Tensor]:
    """Validate the probabilities [B, D*D, h, w], N moving maps [N, L, h, w] and ``moving_index``
    (default ``arange(B)``); return D and the index as int64 [B]."""
    B = probabilities.shape[0] if isinstance(probabilities, torch.Tensor) else 0
    if moving_index is None:
        D = _check_probabilities(probabilities, onehot_moving)
        return D, torch.arange(B, device=probabilities.device)
    if not isinstance(onehot_moving, torch.Tensor) or onehot_moving.dim() != 4 or not len(onehot_moving):
        raise ValueError(f"onehot_moving must be [N, L, h, w], got {getattr(onehot_moving, 'shape', onehot_moving)}")
    D = _check_probabilities(probabilities, onehot_moving[:1].expand(B, -1, -1, -1))
    moving_index = torch.as_tensor(moving_index, device=probabilities.device).long()
    if moving_index.shape != (B,):
        raise ValueError(f"moving_index must be [B] = [{B}], got {tuple(moving_index.shape)}")
    if B and (int(moving_index.min()) < 0 or int(moving_index.max()) >= onehot_moving.shape[0]):
        raise ValueError(f"moving_index must lie in 0..{onehot_moving.shape[0] - 1}")
    return D, moving_index


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
    D, moving_index = _check_moving_index(probabilities, onehot_moving, moving_index)
    B = probabilities.shape[0]
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


# =========================================================================== the label losses


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


def _label_weights(label_weights, onehot: torch.Tensor) -> torch.Tensor | None:
    """The weights [L] of the labels in the feature CNN's training loss (``train_features(label_weights=)``).

    ``label_weights``: None (every label counts alike, the 2019 loss), "balanced" (each label
    weighted by the inverse of its area in the training slices ``onehot`` [N, L, h, w],
    normalised so that sum_l w_l * area_l = 1; labels absent from training get 0) or explicit
    weights [L] (finite, >= 0)."""
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


def label_loss(warped: torch.Tensor, onehot_fixed: torch.Tensor, loss: str = "mse") -> torch.Tensor:
    """Per-pair label loss [B] between warped moving and fixed one-hot maps [B, L, H, W] (the U-Net's).

    * ``"dice"``: ``1 - mean_l 2 sum(w_l f_l) / (sum w_l + sum f_l)`` over the foreground labels
      (l >= 1) present in either map of the pair (the background would dominate the mean
      and says nothing about the organs; a label in neither map is skipped, so a pair with
      no organ at all has loss 0);
    * ``"mse"``: ``mean_{y, x} sum_l (w_l - f_l)**2`` over all labels, background included:
      the loss of the discrete network (:func:`nonlocal_label_loss`), at full resolution.
    """
    if warped.shape != onehot_fixed.shape or warped.dim() != 4:
        raise ValueError(f"warped {tuple(warped.shape)} and onehot_fixed {tuple(onehot_fixed.shape)} "
                         f"must both be [B, L, H, W]")
    if loss == "mse":
        return ((warped - onehot_fixed) ** 2).sum(1).flatten(1).mean(1)
    if loss != "dice":
        raise ValueError(f"loss must be one of {LABEL_LOSSES}, got {loss!r}")
    w, f = warped[:, 1:].flatten(2), onehot_fixed[:, 1:].flatten(2)  # [B, L-1, H*W]
    total = w.sum(2) + f.sum(2)  # [B, L-1]
    present = (total > 1e-6).to(warped.dtype)
    dice = 2 * (w * f).sum(2) / total.clamp_min(1e-6)
    return ((1 - dice) * present).sum(1) / present.sum(1).clamp_min(1)


# =========================================================================== smoothness


def diffusion_penalty(displacement: torch.Tensor, spacing: float = 1, reduction: str = "mean") -> torch.Tensor:
    """Mean squared finite difference of displacement fields [B, 2, h, w].

    ``mean (du/dy)**2 + mean (du/dx)**2`` over both channels, the derivatives taken as
    forward differences between neighbouring points divided by their distance ``spacing``
    (in the units of the displacement): zero for a constant field (a translation), s**2 for
    a ramp of slope s, large for a rough field. With ``spacing`` = the grid's spacing in
    pixels (instance optimisation's ``grid_stride``) the penalty is dimensionless, so a
    weight means the same at any grid spacing. A field one point high (or wide) has no
    difference along that axis: it adds 0.

    Args:
        displacement: [B, 2, h, w]. spacing: > 0.
        reduction: "mean" (a scalar: both means over all B fields together) or "none" ([B],
            one penalty per field; their mean is the "mean" value up to rounding).
    """
    if not isinstance(displacement, torch.Tensor):
        raise TypeError(f"displacement must be a tensor [B, 2, h, w], got {type(displacement).__name__}")
    if displacement.dim() != 4 or displacement.shape[1] != 2:
        raise ValueError(f"displacement must be [B, 2, h, w], got {tuple(displacement.shape)}")
    spacing = check_number("spacing", spacing, 0, strict_minimum=True)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    dy = displacement[:, :, 1:] - displacement[:, :, :-1]
    dx = displacement[:, :, :, 1:] - displacement[:, :, :, :-1]
    if spacing != 1:
        dy, dx = dy / spacing, dx / spacing
    if reduction == "mean":
        zero = displacement.new_zeros(())
        return (dy.square().mean() if dy.numel() else zero) + (dx.square().mean() if dx.numel() else zero)
    zero = displacement.new_zeros(displacement.shape[0])
    return (dy.square().flatten(1).mean(1) if dy.numel() else zero) + (
        dx.square().flatten(1).mean(1) if dx.numel() else zero)
