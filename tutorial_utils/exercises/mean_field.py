"""Exercise 3 of notebook 03: the mean field over the image (``q3``).

Imported by the notebook from :mod:`tutorial_utils.exercises.regularisation` (``from
tutorial_utils.exercises.regularisation import q1, q2, q3``), which describes all three
exercises; the checker compares with a brute-force loop over the pixels (:func:`_mean_field_loop`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import (
    call_answer,
    check_cost_gradient,
    close,
    pooling_failed,
    random_cost,
    worst_entry,
)
from ._core import Exercise, Incorrect

__all__ = ["MeanFieldExercise", "q3"]


def _mean_field_loop(cost: torch.Tensor, kernel: int, passes: int) -> torch.Tensor:
    """The reference of q3, pixel by pixel: [B, K, h, w] -> [B, K, h, w] (differentiable).

    Replication padding of ``passes * (kernel - 1) // 2`` by clamped indices, then ``passes``
    times the mean of every ``kernel`` x ``kernel`` window that lies inside the padded map.
    """
    B, K, h, w = cost.shape
    pad = passes * (kernel - 1) // 2
    rows = torch.arange(-pad, h + pad).clamp(0, h - 1)
    cols = torch.arange(-pad, w + pad).clamp(0, w - 1)
    grid = cost[:, :, rows][:, :, :, cols]  # [B, K, h + 2 pad, w + 2 pad], edge values repeated
    for _ in range(passes):
        height, width = grid.shape[-2] - kernel + 1, grid.shape[-1] - kernel + 1
        means = [grid[:, :, y:y + kernel, x:x + kernel].mean(dim=(2, 3)) for y in range(height) for x in range(width)]
        grid = torch.stack(means, dim=-1).reshape(B, K, height, width)
    return grid


def _pools(cost, kernel, passes, pad, mode="replicate", per_pass=False):
    """``passes`` average pools over (h, w); padding ``pad`` once, or (kernel-1)//2 before every pass."""
    if not per_pass and pad:
        cost = F.pad(cost, (pad,) * 4, mode=mode)
    for _ in range(passes):
        if per_pass:
            cost = F.pad(cost, ((kernel - 1) // 2,) * 4, mode=mode)
        cost = F.avg_pool2d(cost, kernel, stride=1)
    return cost


def _mean_field_variants(cost: torch.Tensor, kernel: int, passes: int):
    """The usual wrong answers of q3: yields (feedback, their output) one by one."""
    B, K, h, w = cost.shape
    pad = passes * (kernel - 1) // 2
    yield ("Wrong padding mode: with zero padding the costs near the image border are pulled towards 0 and "
           "look too good there. Use replication padding: F.pad(cost, (p, p, p, p), mode='replicate').",
           _pools(cost, kernel, passes, pad, mode="constant"))
    yield ("Wrong padding mode: avg_pool2d's own padding= pads with zeros, which pulls the costs at the image "
           "border towards 0. Pad once with F.pad(..., mode='replicate'), then pool with padding=0.",
           _pools(cost, kernel, passes, pad, mode="constant", per_pass=True))
    inside = cost
    for _ in range(passes):
        inside = F.avg_pool2d(inside, kernel, stride=1, padding=(kernel - 1) // 2, count_include_pad=False)
    yield ("Wrong padding: avg_pool2d(..., padding=..., count_include_pad=False) averages only the pixels "
           "inside the image. The mean field pads once with replication padding (edge values repeated): "
           "F.pad(cost, (p, p, p, p), mode='replicate') with p = passes * (kernel - 1) // 2.", inside)
    if pad < min(h, w):  # reflection needs a padding smaller than the map
        yield ("Wrong padding mode: use replication padding (edge values repeated), not reflection.",
               _pools(cost, kernel, passes, pad, mode="reflect"))
    yield (f"You padded before every pass; pad once, before the first pass, with all "
           f"passes * (kernel - 1) // 2 = {pad} rows and columns (replication), then pool {passes} times with "
           f"no padding. (Padding each pass repeats the already averaged edge, which gives other numbers "
           f"near the border.)", _pools(cost, kernel, passes, pad, per_pass=True))
    for other in (passes - 1, passes + 1):
        if other >= 0:
            yield (f"Wrong number of passes: you averaged {other} times; the exercise asks for passes = {passes} "
                   f"average poolings (use the passes argument in a loop, and pad passes * (kernel - 1) // 2).",
                   _pools(cost, kernel, other, other * (kernel - 1) // 2))
    for other in (3, 5, 7):
        if other != kernel:
            yield (f"Wrong kernel size: you pooled {other} x {other} windows; use the kernel argument "
                   f"({kernel} here) for the pooling and for the padding.",
                   _pools(cost, other, passes, passes * (other - 1) // 2))
    D = round(K ** 0.5)
    if D * D == K:
        grid = cost.permute(0, 2, 3, 1).reshape(B * h * w, 1, D, D)
        grid = _pools(grid, kernel, passes, pad)
        yield ("You pooled over the displacement dimensions (each pixel's D x D grid), which is what the "
               "min-convolution does. The mean field averages over the IMAGE: F.avg_pool2d on [B, D*D, h, w] "
               "already pools over h and w, every displacement channel separately; no reshape.",
               grid.reshape(B, h, w, K).permute(0, 3, 1, 2))
    volume = F.pad(cost[:, None], (pad,) * 6, mode="replicate")
    for _ in range(passes):
        volume = F.avg_pool3d(volume, kernel, stride=1)
    yield ("You pooled over the displacement channels as well as the image: the mean field averages each "
           "displacement channel over (h, w) separately. Use F.avg_pool2d on [B, D*D, h, w], not a 3D pooling.",
           volume[:, 0])


class MeanFieldExercise(Exercise):
    """Write the mean field: cost [B, D*D, h, w], kernel, passes -> [B, D*D, h, w]."""

    name = "Exercise 3: the mean field"
    example_call = "q3.check(my_mean_field)"
    success_message = ("Your mean field gives the same costs as the reference, for several kernels and numbers "
                       "of passes, and gradients flow through it.")
    hints = (
        """
        The mean field averages every displacement channel over the image; nothing moves
        between the channels. F.avg_pool2d pools over the last two dimensions (h, w) of
        [B, D*D, h, w], each channel separately: exactly what is needed, no reshape.
        """,
        """
        Each average pooling with kernel k and stride 1 makes h and w smaller by k - 1, so
        `passes` of them by passes * (k - 1). Pad passes * (kernel - 1) // 2 on every side
        first, once, with F.pad(cost, (p, p, p, p), mode="replicate").
        """,
        """
        p = passes * (kernel - 1) // 2; x = F.pad(cost, (p, p, p, p), mode="replicate");
        then `passes` times x = F.avg_pool2d(x, kernel, stride=1). Zero padding (also
        avg_pool2d's own padding=) pulls the costs at the image border towards 0.
        """,
    )
    solution_code = """
    def my_mean_field(cost, kernel, passes):
        pad = passes * (kernel - 1) // 2                          # what the poolings take away
        x = F.pad(cost, (pad, pad, pad, pad), mode="replicate")   # [B, D*D, h + 2*pad, w + 2*pad]
        for _ in range(passes):
            x = F.avg_pool2d(x, kernel, stride=1)                 # each pass: kernel - 1 smaller
        return x                                                  # [B, D*D, h, w]
    """

    # (B, D, h, w, kernel, passes): non-square maps, padding larger than the map, several passes;
    # the first map is large enough that an answer without padding returns a (smaller) shape
    cases = ((2, 3, 7, 6, 3, 2), (1, 5, 5, 3, 5, 3), (2, 3, 3, 4, 3, 3))

    def _call(self, answer, cost, kernel, passes):
        def explain(exc: RuntimeError) -> str | None:
            if pooling_failed(exc):
                return (
                    f"The image shrank to nothing: for kernel = {kernel} and passes = {passes} a pooling failed "
                    f"(PyTorch: {str(exc).strip()}). The padding was lost or too small, or the stride is not 1: "
                    f"every pooling with stride=1 shrinks h and w by kernel - 1 (avg_pool2d's default stride is the "
                    f"kernel), so pad passes * (kernel - 1) // 2 on every side (replication) first.")
            return None

        return call_answer(answer, cost, kernel, passes, explain=explain)

    def _check_shape(self, out, cost, kernel, passes):
        B, K, h, w = cost.shape
        if tuple(out.shape) == tuple(cost.shape):
            return
        pad = passes * (kernel - 1) // 2
        got = tuple(out.shape)
        what = (f"Wrong output shape: for a cost volume {list(cost.shape)}, kernel = {kernel} and passes = {passes} "
                f"the result must have the same shape [B, D*D, h, w] = {list(cost.shape)}, you returned {list(got)}.")
        if len(got) == 4 and got[:2] == (B, K) and got[2] < h and got[3] < w:
            lost = (h - got[2], w - got[3])
            if lost == (2 * pad, 2 * pad):
                what += (f" The image shrank by {lost[0]} = passes * (kernel - 1): the padding was lost. Pad "
                         f"passes * (kernel - 1) // 2 = {pad} on every side (replication) before the poolings.")
            elif got[2] <= h // 2 and got[3] <= w // 2:
                what += " The image shrank a lot: use stride=1 in every pooling (the default stride is the kernel)."
            else:
                what += (f" The image shrank by {lost[0]} rows: the padding is too small for {passes} poolings of "
                         f"{kernel} x {kernel}; pad passes * (kernel - 1) // 2 = {pad} on every side.")
        elif len(got) == 4 and got[:2] == (B, K) and got[2] > h:
            what += (f" The image grew: the padding is too large for {passes} poolings of {kernel} x {kernel}; pad "
                     f"passes * (kernel - 1) // 2 = {pad} on every side.")
        elif len(got) == 4 and got[0] == B and got[2:] == (h, w):
            what += (" The number of displacement channels changed: you pooled over the channels too. The mean "
                     "field averages each displacement channel over (h, w) only: F.avg_pool2d on [B, D*D, h, w].")
        elif out.numel() == cost.numel():
            what += " The numbers are all there: reshape back to [B, D*D, h, w]."
        raise Incorrect(what)

    def _diagnose(self, out, cost, kernel, passes):
        for message, wrong in _mean_field_variants(cost, kernel, passes):
            if close(out, wrong):
                raise Incorrect(message)
        expected = _mean_field_loop(cost.double(), kernel, passes)
        b, k, y, x = worst_entry(out, expected)
        raise Incorrect(
            f"Wrong values: e.g. channel k={k} at pixel (y, x) = ({y}, {x}) should be "
            f"{expected[b, k, y, x].item():.4f}, yours is {out[b, k, y, x].item():.4f}. Check: replication padding "
            f"of passes * (kernel - 1) // 2, once, then `passes` average poolings kernel x kernel, stride 1, over "
            f"the image.")

    def _check(self, answer) -> None:
        for seed, (B, D, h, w, kernel, passes) in enumerate(self.cases):
            cost = random_cost(B, D, h, w, seed=200 + seed)
            out = self._call(answer, cost, kernel, passes)
            self._check_shape(out, cost, kernel, passes)
            if not close(out, _mean_field_loop(cost.double(), kernel, passes)):
                self._diagnose(out, cost, kernel, passes)
        cost = random_cost(1, 3, 3, 4, seed=299, requires_grad=True)
        out = self._call(answer, cost, 3, 2)
        weights = torch.rand(out.shape, generator=torch.Generator().manual_seed(298))
        check_cost_gradient(out, cost, lambda c: _mean_field_loop(c, 3, 2), weights)


q3 = MeanFieldExercise()
