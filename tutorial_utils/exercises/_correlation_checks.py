"""What the two correlation-layer checkers of notebook 02 share.

The usual wrong answers of one pair, random feature maps, the shape feedback, and the
diagnoses of a lost border, of right costs in the wrong channels and of the gradients; used by
:mod:`.correlation` (``q1``, one pair) and :mod:`.correlation_batch` (``q2``, a batch).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ._checks import close
from ._core import Incorrect


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


def random_pair(shape: tuple[int, ...], seed: int, requires_grad: bool = False):
    """Random feat_fixed, feat_moving of ``shape`` in [0, 1), float32 like the notebook's features."""
    generator = torch.Generator().manual_seed(seed)
    feat_fixed = torch.rand(shape, generator=generator)
    feat_moving = torch.rand(shape, generator=generator)
    return feat_fixed.requires_grad_(requires_grad), feat_moving.requires_grad_(requires_grad)


def shape_hint(got: tuple[int, ...], numel: int, shape: tuple[int, int, int, int], disp_range: int,
               batch: bool) -> str:
    """What a wrong output shape ``got`` (``numel`` numbers) says, for inputs ``shape`` [B, C, H, W].

    ``batch``: the exercise of a batch (q2; B > 1), which adds the batch's own mistakes.
    """
    B, C, H, W = shape
    D, r = disp_range, (disp_range - 1) // 2
    inner = (H - 2 * r, W - 2 * r)
    side = round(got[1] ** 0.5) if len(got) == 4 else 0
    hints = (
        (batch and numel == D * D * H * W,
         f" That is one cost volume for {B} pairs (only the first pair, or the pairs summed): keep the "
         f"batch dimension, every step works on all B pairs at once."),
        (got[-2:] == inner or got[-1:] == (inner[0] * inner[1],),
         " Your output has only the pixels whose whole D x D window lies inside the image: pad the "
         "moving features with r = (D-1)//2 zeros on every side (F.unfold(..., padding=r))."),
        (numel == B * C * D * D * H * W,
         " It has C times too many numbers: sum the squared differences over the channels"
         + (" (dim 1)." if batch else ".")),
        (batch and numel == C * D * D * H * W,
         " You summed over the batch (dim 0) instead of the channels: with a batch the differences are "
         "[B, C, D*D, H*W], so sum over dim 1."),
        (numel == B * C * H * W,
         " You summed over the displacements; sum over the channels instead and keep the D*D offsets."),
        (numel == B * D * D * H * W,
         f" The numbers are all there: reshape the result with .view({'B' if batch else 1}, D*D, H, W)."),
        (got[-2:] == (W, H), " H and W are swapped."),
        (len(got) == 4 and got[-2:] == (H, W) and side**2 == got[1],
         f" Your cost volume has {side}**2 channels: use the disp_range argument, not a fixed number."),
    )
    return next((message for wrong, message in hints if wrong), "")


def check_border(out: torch.Tensor, expected: torch.Tensor, disp_range: int) -> None:
    """Incorrect if ``out`` is right only where the whole D x D window lies inside the image."""
    r = (disp_range - 1) // 2
    H, W = expected.shape[-2:]
    inner = (slice(None), slice(None), slice(r, H - r), slice(r, W - r))
    if H > 2 * r and W > 2 * r and close(out[inner], expected[inner]):
        raise Incorrect("Wrong padding at the border: your costs are right where the whole D x D window "
                        "lies inside the image, but not near the border. The moving features must be "
                        "zero outside the image (F.unfold(..., padding=r) with r = (D-1)//2).")


def check_channel_order(out: torch.Tensor, expected: torch.Tensor, disp_range: int) -> None:
    """Incorrect if ``out`` [B, D*D, H, W] holds the right costs in the wrong channels (names one)."""
    D, r = disp_range, (disp_range - 1) // 2
    flat_out = out.detach().double().transpose(0, 1).reshape(D * D, -1)  # [D*D, B*H*W]
    flat_exp = expected.transpose(0, 1).reshape(D * D, -1)
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


def layer_gradients(answer, reference: Callable, feat_fixed: torch.Tensor, feat_moving: torch.Tensor,
                    disp_range: int, seed: int, avoid: str):
    """The gradients of a random weighting of the learner's and of the ``reference`` cost volume.

    ``feat_fixed``, ``feat_moving`` require gradients. Incorrect if the learner's layer fails on
    them or returns no gradient (``avoid``: what to avoid, said in that feedback). Returns
    (gradients of the learner's layer, of the reference), each for (feat_fixed, feat_moving).
    """
    try:
        out = answer(feat_fixed, feat_moving, disp_range)
    except NotImplementedError:
        raise
    except Exception as exc:
        raise Incorrect(f"Not differentiable: your function raised {type(exc).__name__} ({exc}) when the "
                        f"inputs require gradients. Use torch operations only (no NumPy, no .item()).") from None
    if not isinstance(out, torch.Tensor) or out.grad_fn is None:
        raise Incorrect(f"Not differentiable: the output has no gradient (grad_fn is None). Avoid .detach(), "
                        f"{avoid}; use torch operations on the inputs.")
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), (feat_fixed, feat_moving), allow_unused=True)
    fixed_ref = feat_fixed.detach().clone().requires_grad_(True)
    moving_ref = feat_moving.detach().clone().requires_grad_(True)
    ref = reference(fixed_ref, moving_ref, disp_range)
    grads_ref = torch.autograd.grad((ref * weights.to(ref.dtype)).sum(), (fixed_ref, moving_ref))
    return grads, grads_ref
