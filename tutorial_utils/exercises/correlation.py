"""Exercises of notebook 02 (the correlation layer).

``q1``: write the correlation layer of the 2019 tutorial yourself::

    def my_correlation_layer(feat_fixed, feat_moving, disp_range):
        ...  # [1, C, H, W], [1, C, H, W], D -> cost volume [1, D*D, H, W]

    q1.check(my_correlation_layer)   # precise feedback
    q1.hint()                        # q1.hint(2), q1.hint(3) say more
    q1.solution()

``q2``: the same layer for a batch of B > 1 pairs, without the transpose trick::

    def my_correlation_batch(feat_fixed, feat_moving, disp_range):
        ...  # [B, C, H, W], [B, C, H, W], D -> cost volume [B, D*D, H, W]

The checker of ``q1`` runs the learner's function on small random tensors (non-square, so that a
swapped H and W shows) and compares it with :func:`tutorial_utils.correlation.correlation_unfold`.
When the values are wrong it tries the usual mistakes one by one (a transposed or reversed
displacement order, other padding, a missing square or a wrong sign, a mean instead of a sum)
and names the one that explains the output.

The checker of ``q2`` compares with an independent loop over the offsets (pad and slice), for
B = 2 and 3, non-square maps and D = 3 and 5. Besides the mistakes of ``q1`` it names the
batch ones: pair b compared with the moving features of another pair, the pairs in the wrong
order, the costs of pair 0 repeated, one cost volume for all pairs, and the view after
``F.unfold`` that takes the C*D*D numbers as [D*D, C] when they are [C, D*D] (channel-major).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: F401 -- the solved copy imports q1's F from here (solved.py)

from ..correlation import correlation_unfold
from ._checks import call_answer, close, worst_entry
from ._core import Exercise, Incorrect
from ._correlation_checks import _shifted_moving as _shifted_moving
from ._correlation_checks import (
    _variants,
    check_border,
    check_channel_order,
    layer_gradients,
    random_pair,
    shape_hint,
)
from .correlation_batch import CorrelationBatchExercise, q2
from .correlation_batch import _batch_variants as _batch_variants
from .correlation_batch import _ssd_loop as _ssd_loop

__all__ = ["CorrelationBatchExercise", "CorrelationLayerExercise", "q1", "q2"]
# q2 has a module of its own (correlation_batch); it, and the helpers that were here before, are
# still importable from here, where the notebook imports q1 and q2


class CorrelationLayerExercise(Exercise):
    """Write the 2019 SSD correlation layer: [1, C, H, W] x2, D -> [1, D*D, H, W]."""

    name = "Exercise 1: the correlation layer"
    example_call = "q1.check(my_correlation_layer)"
    success_message = ("Your layer gives the same cost volume as the reference, and gradients flow "
                       "through it. The cells below use it.")
    hints = (
        """
        For every offset (dy, dx) in {-r..r}^2 (r = (D-1)//2) you need moving[:, y+dy, x+dx]
        next to fixed[:, y, x]. F.unfold(x, (D, D), padding=r) collects exactly these D*D
        neighbours for every pixel (zeros outside the image). The result must be
        [1, D*D, H, W] with channel k = i*D + j holding the offset (dy, dx) = (i - r, j - r).
        """,
        """
        Follow the shapes of the 2019 layer:
        feat_moving [1, C, H, W] -> .transpose(0, 1) -> [C, 1, H, W]
        -> F.unfold(..., (D, D), padding=r) -> [C, D*D, H*W]
        feat_fixed [1, C, H, W] -> .view(C, 1, H*W) broadcasts against it;
        square the difference, sum over dim 0 (the channels), .view(1, D*D, H, W).
        """,
        """
        Unfolding a [C, 1, H, W] tensor treats the channels as the batch, so the unfolded
        moving features are [C, 1*D*D, H*W] with the D*D offsets in row-major order (dy slow,
        dx fast), exactly the channel order we want. Use torch operations only (no NumPy,
        no .detach(), no torch.no_grad()) so that gradients can flow back to both inputs.
        """,
    )
    solution_code = """
    def my_correlation_layer(feat_fixed, feat_moving, disp_range):
        B, C, H, W = feat_fixed.shape                    # B = 1
        r = (disp_range - 1) // 2
        moving_unfold = F.unfold(feat_moving.transpose(0, 1),       # [C, 1, H, W]
                                 (disp_range, disp_range), padding=r)  # [C, D*D, H*W]
        ssd = ((feat_fixed.view(C, 1, H * W) - moving_unfold) ** 2).sum(0)  # [D*D, H*W]
        return ssd.view(1, disp_range**2, H, W)          # [1, D*D, H, W]
    """

    # (C, H, W, D): non-square images, H and W not multiples of D, D larger than one side
    cases = ((3, 6, 7, 5), (2, 5, 4, 3), (4, 3, 8, 7))
    rtol, atol = 1e-4, 1e-5


    def _inputs(self, channels: int, height: int, width: int, seed: int, requires_grad: bool = False):
        return random_pair((1, channels, height, width), seed, requires_grad)

    def _close(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        return close(a, b, self.rtol, self.atol)

    def _call(self, answer, feat_fixed, feat_moving, disp_range):
        return call_answer(answer, feat_fixed, feat_moving, disp_range)

    def _check_shape(self, out: torch.Tensor, channels: int, height: int, width: int, disp_range: int) -> None:
        D = disp_range
        expected = (1, D * D, height, width)
        got = tuple(out.shape)
        if got == expected:
            return
        what = (f"Wrong output shape: for feat_fixed, feat_moving [1, {channels}, {height}, {width}] and "
                f"disp_range={D} the cost volume must be [B, D*D, H, W] = {list(expected)}, you returned {list(got)}.")
        raise Incorrect(what + shape_hint(got, out.numel(), (1, channels, height, width), D, batch=False))

    def _diagnose_values(self, out, feat_fixed, feat_moving, disp_range) -> None:
        for message, wrong in _variants(feat_fixed, feat_moving, disp_range):
            if self._close(out, wrong):
                raise Incorrect(message)
        expected = correlation_unfold(feat_fixed.double(), feat_moving.double(), disp_range)
        D, r = disp_range, (disp_range - 1) // 2
        check_border(out, expected, D)
        check_channel_order(out, expected, D)  # the right numbers in the wrong channels?
        _, k, y, x = worst_entry(out, expected)
        raise Incorrect(
            f"Wrong values: e.g. channel k={k} (offset (dy, dx) = ({k // D - r}, {k % D - r})) at pixel "
            f"(y, x) = ({y}, {x}) should be {expected[0, k, y, x].item():.4f}, yours is "
            f"{out[0, k, y, x].item():.4f}. Check for a sign or a square missing: the cost is "
            f"sum over c of (fixed[c, y, x] - moving[c, y+dy, x+dx])**2.")

    def _check_gradient(self, answer, channels, height, width, disp_range, seed) -> None:
        feat_fixed, feat_moving = self._inputs(channels, height, width, seed, requires_grad=True)
        grads, grads_ref = layer_gradients(answer, correlation_unfold, feat_fixed, feat_moving, disp_range, seed,
                                           avoid="torch.no_grad(), NumPy and building new tensors from numbers")
        for name, g, g_ref in zip(("feat_fixed", "feat_moving"), grads, grads_ref):
            if g is None:
                raise Incorrect(f"Not differentiable with respect to {name}: no gradient reaches it. "
                                f"Use {name} itself in torch operations (no .detach(), no copies through NumPy).")
            if not self._close(g, g_ref):
                raise Incorrect(f"The gradient with respect to {name} is wrong although the values are right: "
                                f"something in your function is not differentiable (e.g. an in-place change "
                                f"or a detached copy).")

    def _check(self, answer) -> None:
        for seed, (channels, height, width, disp_range) in enumerate(self.cases):
            feat_fixed, feat_moving = self._inputs(channels, height, width, seed)
            out = self._call(answer, feat_fixed, feat_moving, disp_range)
            self._check_shape(out, channels, height, width, disp_range)
            expected = correlation_unfold(feat_fixed, feat_moving, disp_range)
            if not self._close(out, expected):
                self._diagnose_values(out, feat_fixed, feat_moving, disp_range)
        channels, height, width, disp_range = self.cases[0]
        self._check_gradient(answer, channels, height, width, disp_range, seed=len(self.cases))


q1 = CorrelationLayerExercise()
