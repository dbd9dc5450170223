"""Exercises of notebook 03 (regularisation without trainable weights).

``q1``: write the differentiable min-convolution of the 2019 tutorial::

    def my_min_convolution(cost, disp_range):
        ...  # [B, D*D, h, w] -> [B, D*D, h, w]: min-pool 3, two average pools 5, replication padding

``q2``: write the soft arg-min::

    def my_soft_displacement(cost, disp_range, alpha):
        ...  # [B, D*D, h, w] -> (probabilities [B, D*D, h, w], displacement [B, 2, h, w])

``q3``: write the mean field over the image::

    def my_mean_field(cost, kernel, passes):
        ...  # [B, D*D, h, w] -> [B, D*D, h, w]: replication padding, ``passes`` average pools

Each has ``check(fn)``, ``hint(level)``, ``solution()`` and ``use(fn, fallback)``. The
checkers run the learner's function on small random cost volumes (non-square maps, several D)
and compare with :mod:`tutorial_utils.regularisation`. When the values are wrong they try the
usual mistakes one by one (lost or wrong padding, max instead of min, the wrong order of the
poolings, pooling over the wrong dimensions; a softmax of +cost or over the wrong dimension,
the displacement grid transposed or not centred) and name the one that explains the output.
The checker of ``q3`` compares with a brute-force loop over the pixels (replication padding
by clamped indices, every window mean written out) and names zero or reflection padding,
padding before every pass, pooling over the displacements, a wrong number of passes or
kernel size, and padding lost (the image shrinks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..offsets import displacement_offsets
from ..regularisation import min_convolution, soft_displacement
from ._checks import call_answer, check_cost_gradient, pooling_failed, worst_entry
from ._checks import close as _close
from ._checks import random_cost as _random_cost
from ._core import Exercise, Incorrect
from .mean_field import MeanFieldExercise, q3
from .mean_field import _mean_field_loop as _mean_field_loop
from .mean_field import _mean_field_variants as _mean_field_variants
from .mean_field import _pools as _pools

__all__ = ["MeanFieldExercise", "MinConvolutionExercise", "SoftDisplacementExercise", "q1", "q2", "q3"]
# q3 has a module of its own (mean_field); it, and the helpers that were here before, are still
# importable from here, where the notebook imports q1, q2 and q3

MIN_KERNEL, AVG_KERNEL, PADDING = 3, 5, 5
"""The 2019 recipe the exercise asks for."""

# --------------------------------------------------------------------------- q1: min-convolution


def _pool_grid(cost, disp_range, steps, pad_mode="replicate", padding=PADDING):
    """Apply ``steps`` (a list of ("min"|"max"|"avg", kernel)) to every pixel's D x D grid."""
    B, K, h, w = cost.shape
    D = disp_range
    grid = cost.permute(0, 2, 3, 1).reshape(B * h * w, 1, D, D)
    if padding:
        grid = F.pad(grid, (padding,) * 4, mode=pad_mode)
    for kind, kernel in steps:
        if kind == "min":
            grid = -F.max_pool2d(-grid, kernel, stride=1)
        elif kind == "max":
            grid = F.max_pool2d(grid, kernel, stride=1)
        else:
            grid = F.avg_pool2d(grid, kernel, stride=1)
    return grid.reshape(B, h, w, -1).permute(0, 3, 1, 2)


