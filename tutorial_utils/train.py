"""Training the feature CNN with the non-local label loss, and its command line.

Taught in ``notebooks/04_training.ipynb``. Only the feature CNN is trained; the correlation
layer and the regularisation stay fixed (they have no weights): both images go through the
CNN, the SSD cost volume over D x D displacements, divided by its mean, is regularised and
turned into probabilities ``softmax(-alpha * cost)`` -- exactly what
:func:`~tutorial_utils.registration.register_images` does -- and the loss is the non-local
label loss of :mod:`~tutorial_utils.losses` (optionally plus a diffusion penalty on the
expected displacement).

Speed (``python -m benchmarks.training`` measures it against the 2019 loop of
:mod:`~tutorial_utils.pipeline_2019`): every step draws ``images_per_step`` training images,
runs the CNN once on all of them and uses *every ordered pair* among them (n images give
n(n-1) pairs); the cost volume comes from the fast
:func:`~tutorial_utils.correlation.correlation`, the regularisation from
:func:`~tutorial_utils.regularisation_fast.regularise_fast` (the same values as
:func:`~tutorial_utils.regularisation.regularise`, faster to differentiate), and the label
warp is a sum of shifted one-hot maps weighted by the probabilities, with each moving map
shared by all pairs that use it. The pairs are differentiated a few at a time, so that their
cost volumes stay in the CPU cache (:func:`pair_loss`). The loop itself (Adam, cosine decay,
seeding, CPU settings) is the one the U-Net shares, :func:`~tutorial_utils.training.train_loop`.

The settings of the fixed blocks (regularisation kernels, ``alpha``, border handling,
pre-alignment) are read from :func:`~tutorial_utils.registration.register_images`
(:func:`~tutorial_utils.training.pipeline_defaults`), so that a trained CNN fits the
pipeline it is used in.

The shipped checkpoint (:data:`CHECKPOINT`) was made by::

    python -m tutorial_utils.train --pairs 12000 --source synthetic --threads 1 --evaluate \
        --out tutorial_utils/checkpoints/feature_cnn_synthetic.pt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checks import check_int, check_odd
from .data import Dataset, _check_dataset
from .environment import choose_device
from .evaluation import evaluate_registration
from .losses import _label_weights, _SharedMovingWarp, diffusion_penalty
from .models import FeatureCNN
from .offsets import displacement_offsets
from .registration import cost_volume
from .regularisation_fast import regularise_fast
from .training import (
    LossHistory,
    _check_training,
    _pipeline_settings,
    _prepare_training_data,
    _training_ids,
    add_run_arguments,
    add_training_arguments,
    check_run_arguments,
    load_state_dict,
    non_negative_int,
    odd_int,
    pipeline_defaults,
    positive_float,
    positive_int,
    report_training,
    save_state_dict,
    seeded,
    train_loop,
)

__all__ = [
    "CHECKPOINT",
    "DEFAULTS",
    "DEFAULT_PAIRS",
    "PairLossSettings",
    "load_features",
    "main",
    "pair_loss",
    "save_features",
    "train_features",
]

CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "feature_cnn_synthetic.pt"
"""The pretrained feature CNN shipped with the package (a ``state_dict``, see :func:`load_features`;
how it was made: the module docstring and ``checkpoints/README.md``)."""

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
those of :func:`~tutorial_utils.registration.register_images`
(:func:`~tutorial_utils.training.pipeline_defaults`), so that the trained CNN fits the
pipeline it will be used in."""


# =========================================================================== the loss of a group of slices


@dataclass(frozen=True)
class PairLossSettings:
    """Everything :func:`pair_loss` needs besides the features and labels (see there): ``disp_range``
    D, ``alpha`` of ``softmax(-alpha * cost)``, ``diffusion_weight`` (0: off), ``label_weights`` ([L]
    or None: all alike), ``reg`` (keyword arguments of
    :func:`~tutorial_utils.regularisation_fast.regularise_fast`), ``border`` ("replicate", "zeros"),
    ``chunk_pairs`` (pairs differentiated at a time), ``need_grad`` (compute the features' gradient)."""

    disp_range: int
    alpha: float
    diffusion_weight: float
    label_weights: torch.Tensor | None
    reg: dict
    border: str
    chunk_pairs: int = 4
    need_grad: bool = True


def _pairs_loss(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, onehot_fixed: torch.Tensor,
                onehot_moving: torch.Tensor, settings: PairLossSettings) -> torch.Tensor:
    """Summed loss of c pairs that share one moving image: [c, C, h, w], [1, C, h, w], [c, L, h, w], [L, h, w].

    The cost volume and its regularisation are those of register_images (``border``, ``reg``)."""
    s = settings
    c = feat_fixed.shape[0]
    cost = cost_volume(feat_fixed, feat_moving.expand(c, -1, -1, -1), s.disp_range, True, s.border)  # [c, D*D, h, w]
    cost = regularise_fast(cost, s.disp_range, **s.reg)
    probabilities = torch.softmax(-s.alpha * cost, dim=1)  # [c, D*D, h, w]
    warped = _SharedMovingWarp.apply(probabilities, onehot_moving, s.disp_range)  # [c, L, h, w]
    squared = (warped - onehot_fixed) ** 2  # [c, L, h, w]
    if s.label_weights is not None:
        squared = squared * s.label_weights.view(1, -1, 1, 1)
    loss = squared.sum(1).mean((1, 2)).sum()
    if s.diffusion_weight:
        offsets = displacement_offsets(s.disp_range, cost.device, cost.dtype)  # [D*D, 2]
        displacement = torch.einsum("pkyx,kc->pcyx", probabilities, offsets)  # [c, 2, h, w]
        loss = loss + c * s.diffusion_weight * diffusion_penalty(displacement)
    return loss


