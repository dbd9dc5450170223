"""Exercise 2 of notebook 02: the correlation layer for a batch of pairs (``q2``).

Imported by the notebook from :mod:`tutorial_utils.exercises.correlation` (``from
tutorial_utils.exercises.correlation import q1, q2``), which describes both exercises; the
checker compares with an independent loop over the offsets (:func:`_ssd_loop`) and names the
batch's own mistakes besides those of ``q1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import call_answer, close, worst_entry
from ._core import Exercise, Incorrect
from ._correlation_checks import (
    _variants,
    check_border,
    check_channel_order,
    layer_gradients,
    random_pair,
    shape_hint,
)

__all__ = ["CorrelationBatchExercise", "q2"]


def _ssd_loop(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, disp_range: int) -> torch.Tensor:
    """The reference of q2, one offset at a time (pad and slice, nothing like unfold): [B, D*D, H, W]."""
    H, W = feat_fixed.shape[-2:]
    r = (disp_range - 1) // 2
    padded = F.pad(feat_moving, (r, r, r, r))  # zeros outside the image
    costs = [((feat_fixed - padded[:, :, i:i + H, j:j + W]) ** 2).sum(dim=1)
             for i in range(disp_range) for j in range(disp_range)]
    return torch.stack(costs, dim=1)


def _batch_variants(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, disp_range: int):
    """The usual wrong answers of q2: yields (feedback, their output [B, D*D, H, W]) one by one."""
    D = disp_range
    B, C, H, W = feat_fixed.shape
    unfolded = F.unfold(feat_moving, (D, D), padding=(D - 1) // 2)  # [B, C*D*D, H*W], channel-major
    confused = ((unfolded.view(B, D * D, C, H * W) - feat_fixed.view(B, 1, C, H * W)) ** 2).sum(2)
    yield ("Channels and displacements confused: F.unfold gives [B, C*D*D, H*W] with the C*D*D numbers "
           "channel-major (the D*D offsets of channel 0, then those of channel 1, ...). View it as "
           "[B, C, D*D, H*W], not [B, D*D, C, H*W], and sum the squares over the channel dimension (dim 1).",
           confused.view(B, D * D, H, W))
    # the mistakes of the single-pair layer, made on every pair
    per_pair = [_variants(feat_fixed[b:b + 1], feat_moving[b:b + 1], D) for b in range(B)]
    for items in zip(*per_pair):
        yield items[0][0], torch.cat([wrong for _, wrong in items])


class CorrelationBatchExercise(Exercise):
    """The SSD correlation layer for a batch: [B, C, H, W] x2 (B > 1), D -> [B, D*D, H, W]."""

    name = "Exercise 2: a batch of pairs"
    example_call = "q2.check(my_correlation_batch)"
    success_message = ("Your layer gives every pair of the batch its own cost volume, the same as the reference, "
                       "and gradients flow through it.")
    hints = (
        """
        F.unfold works on a whole batch: for feat_moving [B, C, H, W] it returns
        [B, C*D*D, H*W], the D x D neighbours of every channel at every pixel, for every
        pair. The batch stays the batch: no transpose(0, 1) this time.
        """,
        """
        The C*D*D numbers of a pixel are channel-major: the D*D offsets of channel 0, then the
        D*D offsets of channel 1, and so on. So .view(B, C, D*D, H*W) (not B, D*D, C, H*W);
        feat_fixed.view(B, C, 1, H*W) broadcasts against it.
        """,
        """
        Square the difference, sum over dim 1 (the channels; dim 0 is the batch now)
        -> [B, D*D, H*W], then .view(B, D*D, H, W). A test of your own: cost[b] must equal
        the single-pair layer applied to feat_fixed[b:b+1], feat_moving[b:b+1].
        """,
    )
    solution_code = """
    def my_correlation_batch(feat_fixed, feat_moving, disp_range):
        B, C, H, W = feat_fixed.shape                                          # B > 1
        r = (disp_range - 1) // 2
        moving_unfold = F.unfold(feat_moving, (disp_range, disp_range), padding=r)  # [B, C*D*D, H*W]
        moving_unfold = moving_unfold.view(B, C, disp_range**2, H * W)        # channel-major
        ssd = ((feat_fixed.view(B, C, 1, H * W) - moving_unfold) ** 2).sum(1)  # [B, D*D, H*W]
        return ssd.view(B, disp_range**2, H, W)                                # [B, D*D, H, W]
    """

    # (B, C, H, W, D): B > 1 and C != B (a sum over the wrong one shows), non-square, D > H once
    cases = ((2, 3, 6, 7, 5), (3, 2, 5, 4, 3), (2, 4, 3, 8, 5))
    rtol, atol = 1e-4, 1e-5

    def _inputs(self, batch, channels, height, width, seed, requires_grad=False):
        return random_pair((batch, channels, height, width), 100 + seed, requires_grad)

    def _close(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        return close(a, b, self.rtol, self.atol)

    def _call(self, answer, feat_fixed, feat_moving, disp_range):
        def explain(exc: RuntimeError) -> str | None:
            if "is invalid for input of size" not in str(exc) and "must match the size of tensor" not in str(exc):
                return None
            return (
                f"The shapes do not fit for B = {feat_fixed.shape[0]} pairs (PyTorch: {str(exc).strip()}). The "
                f"single-pair layer's transpose(0, 1), .view(C, 1, H*W) and .sum(0) assume B = 1. Follow the shapes: F.unfold(feat_moving, ...) [B, C*D*D, H*W] -> .view(B, C, D*D, H*W); "
                f"feat_fixed.view(B, C, 1, H*W); square, sum over dim 1 (the channels) -> [B, D*D, H*W] "
                f"-> .view(B, D*D, H, W).")

        return call_answer(answer, feat_fixed, feat_moving, disp_range, explain=explain)

    def _check_shape(self, out, feat_fixed, disp_range) -> None:
        B, C, H, W = feat_fixed.shape
        D = disp_range
        expected = (B, D * D, H, W)
        got = tuple(out.shape)
        if got == expected:
            return
        what = (f"Wrong output shape: for feat_fixed, feat_moving [B, C, H, W] = {[B, C, H, W]} and "
                f"disp_range={D} the cost volume must be [B, D*D, H, W] = {list(expected)}, you returned {list(got)}.")
        raise Incorrect(what + shape_hint(got, out.numel(), (B, C, H, W), D, batch=True))

    def _diagnose_batch(self, out, feat_fixed, feat_moving, disp_range) -> None:
        """Which pair (fixed i, moving j) does each output slot b hold? Names a mixed-up batch."""
        B = feat_fixed.shape[0]
        pairs = {(i, j): _ssd_loop(feat_fixed[i:i + 1].double(), feat_moving[j:j + 1].double(), disp_range)[0]
                 for i in range(B) for j in range(B)}
        found = [next((pair for pair, cost in pairs.items() if self._close(out[b], cost)), None) for b in range(B)]
        right = [b for b in range(B) if found[b] == (b, b)]
        if None in found:
            if right:
                wrong = [b for b in range(B) if found[b] != (b, b)]
                raise Incorrect(f"Pair {right[0]} is right but pair {wrong[0]} is not: check that every step keeps "
                                f"the batch apart (.view(B, ...) with the B of the input, sums over dim 1, the "
                                f"channels, never over dim 0, the pairs).")
            return
        if all(pair == (0, 0) for pair in found):
            raise Incorrect("Batch mixed up: every pair got the cost volume of pair 0. Compute all B pairs at once "
                            "(F.unfold takes the whole batch) instead of using feat_fixed[0] / feat_moving[0] or "
                            "copying one result.")
        b = next(b for b in range(B) if found[b] != (b, b))
        i, j = found[b]
        if all(found[k][0] == k for k in range(B)):
            raise Incorrect(f"Batch mixed up: pair {b} compares feat_fixed[{b}] with feat_moving[{j}], the moving "
                            f"features of another pair. Pair b must compare feat_fixed[b] with feat_moving[b]: keep "
                            f"the batch dimension first in both (no transpose, flip or roll of one of them).")
        if all(found[k][0] == found[k][1] for k in range(B)):
            raise Incorrect(f"Batch mixed up: the pairs are in the wrong order, your cost[{b}] is the cost volume of "
                            f"pair {i}. cost[b] must belong to feat_fixed[b] and feat_moving[b].")
        raise Incorrect(f"Batch mixed up: your cost[{b}] compares feat_fixed[{i}] with feat_moving[{j}]; it must "
                        f"compare feat_fixed[{b}] with feat_moving[{b}].")

    def _diagnose_values(self, out, feat_fixed, feat_moving, disp_range) -> None:
        self._diagnose_batch(out, feat_fixed, feat_moving, disp_range)
        for message, wrong in _batch_variants(feat_fixed, feat_moving, disp_range):
            if self._close(out, wrong):
                raise Incorrect(message)
        expected = _ssd_loop(feat_fixed.double(), feat_moving.double(), disp_range)
        D, r = disp_range, (disp_range - 1) // 2
        check_border(out, expected, D)
        check_channel_order(out, expected, D)
        b, k, y, x = worst_entry(out, expected)
        raise Incorrect(
            f"Wrong values: e.g. pair {b}, channel k={k} (offset (dy, dx) = ({k // D - r}, {k % D - r})) at pixel "
            f"(y, x) = ({y}, {x}) should be {expected[b, k, y, x].item():.4f}, yours is "
            f"{out[b, k, y, x].item():.4f}. The cost is sum over c of "
            f"(fixed[b, c, y, x] - moving[b, c, y+dy, x+dx])**2.")

    def _check_gradient(self, answer, seed) -> None:
        B, C, H, W, D = self.cases[0]
        feat_fixed, feat_moving = self._inputs(B, C, H, W, seed, requires_grad=True)
        grads, grads_ref = layer_gradients(answer, _ssd_loop, feat_fixed, feat_moving, D, seed,
                                           avoid="torch.no_grad() and NumPy")
        for name, g, g_ref in zip(("feat_fixed", "feat_moving"), grads, grads_ref):
            if g is None or not self._close(g, g_ref):
                raise Incorrect(f"The gradient with respect to {name} is wrong or missing although the values are "
                                f"right: use {name} itself in torch operations (no .detach(), no in-place changes).")

    def _check(self, answer) -> None:
        for seed, (B, C, H, W, D) in enumerate(self.cases):
            feat_fixed, feat_moving = self._inputs(B, C, H, W, seed)
            out = self._call(answer, feat_fixed, feat_moving, D)
            self._check_shape(out, feat_fixed, D)
            if not self._close(out, _ssd_loop(feat_fixed.double(), feat_moving.double(), D)):
                self._diagnose_values(out, feat_fixed, feat_moving, D)
        self._check_gradient(answer, seed=len(self.cases))


q2 = CorrelationBatchExercise()