def _min_conv_variants(cost: torch.Tensor, disp_range: int):
    """The usual wrong answers of q1: yields (feedback, their output) one by one."""
    D = disp_range
    recipe = [("min", MIN_KERNEL), ("avg", AVG_KERNEL), ("avg", AVG_KERNEL)]
    yield ("You took the maximum instead of the minimum: min-pooling is -max_pool2d(-x). The lower "
           "envelope keeps the LOW costs and spreads them to neighbouring displacements.",
           _pool_grid(cost, D, [("max", MIN_KERNEL)] + recipe[1:]))
    yield ("Wrong padding mode: with zero padding the displacements near the edge of the D x D window "
           "see costs of 0 from outside and look too good. Use replication padding "
           "(F.pad(..., mode='replicate') or nn.ReplicationPad2d).",
           _pool_grid(cost, D, recipe, pad_mode="constant"))
    yield ("Wrong padding mode: use replication padding (edge values repeated), not reflection.",
           _pool_grid(cost, D, recipe, pad_mode="reflect"))
    yield ("The order of the poolings: you averaged first and min-pooled last (that is the order of "
           "the 2019 slides' code, which gives slightly different numbers). This exercise asks for the "
           "min-pooling first, then the two average poolings.",
           _pool_grid(cost, D, [("avg", AVG_KERNEL), ("avg", AVG_KERNEL), ("min", MIN_KERNEL)]))
    yield ("One average pooling is missing, and the padding does not fit it: min-pool 3, then TWO "
           "average pools of 5; the padding (3-1)/2 + 2*(5-1)/2 = 5 restores the D x D size.",
           _pool_grid(cost, D, recipe[:2], padding=3))
    spatial = F.pad(cost, (PADDING,) * 4, mode="replicate")
    spatial = -F.max_pool2d(-spatial, MIN_KERNEL, stride=1)
    spatial = F.avg_pool2d(F.avg_pool2d(spatial, AVG_KERNEL, stride=1), AVG_KERNEL, stride=1)
    yield ("You pooled over the spatial dimensions (h, w). The min-convolution works on the D x D "
           "displacement grid of each pixel: reshape the cost volume to [B*h*w, 1, D, D] first "
           "(permute(0, 2, 3, 1) moves the D*D channels last) and back afterwards.", spatial)
    B, K, h, w = cost.shape
    if (B * K * h * w) % (D * D) == 0:
        wrong = cost.reshape(-1, 1, D, D)
        wrong = F.pad(wrong, (PADDING,) * 4, mode="replicate")
        wrong = -F.max_pool2d(-wrong, MIN_KERNEL, stride=1)
        wrong = F.avg_pool2d(F.avg_pool2d(wrong, AVG_KERNEL, stride=1), AVG_KERNEL, stride=1)
        yield ("The reshape mixes the dimensions: cost.reshape(-1, 1, D, D) cuts the memory of "
               "[B, D*D, h, w] into D x D blocks of neighbouring PIXELS, not of displacements. Move the "
               "channels last first: cost.permute(0, 2, 3, 1).reshape(-1, 1, D, D), and undo it afterwards "
               "(.reshape(B, h, w, D*D).permute(0, 3, 1, 2)).", wrong.reshape(cost.shape))


