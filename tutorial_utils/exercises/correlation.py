"""Exercises of notebook 02 (the correlation layer).

``q1``: write the correlation layer of the 2019 tutorial yourself::

    def my_correlation_layer(feat_fixed, feat_moving, disp_range):
        ...  # [1, C, H, W], [1, C, H, W], D -> cost volume [1, D*D, H, W]

    q1.check(my_correlation_layer)   # precise feedback
    q1.hint()                        # q1.hint(2), q1.hint(3) say more
    q1.solution()

The checker runs the learner's function on small random tensors (non-square, so that a
swapped H and W shows) and compares it with :func:`tutorial_utils.correlation.correlation_unfold`.
When the values are wrong it tries the usual mistakes one by one (a transposed or reversed
displacement order, other padding, a missing square or a wrong sign, a mean instead of a sum)
and names the one that explains the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..correlation import correlation_unfold
from ._core import Exercise, Incorrect

__all__ = ["CorrelationLayerExercise", "q1"]


def _shifted_moving(feat_moving: torch.Tensor, disp_range: int, mode: str) -> torch.Tensor:
    """[1, C, H, W] -> [C, D*D, H, W]: moving[c, y+dy, x+dx] for every offset, ``mode`` padding."""
    _, C, H, W = feat_moving.shape
    r = (disp_range - 1) // 2
    padded = F.pad(feat_moving, (r, r, r, r), mode=mode)[0]  # [C, H+2r, W+2r]
    shifts = [padded[:, i:i + H, j:j + W] for i in range(disp_range) for j in range(disp_range)]
    return torch.stack(shifts, dim=1)


def _variants(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, disp_range: int):
    """The usual wrong answers: yields (feedback, their output [1, D*D, H, W]) one by one."""
    D = disp_range
    H, W = feat_fixed.shape[-2:]
    fixed = feat_fixed[0][:, None]  # [C, 1, H, W]
    diff = fixed - _shifted_moving(feat_moving, D, "constant")  # [C, D*D, H, W]
    ssd = (diff**2).sum(0, keepdim=True)  # [1, D*D, H, W]
    by_dxdy = ssd.view(1, D, D, H, W).transpose(1, 2).reshape(1, D * D, H, W)
    yield ("Wrong displacement order: your channel k = i*D + j holds the offset (dy, dx) = (j - r, i - r), "
           "i.e. x and y are swapped. Channel k must hold (dy, dx) = (i - r, j - r): the row offset i is "
           "the slow index.", by_dxdy)
    yield ("Wrong displacement order: your channel k holds the offset (-dy, -dx), the sign of the "
           "displacement is flipped. The cost at offset (dy, dx) compares fixed[y, x] with "
           "moving[y + dy, x + dx] (you may have shifted the fixed features instead of the moving ones).",
           ssd.flip(1))
    yield ("Wrong displacement order: your channel k holds (dx, dy) instead of (dy, dx), and with the "
           "opposite sign. Channel k = i*D + j must hold (dy, dx) = (i - r, j - r).", by_dxdy.flip(1))
    yield ("A square is missing: you summed the differences fixed - moving over the channels; "
           "sum their squares instead.", diff.sum(0, keepdim=True))
    yield ("A square is missing and a sign is flipped: you summed moving - fixed over the channels; "
           "sum the squared differences instead.", -diff.sum(0, keepdim=True))
    yield ("That is the sum of absolute differences (SAD); this layer uses the sum of squared "
           "differences: square instead of abs().", diff.abs().sum(0, keepdim=True))
    yield ("Your costs have the wrong sign: the SSD is >= 0 and smallest for the best match.", -ssd)
    yield ("A sign is wrong: you squared fixed + moving; the SSD squares the difference fixed - moving.",
           ((fixed + (fixed - diff)) ** 2).sum(0, keepdim=True))
    yield ("Do not take the square root: the layer returns the sum of squared differences, not the "
           "Euclidean distance.", ssd.sqrt())
    yield ("You averaged over the channels; sum over them instead (.sum(0), not .mean(0)).",
           (diff**2).mean(0, keepdim=True))
    for mode in ("replicate", "reflect", "circular"):
        try:
            padded = _shifted_moving(feat_moving, D, mode)
        except (RuntimeError, NotImplementedError):  # reflect needs r < H and r < W
            continue
        yield (f"Wrong padding at the border: your costs are right inside the image but you used {mode} "
               f"padding. The moving features must be zero outside the image (F.unfold(..., padding=r) "
               f"pads with zeros).", ((fixed - padded) ** 2).sum(0, keepdim=True))


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
        generator = torch.Generator().manual_seed(seed)
        shape = (1, channels, height, width)
        feat_fixed = torch.rand(shape, generator=generator)  # float32, like the notebook's features
        feat_moving = torch.rand(shape, generator=generator)
        return feat_fixed.requires_grad_(requires_grad), feat_moving.requires_grad_(requires_grad)

    def _close(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=self.rtol, atol=self.atol)

    def _call(self, answer, feat_fixed, feat_moving, disp_range):
        out = answer(feat_fixed, feat_moving, disp_range)
        if not isinstance(out, torch.Tensor):
            raise Incorrect(f"Your function should return a torch.Tensor, it returned {type(out).__name__}.")
        return out

    def _check_shape(self, out: torch.Tensor, channels: int, height: int, width: int, disp_range: int) -> None:
        D, r = disp_range, (disp_range - 1) // 2
        expected = (1, D * D, height, width)
        got = tuple(out.shape)
        if got == expected:
            return
        what = (f"Wrong output shape: for feat_fixed, feat_moving [1, {channels}, {height}, {width}] and "
                f"disp_range={D} the cost volume must be [B, D*D, H, W] = {list(expected)}, you returned {list(got)}.")
        if got[-2:] == (height - 2 * r, width - 2 * r) or got[-1:] == ((height - 2 * r) * (width - 2 * r),):
            what += (" Your output has only the pixels whose whole D x D window lies inside the image: pad the "
                     "moving features with r = (D-1)//2 zeros on every side (F.unfold(..., padding=r)).")
        elif out.numel() == channels * D * D * height * width:
            what += " It has C times too many numbers: sum the squared differences over the channels."
        elif out.numel() == height * width * channels:
            what += " You summed over the displacements; sum over the channels instead and keep the D*D offsets."
        elif out.numel() == D * D * height * width:
            what += " The numbers are all there: reshape the result with .view(1, D*D, H, W)."
        elif got[-2:] == (width, height):
            what += " H and W are swapped."
        elif len(got) == 4 and got[-2:] == (height, width) and round(got[1] ** 0.5) ** 2 == got[1]:
            what += (f" Your cost volume has {round(got[1] ** 0.5)}**2 channels: use the disp_range argument, "
                     f"not a fixed number.")
        raise Incorrect(what)

    def _diagnose_values(self, out, feat_fixed, feat_moving, disp_range) -> None:
        for message, wrong in _variants(feat_fixed, feat_moving, disp_range):
            if self._close(out, wrong):
                raise Incorrect(message)
        expected = correlation_unfold(feat_fixed.double(), feat_moving.double(), disp_range)
        D, r = disp_range, (disp_range - 1) // 2
        H, W = expected.shape[-2:]
        inner = (slice(None), slice(None), slice(r, H - r), slice(r, W - r))
        if H > 2 * r and W > 2 * r and self._close(out[inner], expected[inner]):
            raise Incorrect("Wrong padding at the border: your costs are right where the whole D x D window "
                            "lies inside the image, but not near the border. The moving features must be "
                            "zero outside the image (F.unfold(..., padding=r) with r = (D-1)//2).")
        # the right numbers in the wrong channels?
        flat_out = out.detach().double().reshape(D * D, -1)
        flat_exp = expected.reshape(D * D, -1)
        distance = torch.cdist(flat_out, flat_exp)  # [D*D, D*D]
        scale = flat_exp.abs().max().clamp_min(1e-12)
        if bool((distance.min(dim=1).values <= 1e-4 * scale).all()):
            mapping = distance.argmin(dim=1)
            bad = int((mapping != torch.arange(D * D)).nonzero()[0, 0])
            good = int(mapping[bad])
            raise Incorrect(
                f"Wrong displacement order: the costs are right but in the wrong channels. Your channel {bad} "
                f"holds offset (dy, dx) = ({good // D - r}, {good % D - r}), it should hold "
                f"({bad // D - r}, {bad % D - r}): channel k = i*D + j holds (dy, dx) = (i - r, j - r).")
        error = (out.detach().double() - expected).abs()
        worst = torch.nonzero(error == error.max())[0].tolist()
        k, y, x = worst[1], worst[2], worst[3]
        raise Incorrect(
            f"Wrong values: e.g. channel k={k} (offset (dy, dx) = ({k // D - r}, {k % D - r})) at pixel "
            f"(y, x) = ({y}, {x}) should be {expected[0, k, y, x].item():.4f}, yours is "
            f"{out[0, k, y, x].item():.4f}. Check for a sign or a square missing: the cost is "
            f"sum over c of (fixed[c, y, x] - moving[c, y+dy, x+dx])**2.")

    def _check_gradient(self, answer, channels, height, width, disp_range, seed) -> None:
        feat_fixed, feat_moving = self._inputs(channels, height, width, seed, requires_grad=True)
        try:
            out = answer(feat_fixed, feat_moving, disp_range)
        except NotImplementedError:
            raise
        except Exception as exc:
            raise Incorrect(f"Not differentiable: your function raised {type(exc).__name__} ({exc}) when the "
                            f"inputs require gradients. Use torch operations only (no NumPy, no .item()).") from None
        if not isinstance(out, torch.Tensor) or out.grad_fn is None:
            raise Incorrect("Not differentiable: the output has no gradient (grad_fn is None). Avoid .detach(), "
                            "torch.no_grad(), NumPy and building new tensors from numbers; use torch operations "
                            "on the inputs.")
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out.dtype)
        grads = torch.autograd.grad((out * weights).sum(), (feat_fixed, feat_moving), allow_unused=True)
        fixed_ref = feat_fixed.detach().clone().requires_grad_(True)
        moving_ref = feat_moving.detach().clone().requires_grad_(True)
        ref = correlation_unfold(fixed_ref, moving_ref, disp_range)
        grads_ref = torch.autograd.grad((ref * weights.to(ref.dtype)).sum(), (fixed_ref, moving_ref))
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