class _GroupLoss(torch.autograd.Function):
    """Mean loss over all ordered pairs of n feature maps; the gradient is computed chunk by chunk
    inside the forward pass (each chunk's cost volumes are built, differentiated and dropped while
    they are still in the CPU cache) and handed out in the backward pass."""

    @staticmethod
    def forward(ctx, features, onehot, settings: PairLossSettings):
        need_grad = settings.need_grad
        n = features.shape[0]
        grad = torch.zeros_like(features) if need_grad else None
        total = features.new_zeros(())
        for m in range(n):
            fixed = [f for f in range(n) if f != m]
            for s in range(0, n - 1, settings.chunk_pairs):
                index = torch.tensor(fixed[s:s + settings.chunk_pairs], device=features.device)
                feat_fixed = features[index].detach().requires_grad_(need_grad)
                feat_moving = features[m:m + 1].detach().requires_grad_(need_grad)
                with torch.set_grad_enabled(need_grad):
                    loss = _pairs_loss(feat_fixed, feat_moving, onehot[index], onehot[m], settings)
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
        images: [n, 1, H, W]. onehot: [n, L, h, w] (:func:`~tutorial_utils.losses.label_onehot`).
        alpha, border, reg (keyword arguments of
            :func:`~tutorial_utils.regularisation_fast.regularise_fast`): the registration
            pipeline; what is not given is taken from :func:`~tutorial_utils.training.pipeline_defaults`.
        label_weights: [L] or None (see :func:`train_features`).

    Returns:
        a scalar: the mean over the pairs of :func:`~tutorial_utils.losses.nonlocal_label_loss`
        (+ ``diffusion_weight`` times :func:`~tutorial_utils.losses.diffusion_penalty` of the
        expected displacement, in feature pixels).
    """
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"pair_loss needs at least 2 images, got {n}")
    defaults = pipeline_defaults()
    features = model(images)  # [n, C, h, w]
    settings = PairLossSettings(
        disp_range=disp_range, alpha=defaults["alpha"] if alpha is None else alpha,
        diffusion_weight=diffusion_weight, label_weights=label_weights, reg={**defaults["reg"], **reg},
        border=defaults["border"] if border is None else border, chunk_pairs=chunk_pairs,
        need_grad=torch.is_grad_enabled() and features.requires_grad)
    return _GroupLoss.apply(features, onehot, settings)


# =========================================================================== training


def train_features(dataset: Dataset, num_pairs: int = DEFAULT_PAIRS, disp_range: int = 9, seed: int = 0,
                   device: str | torch.device | None = None, progress: bool = True, *, model: nn.Module | None = None,
                   lr: float = DEFAULTS["lr"], images_per_step: int = DEFAULTS["images_per_step"],
                   diffusion_weight: float = DEFAULTS["diffusion_weight"], label_weights=DEFAULTS["label_weights"],
                   alpha: float | None = None, prealign: str | None = "default", border: str | None = None,
                   train_ids: Sequence[int] | None = None, threads: int | None = None,
                   **reg) -> tuple[nn.Module, LossHistory]:
    """Train the feature CNN with the non-local label loss on random pairs of training slices.

    Every step draws ``images_per_step`` training slices at random (``dataset.train_ids``
    only), runs the CNN once on them and uses all n(n-1) ordered pairs among them
    (:func:`pair_loss`): the features go through the fixed correlation layer and
    regularisation, with the settings of :func:`~tutorial_utils.registration.register_images`
    (so the trained CNN fits that pipeline with ``features=model``), the loss is
    :func:`~tutorial_utils.losses.nonlocal_label_loss`. The loop is
    :func:`~tutorial_utils.training.train_loop`: Adam with a cosine learning-rate decay;
    BatchNorm uses the statistics of each step's slices and the model is returned in
    ``eval()`` mode (running statistics). Deterministic on the CPU for a given ``seed``; the
    global random state is left untouched.

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
        diffusion_weight: weight of :func:`~tutorial_utils.losses.diffusion_penalty` (0: off, the 2019 loss).
        label_weights: None (the 2019 loss: all labels alike), "balanced" (inverse area in
            the training slices) or weights [L].
        alpha, border, reg (keyword arguments of
            :func:`~tutorial_utils.regularisation_fast.regularise_fast`): the registration
            pipeline; default: that of register_images.
        prealign: how the training slices are aligned, once per slice ("none", "com",
            "moments"; "affine" means "moments"); default: register_images' pre-alignment.
        train_ids: slices to train on (default ``dataset.train_ids``).
        threads: CPU threads while training (default 1: robust on busy and small machines,
            see ``training._THREADS``; restored afterwards). Denormals are flushed meanwhile
            (``training._DENORMALS``).

    Returns:
        ``(model, history)``: the trained model (on ``device``, in eval mode) and a
        :class:`~tutorial_utils.training.LossHistory` (one loss per step, plus timing).
    """
    _check_dataset(dataset)
    D = check_odd("disp_range", disp_range)
    num_pairs = check_int("num_pairs", num_pairs, minimum=1)
    ids = _training_ids(dataset, train_ids)
    seed, images_per_step, lr, diffusion_weight, threads = _check_training(
        seed, images_per_step, lr, diffusion_weight, threads)
    alpha, border, prealign, reg = _pipeline_settings(alpha, border, prealign, reg)
    device = choose_device(str(device)) if device is not None else choose_device()
    n = min(images_per_step, len(ids))
    steps = -(-num_pairs // (n * (n - 1)))
    settings = {"num_pairs": num_pairs, "disp_range": D, "seed": seed, "device": str(device), "lr": lr,
                "images_per_step": n, "alpha": alpha, "diffusion_weight": diffusion_weight, "prealign": prealign,
                "border": border, "label_weights": label_weights, "steps": steps, "threads": threads, **reg}

    with seeded(seed, device) as generator:
        model = (model if model is not None else FeatureCNN()).to(device)
        images, onehot = _prepare_training_data(dataset, ids, prealign, device)  # [N, 1, H, W], [N, L, h, w]
        weights = _label_weights(label_weights, onehot)

        def group_loss(chosen: torch.Tensor) -> torch.Tensor:
            return pair_loss(model, images[chosen], onehot[chosen], D, alpha, diffusion_weight, weights, border,
                             **reg)

        history = train_loop(model, group_loss, num_slices=len(ids), images_per_step=n, lr=lr,
                             generator=generator, device=device, steps=steps, threads=threads, progress=progress,
                             desc="training", schedule="torch", settings=settings)
    return model, history


# =========================================================================== saving and loading


def save_features(model: nn.Module, path: str | Path) -> Path:
    """Save the model's weights as a plain ``state_dict`` (tensors only, on the CPU), atomically
    (:func:`~tutorial_utils.training.save_state_dict`)."""
    return save_state_dict(model, path)


def load_features(path: str | Path | None = None, device: str | torch.device | None = None) -> FeatureCNN:
    """A :class:`~tutorial_utils.models.FeatureCNN` with weights from a ``state_dict`` file.

    ``path`` defaults to the checkpoint shipped with the package (:data:`CHECKPOINT`, trained
    on the synthetic set, see ``checkpoints/README.md``). Loaded with ``weights_only=True`` (no code
    runs). Returns the model in ``eval()`` mode on ``device`` (default: the CPU).
    """
    return load_state_dict(FeatureCNN(), CHECKPOINT if path is None else path, device)


# =========================================================================== command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tutorial_utils.train",
        description="Train the feature CNN with the non-local label loss and save its state_dict.")
    parser.add_argument("--pairs", type=positive_int, default=DEFAULT_PAIRS,
                        help=f"training pairs (default {DEFAULT_PAIRS})")
    parser.add_argument("--out", type=Path, required=True, help="where to write the state_dict (.pt)")
    parser.add_argument("--disp-range", type=odd_int, default=DEFAULTS["disp_range"], help="D, odd (default 9)")
    add_training_arguments(parser, DEFAULTS)
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


def _load_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Dataset:
    """The tutorial's slices (``--source``) or one slice of each scan in ``--scans``."""
    from .data import load_dataset

    if args.scans is None:
        return load_dataset(source=args.source, seed=args.data_seed)
    if args.source is not None:
        parser.error("--scans and --source are two different data sets: give one of them")
    if args.evaluate and args.test_scans < 2:
        parser.error("--evaluate with --scans needs at least 2 held-out scans (--test-scans N)")
    from .scans import dataset_from_folder

    try:
        return dataset_from_folder(args.scans, num_test=args.test_scans, in_plane_spacing=args.spacing)
    except ValueError as exc:  # a ScanError too: a bad file or folder
        parser.error(f"--scans: {exc}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_run_arguments(parser, args)
    dataset = _load_data(parser, args)
    print(f"data: {dataset}")
    model, history = train_features(
        dataset, num_pairs=args.pairs, disp_range=args.disp_range, seed=args.seed, device=args.device,
        progress=not args.no_progress, lr=args.lr, images_per_step=args.images_per_step,
        diffusion_weight=args.diffusion_weight, threads=args.threads,
        label_weights=None if args.label_weights == "none" else args.label_weights)
    report_training(history, save_features(model, args.out), last=5)
    if args.evaluate:
        before = evaluate_registration(dataset, None)
        after = evaluate_registration(dataset, model, disp_range=args.disp_range)
        print(f"test pairs: mean Dice {before['mean_dice'].nanmean():.3f} before, {after['mean_dice'].nanmean():.3f} "
              f"with the trained CNN; folding {100 * after['folding'].mean():.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