class MinConvolutionExercise(Exercise):
    """Write the 2019 min-convolution approximation: [B, D*D, h, w], D -> [B, D*D, h, w]."""

    name = "Exercise 1: the differentiable min-convolution"
    example_call = "q1.check(my_min_convolution)"
    success_message = ("Your min-convolution gives the same regularised costs as the reference, for "
                       "several D, and gradients flow through it. The cells below use it.")
    hints = (
        """
        Treat every pixel's D*D costs as a tiny D x D image: [B, D*D, h, w] -> permute the
        channels last -> [B*h*w, 1, D, D]. Then: replication padding, min-pooling (kernel 3,
        stride 1), two average poolings (kernel 5, stride 1), and reshape back.
        """,
        """
        Min-pooling is -F.max_pool2d(-x, 3, stride=1). Every pooling with kernel k and stride 1
        makes the grid k-1 smaller, so 3, 5, 5 remove 2 + 4 + 4 = 10 rows: pad 5 on every side
        with F.pad(x, (5, 5, 5, 5), mode="replicate") and the output is D x D again.
        """,
        """
        Shapes: cost [B, D*D, h, w] -> .permute(0, 2, 3, 1) [B, h, w, D*D]
        -> .reshape(B*h*w, 1, D, D) -> pad -> [B*h*w, 1, D+10, D+10] -> min-pool -> D+8
        -> avg -> D+4 -> avg -> D -> .reshape(B, h, w, D*D) -> .permute(0, 3, 1, 2).
        """,
    )
    solution_code = """
    def my_min_convolution(cost, disp_range):
        B, K, h, w = cost.shape                                          # K = D*D
        D = disp_range
        grid = cost.permute(0, 2, 3, 1).reshape(B * h * w, 1, D, D)      # one D x D grid per pixel
        grid = F.pad(grid, (5, 5, 5, 5), mode="replicate")               # [B*h*w, 1, D+10, D+10]
        grid = -F.max_pool2d(-grid, 3, stride=1)                         # min-pooling: D+8
        grid = F.avg_pool2d(grid, 5, stride=1)                           # D+4
        grid = F.avg_pool2d(grid, 5, stride=1)                           # D
        return grid.reshape(B, h, w, K).permute(0, 3, 1, 2)              # [B, D*D, h, w]
    """

    # (B, D, h, w): non-square maps, several D (an unpadded answer fails differently for each)
    cases = ((2, 9, 3, 4), (1, 5, 4, 3), (1, 13, 2, 3))

    def _call(self, answer, cost, disp_range):
        def explain(exc: RuntimeError) -> str | None:
            if pooling_failed(exc):
                return (
                    f"The padding was lost, so the D x D window shrank to nothing: for D = {disp_range} a "
                    f"pooling failed (PyTorch: {str(exc).strip()}). Each pooling with stride 1 shrinks the "
                    f"grid by kernel - 1 (3-1 + 5-1 + 5-1 = 10 in all): pad 5 on every side with replication "
                    f"padding first, and use stride=1 in every pooling.")
            return None

        return call_answer(answer, cost, disp_range, explain=explain)

    def _check_shape(self, out, cost, disp_range):
        B, K, h, w = cost.shape
        D = disp_range
        if tuple(out.shape) == tuple(cost.shape):
            return
        what = (f"Wrong output shape: for a cost volume {list(cost.shape)} (D = {D}) the result must have the "
                f"same shape [B, D*D, h, w] = {list(cost.shape)}, you returned {list(out.shape)}.")
        numel = out.numel() // (B * h * w) if out.numel() % (B * h * w) == 0 else None
        side = round(numel ** 0.5) if numel else None
        if side is not None and side * side == numel and side < D:
            what += (f" Each pixel has only a {side} x {side} grid of displacements left: the window shrank "
                     f"because the padding was lost or too small. Pad (3-1)/2 + 2*(5-1)/2 = 5 on every side "
                     f"(replication), and use stride=1 in the poolings.")
        elif side is not None and side * side == numel and side > D:
            what += f" Your grid is {side} x {side}: the padding is too large (it must be exactly 5)."
        elif out.numel() == cost.numel():
            what += " The numbers are all there: reshape back to [B, h, w, D*D] and permute to [B, D*D, h, w]."
        raise Incorrect(what)

    def _diagnose(self, out, cost, disp_range):
        for message, wrong in _min_conv_variants(cost, disp_range):
            if _close(out, wrong):
                raise Incorrect(message)
        expected = min_convolution(cost.double(), disp_range)
        b, k, y, x = worst_entry(out, expected)
        r = (disp_range - 1) // 2
        raise Incorrect(
            f"Wrong values: e.g. at pixel (y, x) = ({y}, {x}) the displacement (dy, dx) = "
            f"({k // disp_range - r}, {k % disp_range - r}) should get {expected[b, k, y, x].item():.4f}, yours "
            f"is {out[b, k, y, x].item():.4f}. Check the order min-pool 3 -> average 5 -> average 5, the "
            f"replication padding of 5, and stride=1 everywhere.")

    def _check(self, answer) -> None:
        for seed, (B, D, h, w) in enumerate(self.cases):
            cost = _random_cost(B, D, h, w, seed)
            out = self._call(answer, cost, D)
            self._check_shape(out, cost, D)
            if not _close(out, min_convolution(cost, D)):
                self._diagnose(out, cost, D)
        cost = _random_cost(1, 5, 3, 2, seed=99, requires_grad=True)
        out = self._call(answer, cost, 5)
        check_cost_gradient(out, cost, lambda c: min_convolution(c, 5))


