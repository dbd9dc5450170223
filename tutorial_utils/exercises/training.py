"""Exercise of notebook 04 (learning the features): the non-local label loss.

``q1``: write the weakly supervised loss of the 2019 tutorial::

    def my_label_loss(probabilities, labels_fixed, labels_moving, num_labels):
        ...  # [B, D*D, h, w], int [B, H, W] x2 (H = 4h), L -> a scalar

It has ``check(fn)``, ``hint(level)``, ``solution()`` and ``use(fn, fallback)``. The checker
runs the learner's function on small random inputs (several D, non-square maps, a label that
appears in only one of the maps) in float64, compares the value and its gradient with respect
to the probabilities with the reference
:func:`~tutorial_utils.losses.nonlocal_label_loss_reference`, and when they differ tries the
usual mistakes one by one (the probabilities not summed over the displacement axis, the
labels not downsampled or subsampled instead of averaged, the background dropped, the wrong
reduction, the offsets flipped or transposed, the wrong padding) and names the one that
explains the answer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..losses import nonlocal_label_loss_reference
from ._core import Exercise, Incorrect

__all__ = ["LabelLossExercise", "q1"]

STRIDE = 4
"""Feature maps (and the probabilities) are at 1/4 of the image resolution."""


def _close(a, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    if not isinstance(a, torch.Tensor):
        return False
    a = a.detach().double().reshape(b.shape) if a.numel() == b.numel() else a.detach().double()
    return a.shape == b.shape and torch.allclose(a, b.detach().double(), rtol=rtol, atol=atol)


def _onehot(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    return F.one_hot(labels, num_labels).permute(0, 3, 1, 2).double()  # [B, L, H, W]


def _warp(probabilities: torch.Tensor, onehot_moving: torch.Tensor, pad_mode: str = "constant") -> torch.Tensor:
    """sum_k p_k * onehot(y + dy_k, x + dx_k), written as a loop over the offsets: [B, L, h, w]."""
    B, K, h, w = probabilities.shape
    D = math.isqrt(K)
    r = (D - 1) // 2
    padded = F.pad(onehot_moving, (r, r, r, r), mode=pad_mode)
    warped = torch.zeros_like(onehot_moving)
    for k in range(K):
        i, j = divmod(k, D)
        warped = warped + probabilities[:, k:k + 1] * padded[:, :, i:i + h, j:j + w]
    return warped


def _loss(warped: torch.Tensor, onehot_fixed: torch.Tensor) -> torch.Tensor:
    return ((warped - onehot_fixed) ** 2).sum(1).mean()


def _variants(probabilities: torch.Tensor, labels_fixed: torch.Tensor, labels_moving: torch.Tensor,
              num_labels: int):
    """The usual wrong answers: yields (feedback, their loss) one by one."""
    p = probabilities.detach()
    B, K, h, w = p.shape
    D = math.isqrt(K)
    L = num_labels
    area_f = F.avg_pool2d(_onehot(labels_fixed, L), STRIDE)
    area_m = F.avg_pool2d(_onehot(labels_moving, L), STRIDE)
    warped = _warp(p, area_m)
    # the probabilities not (properly) summed over the displacement axis
    yield ("The probabilities are averaged, not summed, over the displacement axis: the warped labels "
           "must be sum_k p_k * onehot_moving(shifted by offset k); the probabilities already sum to 1, "
           "so do not divide by D*D (.sum(), not .mean(), over the D*D axis).", _loss(warped / K, area_f))
    unweighted = _warp(torch.ones_like(p), area_m)
    yield ("The probabilities are missing: you summed the D*D shifted label maps without weighting them. "
           "Multiply each shifted map by its probability p_k before summing over the displacement axis.",
           _loss(unweighted, area_f))
    yield ("The probabilities are not summed over the displacement axis: you weighted the shifted label "
           "maps but then averaged the loss over the D*D displacements as well. Sum over the displacement "
           "axis first (that gives the warped labels [B, L, h, w]), then compare with the fixed labels.",
           ((_warp_each(p, area_m) - area_f[:, :, None]) ** 2).sum(1).mean())
    # the labels not downsampled the right way
    sub_f = _onehot(labels_fixed[:, ::STRIDE, ::STRIDE], L)
    sub_m = _onehot(labels_moving[:, ::STRIDE, ::STRIDE], L)
    yield ("The labels are subsampled (every 4th pixel, or nearest-neighbour interpolation) instead of "
           "averaged: average-pool the one-hot maps over 4 x 4 blocks (F.avg_pool2d(one_hot, 4)) so that "
           "each value is the fraction of the block the organ covers.", _loss(_warp(p, sub_m), sub_f))
    bil_f = F.interpolate(_onehot(labels_fixed, L), size=(h, w), mode="bilinear", align_corners=False)
    bil_m = F.interpolate(_onehot(labels_moving, L), size=(h, w), mode="bilinear", align_corners=False)
    yield ("The labels are downsampled bilinearly (as the 2019 notebook did): that averages only the 2 x 2 "
           "pixels at the centre of each 4 x 4 block. This exercise asks for the block average, "
           "F.avg_pool2d(one_hot, 4) (or F.interpolate(..., mode='area')), so that every pixel counts.",
           _loss(_warp(p, bil_m), bil_f))
    mean_f = F.avg_pool2d(labels_fixed[:, None].double(), STRIDE).round().long()[:, 0]
    mean_m = F.avg_pool2d(labels_moving[:, None].double(), STRIDE).round().long()[:, 0]
    yield ("The label values are averaged before the one-hot encoding: label values are names, not "
           "numbers (the mean of 'liver' and 'spleen' is not an organ). Encode one-hot first, then "
           "average-pool the one-hot maps.", _loss(_warp(p, _onehot(mean_m.clamp(0, L - 1), L)),
                                                   _onehot(mean_f.clamp(0, L - 1), L)))
    # the background
    yield ("The background is left out: the loss sums the squared differences over all L labels, "
           "background (label 0) included, for the fixed and the warped moving labels alike.",
           _loss(warped[:, 1:], area_f[:, 1:]))
    # reductions
    yield ("The labels are averaged: sum the squared differences over the label axis (then average "
           "over pairs and pixels).", ((warped - area_f) ** 2).mean())
    yield ("The pixels are summed: average the per-pixel loss over the pairs and pixels (.mean()), "
           "so that the loss does not depend on the image size.", ((warped - area_f) ** 2).sum() / B)
    yield ("The difference is not squared: the loss is the squared difference between the warped and "
           "the fixed one-hot labels.", (warped - area_f).abs().sum(1).mean())
    yield ("The square root is taken: the loss is the mean of the summed squared differences, not a "
           "Euclidean distance.", ((warped - area_f) ** 2).sum(1).sqrt().mean())
    # roles and offsets
    yield ("Fixed and moving are swapped: warp the MOVING labels with the probabilities and compare "
           "them with the FIXED labels.", _loss(_warp(p, area_f), area_m))
    yield ("The offsets are flipped: channel k = i*D + j of the probabilities is the offset "
           "(dy, dx) = (i - r, j - r), and the warped label at (y, x) looks up the moving labels at "
           "(y + dy, x + dx). You looked at (y - dy, x - dx).", _loss(_warp(p.flip(1), area_m), area_f))
    transposed = p.view(B, D, D, h, w).transpose(1, 2).reshape(B, K, h, w)
    yield ("The offsets are transposed: channel k = i*D + j is (dy, dx) = (i - r, j - r), the row "
           "offset i is the slow index (that is also the order F.unfold uses).",
           _loss(_warp(transposed, area_m), area_f))
    for mode in ("replicate", "reflect"):
        try:
            wrong = _warp(p, area_m, mode)
        except (RuntimeError, NotImplementedError):
            continue
        yield (f"Wrong padding: outside the image the moving labels must be zero (F.unfold(..., "
               f"padding=r) pads with zeros); you used {mode} padding.", _loss(wrong, area_f))


def _warp_each(probabilities: torch.Tensor, onehot_moving: torch.Tensor) -> torch.Tensor:
    """p_k * shifted map, NOT summed over k: [B, L, K, h, w]."""
    B, K, h, w = probabilities.shape
    D = math.isqrt(K)
    r = (D - 1) // 2
    padded = F.pad(onehot_moving, (r, r, r, r))
    return torch.stack([probabilities[:, k:k + 1] * padded[:, :, k // D:k // D + h, k % D:k % D + w]
                        for k in range(K)], dim=2)


class LabelLossExercise(Exercise):
    """Write the non-local label loss: probabilities [B, D*D, h, w], labels int [B, H, W] x2, L -> scalar."""

    name = "Exercise 1: the non-local label loss"
    example_call = "q1.check(my_label_loss)"
    success_message = ("Your loss gives the same value and the same gradient as the reference. "
                       "The training below uses it.")
    hints = (
        """
        Three steps. (1) Both label maps to one-hot [B, L, H, W] (F.one_hot(labels, num_labels),
        then .permute(0, 3, 1, 2).float()) and down to the resolution of the probabilities by
        averaging 4 x 4 blocks: F.avg_pool2d(one_hot, 4) -> [B, L, h, w]. (2) Warp the moving
        one-hot maps "non-locally": for every pixel, the probability-weighted sum of the moving
        labels at all D x D offsets. (3) The squared difference to the fixed one-hot maps, summed
        over the L labels (background included), averaged over everything else.
        """,
        """
        Step (2) with F.unfold, as 2019 did: F.unfold(onehot_moving, (D, D), padding=r) is
        [B, L*D*D, h*w]; .view(B, L, D*D, h*w) puts the D*D offsets on their own axis (in the
        order of the probability channels). Multiply by probabilities.view(B, 1, D*D, h*w) and
        .sum(2): the warped labels [B, L, h*w]. D is int(sqrt(probabilities.shape[1])),
        r = (D - 1) // 2, and the stride is H // h.
        """,
        """
        Common slips: .mean() instead of .sum() over the D*D axis (the probabilities already sum
        to 1); F.one_hot(labels) without num_labels (a map that lacks the highest label then gets
        fewer channels); taking every 4th pixel instead of average-pooling; dropping the
        background channel; summing instead of averaging over the pixels. Use torch operations on
        the probabilities only (no .detach(), no NumPy) so that the gradient reaches them.
        """,
    )
    solution_code = """
    def my_label_loss(probabilities, labels_fixed, labels_moving, num_labels):
        B, K, h, w = probabilities.shape                    # K = D*D
        D = int(K ** 0.5)
        stride = labels_fixed.shape[-1] // w                 # 4
        def onehot_low(labels):                              # [B, H, W] -> [B, L, h, w]
            onehot = F.one_hot(labels, num_labels).permute(0, 3, 1, 2).to(probabilities.dtype)
            return F.avg_pool2d(onehot, stride)
        fixed = onehot_low(labels_fixed)                     # [B, L, h, w]
        moving = F.unfold(onehot_low(labels_moving), (D, D), padding=(D - 1) // 2)
        moving = moving.view(B, num_labels, K, h * w)        # [B, L, D*D, h*w]
        warped = (moving * probabilities.view(B, 1, K, h * w)).sum(2)  # [B, L, h*w]
        return ((warped.view(B, num_labels, h, w) - fixed) ** 2).sum(1).mean()
    """

    # (B, L, h, w, D): several batch sizes, labels and ranges; D larger than h in the last one
    cases = ((1, 3, 4, 5, 3), (2, 4, 3, 4, 5), (1, 5, 2, 3, 3), (2, 3, 3, 3, 7))
    rtol, atol = 1e-5, 1e-8

    def _inputs(self, batch: int, num_labels: int, h: int, w: int, disp_range: int, seed: int,
                requires_grad: bool = False):
        generator = torch.Generator().manual_seed(seed)
        logits = 3 * torch.randn(batch, disp_range**2, h, w, generator=generator, dtype=torch.float64)
        probabilities = torch.softmax(logits, dim=1).requires_grad_(requires_grad)
        H, W = STRIDE * h, STRIDE * w
        labels_fixed = torch.randint(0, num_labels, (batch, H, W), generator=generator)
        labels_moving = torch.randint(0, num_labels, (batch, H, W), generator=generator)
        # the highest label only in the fixed maps: F.one_hot(labels) without num_labels breaks
        labels_moving[labels_moving == num_labels - 1] = 0
        return probabilities, labels_fixed, labels_moving

    def _call(self, answer, probabilities, labels_fixed, labels_moving, num_labels):
        h, w = probabilities.shape[-2:]
        try:
            out = answer(probabilities, labels_fixed.clone(), labels_moving.clone(), num_labels)
        except NotImplementedError:
            raise
        except (RuntimeError, ValueError, IndexError) as exc:
            text = str(exc)
            hint = ""
            if any(s in text for s in (f"{STRIDE * h}", f"{STRIDE * w}", f"{STRIDE * STRIDE * h * w}")):
                hint = (f" The labels are [B, {STRIDE * h}, {STRIDE * w}] but the probabilities [B, D*D, {h}, {w}]: "
                        f"the labels were not downsampled. One-hot encode them and average-pool by {STRIDE} "
                        f"(F.avg_pool2d(one_hot, {STRIDE})).")
            elif str(num_labels - 1) in text or str(num_labels) in text:
                hint = (" The number of labels does not match: pass num_labels to F.one_hot (a map that lacks "
                        "the highest label would otherwise get fewer channels), and keep the background "
                        "channel in both the fixed and the moving labels.")
            raise Incorrect(f"Your function raised {type(exc).__name__}: {text.splitlines()[0] if text else ''}."
                            + hint) from None
        if not isinstance(out, torch.Tensor):
            raise Incorrect(f"Your function should return a torch.Tensor (a scalar), it returned {type(out).__name__}.")
        if out.numel() != 1:
            raise Incorrect(f"The loss must be one number (a scalar tensor), yours has shape {list(out.shape)}: "
                            f"sum over the labels, then average over pairs and pixels (.mean()).")
        return out

    def _diagnose(self, out, probabilities, labels_fixed, labels_moving, num_labels) -> None:
        for message, wrong in _variants(probabilities, labels_fixed, labels_moving, num_labels):
            if _close(out, wrong, self.rtol, self.atol):
                raise Incorrect(message)
        expected = nonlocal_label_loss_reference(probabilities.detach(), labels_fixed, labels_moving, num_labels)
        raise Incorrect(f"Wrong value: the loss should be {expected.item():.6f}, yours is {out.item():.6f}, and "
                        f"it matches none of the usual mistakes. Check the three steps of hint(1) one by one "
                        f"on a small example.")

    def _check_gradient(self, answer, case, seed) -> None:
        batch, num_labels, h, w, disp_range = case
        probabilities, labels_fixed, labels_moving = self._inputs(batch, num_labels, h, w, disp_range, seed,
                                                                  requires_grad=True)
        out = self._call(answer, probabilities, labels_fixed, labels_moving, num_labels)
        if out.grad_fn is None:
            raise Incorrect("Not differentiable: the loss has no gradient (grad_fn is None). Avoid .detach(), "
                            "torch.no_grad(), .item() and NumPy on the probabilities.")
        (grad,) = torch.autograd.grad(out.sum(), probabilities, allow_unused=True)
        reference = probabilities.detach().clone().requires_grad_(True)
        (grad_ref,) = torch.autograd.grad(
            nonlocal_label_loss_reference(reference, labels_fixed, labels_moving, num_labels), reference)
        if grad is None:
            raise Incorrect("No gradient reaches the probabilities: use them in torch operations (no .detach()).")
        if not _close(grad, grad_ref, 1e-4, 1e-9):
            raise Incorrect("The value is right but the gradient with respect to the probabilities is not: "
                            "something breaks the computation graph (an in-place change of the probabilities, "
                            "a detached copy, or a normalisation that depends on them).")

    def _check(self, answer) -> None:
        for seed, case in enumerate(self.cases):
            batch, num_labels, h, w, disp_range = case
            probabilities, labels_fixed, labels_moving = self._inputs(batch, num_labels, h, w, disp_range, seed)
            out = self._call(answer, probabilities, labels_fixed, labels_moving, num_labels)
            expected = nonlocal_label_loss_reference(probabilities, labels_fixed, labels_moving, num_labels)
            if not _close(out, expected, self.rtol, self.atol):
                self._diagnose(out, probabilities, labels_fixed, labels_moving, num_labels)
        self._check_gradient(answer, self.cases[1], seed=len(self.cases))


q1 = LabelLossExercise()