# --------------------------------------------------------------------------- q2: soft arg-min


def _soft_variants(cost: torch.Tensor, disp_range: int, alpha: float):
    """The usual wrong answers of q2: yields (feedback, probabilities or None, displacement or None)."""
    D = disp_range
    r = (D - 1) // 2
    offsets = displacement_offsets(D, dtype=cost.dtype)  # [D*D, 2] (dy, dx)

    def expect(prob, offs=offsets):
        return torch.einsum("bkyx,kc->bcyx", prob, offs)

    right = torch.softmax(-alpha * cost, dim=1)
    yield ("Your probabilities favour the LARGEST cost: take the softmax of -alpha * cost (low cost = likely).",
           torch.softmax(alpha * cost, dim=1), None)
    yield ("alpha is missing: the probabilities are softmax(-alpha * cost); alpha sets how peaked they are.",
           torch.softmax(-cost, dim=1), None)
    for dim in (2, 3, 0):
        if cost.shape[dim] > 1:
            yield (f"Softmax over the wrong dimension: you normalised over dim={dim}; the probabilities must "
                   f"sum to 1 over the D*D displacements of each pixel (dim=1).",
                   torch.softmax(-alpha * cost, dim=dim), None)
    yield ("The displacement grid is in the wrong order: your channel 0 is dx and channel 1 is dy (or your "
           "grid is transposed, e.g. meshgrid with indexing='xy'). Channel k = i*D + j of the cost volume "
           "holds (dy, dx) = (i - r, j - r); the output channels are (dy, dx).",
           None, expect(right, offsets.flip(1)))
    yield (f"The displacement grid is not centred: the offsets run from -r to r (r = {r}), not from 0 to D-1.",
           None, expect(right, offsets + r))
    yield ("The displacement has the wrong sign: channel k = i*D + j holds (dy, dx) = (i - r, j - r), "
           "not (r - i, r - j).", None, expect(right, -offsets))
    hard = offsets[cost.argmin(dim=1)].permute(0, 3, 1, 2)  # [B, 2, h, w]
    yield ("That is the hard arg-min (the best offset of each pixel). The soft arg-min is the EXPECTED "
           "displacement sum_k p_k * offset_k: differentiable, and between the grid points.", None, hard)


class SoftDisplacementExercise(Exercise):
    """Write the soft arg-min: cost [B, D*D, h, w], D, alpha -> (probabilities, displacement)."""

    name = "Exercise 2: the soft arg-min"
    example_call = "q2.check(my_soft_displacement)"
    success_message = ("Your probabilities and expected displacements match the reference, for several D "
                       "and alpha, and gradients flow through them.")
    hints = (
        """
        Two steps: probabilities = softmax of -alpha * cost over the D*D displacement channels;
        displacement = the probability-weighted sum of the offsets (dy, dx) of the channels.
        """,
        """
        torch.softmax(-alpha * cost, dim=1) gives [B, D*D, h, w]. The offsets: steps =
        torch.arange(-r, r + 1); dy, dx = torch.meshgrid(steps, steps, indexing="ij"), then
        dy.reshape(-1)[k] is the dy of channel k = i*D + j (i is the slow index).
        """,
        """
        Weighted sum with broadcasting: (prob * dy.view(1, D*D, 1, 1)).sum(1) is the expected dy
        [B, h, w]; do the same for dx and torch.stack([dy_mean, dx_mean], dim=1) -> [B, 2, h, w].
        Create the offsets with dtype=cost.dtype and device=cost.device.
        """,
    )
    solution_code = """
    def my_soft_displacement(cost, disp_range, alpha):
        r = (disp_range - 1) // 2
        prob = torch.softmax(-alpha * cost, dim=1)                          # [B, D*D, h, w]
        steps = torch.arange(-r, r + 1, dtype=cost.dtype, device=cost.device)
        dy, dx = torch.meshgrid(steps, steps, indexing="ij")                # [D, D] each
        dy = (prob * dy.reshape(1, -1, 1, 1)).sum(1)                        # [B, h, w]
        dx = (prob * dx.reshape(1, -1, 1, 1)).sum(1)                        # [B, h, w]
        return prob, torch.stack([dy, dx], dim=1)                           # [B, 2, h, w]
    """

    # (B, D, h, w, alpha)
    cases = ((2, 5, 3, 4, 10.0), (1, 7, 4, 2, 3.0), (1, 3, 2, 5, 1.0))

    def _call(self, answer, cost, disp_range, alpha):
        out = answer(cost, disp_range, alpha)
        if not isinstance(out, (tuple, list)) or len(out) != 2 or not all(isinstance(t, torch.Tensor) for t in out):
            got = type(out).__name__ if not isinstance(out, (tuple, list)) else f"{len(out)} items"
            raise Incorrect(f"Return two tensors: (probabilities [B, D*D, h, w], displacement [B, 2, h, w]); "
                            f"your function returned {got}.")
        return out

    def _check_shapes(self, prob, disp, cost, disp_range):
        B, K, h, w = cost.shape
        if tuple(prob.shape) != (B, K, h, w):
            hint = " Did you return (displacement, probabilities) in the wrong order?" if tuple(prob.shape) == (
                B, 2, h, w) else ""
            raise Incorrect(f"Wrong shape of the probabilities: expected [B, D*D, h, w] = {[B, K, h, w]}, "
                            f"got {list(prob.shape)}.{hint}")
        if tuple(disp.shape) != (B, 2, h, w):
            hint = (" Channels last? Stack dy and dx with dim=1." if tuple(disp.shape) == (B, h, w, 2) else "")
            raise Incorrect(f"Wrong shape of the displacement: expected [B, 2, h, w] = {[B, 2, h, w]} with "
                            f"channels (dy, dx), got {list(disp.shape)}.{hint}")

    def _check(self, answer) -> None:
        for seed, (B, D, h, w, alpha) in enumerate(self.cases):
            cost = _random_cost(B, D, h, w, seed)
            prob, disp = self._call(answer, cost, D, alpha)
            self._check_shapes(prob, disp, cost, D)
            prob_ref, disp_ref = soft_displacement(cost, D, alpha)
            prob_ok, disp_ok = _close(prob, prob_ref), _close(disp, disp_ref)
            if prob_ok and disp_ok:
                continue
            for message, wrong_prob, wrong_disp in _soft_variants(cost, D, alpha):
                if (wrong_prob is not None and _close(prob, wrong_prob)) or (
                        wrong_disp is not None and prob_ok and _close(disp, wrong_disp)):
                    raise Incorrect(message)
            if not prob_ok:
                sums = prob.detach().sum(1)
                extra = ("" if torch.allclose(sums, torch.ones_like(sums), atol=1e-4)
                         else " They do not sum to 1 over dim=1.")
                raise Incorrect(f"Wrong probabilities: they must be torch.softmax(-alpha * cost, dim=1).{extra}")
            raise Incorrect("The probabilities are right but the displacement is not: it is the sum over k of "
                            "probabilities[:, k] * (dy_k, dx_k) with (dy_k, dx_k) = (i - r, j - r) for k = i*D + j.")
        cost = _random_cost(1, 3, 2, 2, seed=99, requires_grad=True)
        prob, disp = self._call(answer, cost, 3, 5.0)
        if disp.grad_fn is None:
            raise Incorrect("Not differentiable: the displacement has no gradient (grad_fn is None). Avoid "
                            "argmin, .detach(), torch.no_grad() and NumPy.")
        (grad,) = torch.autograd.grad(disp.sum(), cost)
        ref_cost = cost.detach().clone().requires_grad_(True)
        (grad_ref,) = torch.autograd.grad(soft_displacement(ref_cost, 3, 5.0)[1].sum(), ref_cost)
        if not _close(grad, grad_ref):
            raise Incorrect("The values are right but the gradient is not: something in your function is not "
                            "differentiable (an in-place change or a detached copy?).")


q1 = MinConvolutionExercise()
q2 = SoftDisplacementExercise()
