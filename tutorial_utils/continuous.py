"""The continuous baseline: a U-Net that regresses the displacement, trained like the feature CNN.

Taught in notebook 05 ("Why discrete?"). VoxelMorph-style registration networks
(Balakrishnan et al. 2019) map the image pair directly to a dense displacement; here the
:class:`~tutorial_utils.models.DisplacementUNet` plays that part, under conditions that are
as close as possible to those of the discrete network of :mod:`~tutorial_utils.train`:

* the same weak supervision and the same loop (:mod:`~tutorial_utils.training`): random
  ordered pairs of ``dataset.train_ids`` only, the organ labels (no correspondences), the
  same slices pre-aligned the same way (``pipeline_defaults()["prealign"]``),
  ``images_per_step`` slices per step and all their n(n-1) ordered pairs, Adam with a
  cosine decay to 5% of ``lr`` (:func:`~tutorial_utils.training.train_loop`);
* the loss: the moving one-hot labels (full resolution) are warped bilinearly with the
  predicted field and compared with the fixed ones (:func:`~tutorial_utils.losses.label_loss`:
  by default the squared difference summed over the labels, background included, as in the
  discrete network's loss; soft Dice is the alternative), plus ``diffusion_weight`` times
  :func:`~tutorial_utils.losses.diffusion_penalty` of the field;
* at test time :func:`register_unet` starts from the same pre-alignment as
  :func:`~tutorial_utils.registration.register_images` and composes the two fields.

The shipped checkpoint (:data:`UNET_CHECKPOINT`) had the same training budget (CPU time) as
the shipped feature CNN; how it was made is in ``checkpoints/README.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .checks import check_choice, check_image_pair, check_int, check_number
from .data import Dataset, _check_dataset
from .environment import choose_device
from .evaluation import evaluate_registration
from .losses import LABEL_LOSSES, diffusion_penalty, label_loss
from .models import DisplacementUNet
from .prealign import PREALIGN_MODES, prealign_displacement
from .training import (
    LossHistory,
    _check_training,
    _prepare_training_data,
    _training_ids,
    _training_prealign,
    add_run_arguments,
    add_training_arguments,
    check_run_arguments,
    load_state_dict,
    pipeline_defaults,
    positive_float,
    positive_int,
    report_training,
    save_state_dict,
    seeded,
    train_loop,
)
from .transform import compose_displacements, warp

__all__ = [
    "DEFAULTS",
    "DEFAULT_PAIRS",
    "UNET_CHECKPOINT",
    "load_unet",
    "main",
    "measure_rates",
    "register_unet",
    "save_unet",
    "train_unet",
    "unet_loss",
]

UNET_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "unet_synthetic.pt"
"""The U-Net shipped with the package (a ``state_dict`` of a default
:class:`~tutorial_utils.models.DisplacementUNet`, see :func:`load_unet` and ``checkpoints/README.md``)."""

DEFAULT_PAIRS = 3000
"""Training pairs of the default run (as for the feature CNN)."""

DEFAULTS: dict = {
    "lr": 3e-3,
    "diffusion_weight": 0.2,
    "images_per_step": 4,
    "loss": "mse",
}
"""The defaults of :func:`train_unet`, chosen on held-out *training* slices, never on the test
pairs (on phantom version 1, with the Dice over the organs in either slice; kept for version 2):
trained on 30 of the 35 training slices with the budget of the shipped checkpoint
(16000 pairs), measured on the 20 ordered pairs of the other 5 (mean Dice; 0.383 without
registration, 0.419 after the affine pre-alignment alone, 0.454 with MIND-SSC):

* loss "mse" (the discrete network's loss, squared one-hot difference with background)
  0.525 +- 0.001 over 3 seeds (lr 3e-3, diffusion 0.2, folding 0.17-0.35%); soft Dice at
  lr 3e-3, diffusion 0.1: 0.507 and 0.521 (2 seeds), "mse" at the same settings 0.529,
  0.503, 0.526 (3 seeds, folding ~1%);
* diffusion weight (mse, lr 3e-3): 0.03 -> 0.519 with 4.2% folding; 0.1 -> ~0.52, ~1%;
  0.2 -> 0.525, 0.3%; 0.3 -> 0.507, 0.09%;
* lr: 1e-3 -> 0.506, 2e-3 -> 0.508-0.523, 3e-3 -> best; 1e-2 diverged (as did a
  16-32-64-64 U-Net and one seed of a 5-level one at 3e-3);
* architecture (each with its equal-budget number of pairs: the rate on the CPU relative
  to the default): the flow at 1/2 instead of 1/4 resolution (0.510-0.519, 9500 pairs),
  32 channels everywhere (0.507), 5 levels (0.465-0.529, unstable), fewer channels
  (0.503), the flow at 1/8 (0.494): none better than the default;
* ``images_per_step`` 2 or 3: 0.526, 0.523 (slower per pair); 8: 0.491.

Several of these runs were made on a GPU (same code, ``device="cuda"``) to fit the search
in the time available; the shipped checkpoint was trained on the CPU."""


# =========================================================================== the loss


def unet_loss(model: nn.Module, images: torch.Tensor, onehot: torch.Tensor, diffusion_weight: float = 0.0,
              loss: str = "mse") -> torch.Tensor:
    """Training loss of a group of n slices: the U-Net on all n(n-1) ordered pairs at once.

    Args:
        model: (image_fixed, image_moving) [P, 1, H, W] -> displacement [P, 2, H, W].
        images: [n, 1, H, W]. onehot: [n, L, H, W] one-hot labels (full resolution).

    Returns:
        a scalar: mean over the pairs of :func:`~tutorial_utils.losses.label_loss` (the moving
        one-hot maps warped bilinearly with the predicted field, border padding) plus
        ``diffusion_weight`` times :func:`~tutorial_utils.losses.diffusion_penalty` of the
        field (image pixels).
    """
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"unet_loss needs at least 2 images, got {n}")
    index = torch.arange(n, device=images.device)
    fixed, moving = torch.meshgrid(index, index, indexing="ij")
    keep = fixed != moving
    fixed, moving = fixed[keep], moving[keep]  # [n(n-1)] each
    displacement = model(images[fixed], images[moving])  # [P, 2, H, W]
    warped = warp(onehot[moving], displacement)  # [P, L, H, W]
    value = label_loss(warped, onehot[fixed], loss).mean()
    if diffusion_weight:
        value = value + diffusion_weight * diffusion_penalty(displacement)
    return value


# =========================================================================== training


def train_unet(dataset: Dataset, num_pairs: int | None = None, seconds: float | None = None, seed: int = 0,
               device: str | torch.device | None = None, progress: bool = True, *, lr: float = DEFAULTS["lr"],
               diffusion_weight: float = DEFAULTS["diffusion_weight"],
               images_per_step: int = DEFAULTS["images_per_step"], loss: str = DEFAULTS["loss"],
               prealign: str | None = "default", train_ids: Sequence[int] | None = None, threads: int | None = None,
               model: nn.Module | None = None) -> tuple[nn.Module, LossHistory]:
    """Train a :class:`~tutorial_utils.models.DisplacementUNet` on random pairs of training slices.

    The weak supervision of :func:`~tutorial_utils.train.train_features`: every step draws
    ``images_per_step`` training slices (``dataset.train_ids`` only), pre-aligned once per
    slice exactly as there, and uses all n(n-1) ordered pairs among them as one batch;
    the loss is :func:`unet_loss`. The loop of the feature CNN
    (:func:`~tutorial_utils.training.train_loop`): Adam, cosine decay of the learning rate
    to 5% of ``lr``. Deterministic on the CPU for a given ``seed`` and ``num_pairs`` (the global
    random state is left untouched); denormals flushed and ``threads`` threads (default 1)
    while it runs, as in ``train_features``.

    Args:
        dataset: any :class:`~tutorial_utils.data.Dataset` whose H, W are divisible by the
            U-Net's total stride (16 for the default).
        num_pairs: training pairs (rounded up to whole steps). Default: :data:`DEFAULT_PAIRS`
            unless ``seconds`` is given.
        seconds: a wall-clock budget: training stops at the first step that ends after it,
            and the learning rate follows the elapsed fraction of the budget instead of the
            fraction of pairs (with both given: whichever is further along). Not
            deterministic: use ``num_pairs`` for reproducible runs.
        seed: seeds the initial weights and the choice of slices.
        device: "cpu" / "cuda"; default CUDA when present, else the CPU.
        progress: a tqdm bar with the running loss.
        lr: Adam's initial learning rate. diffusion_weight: weight of the diffusion penalty.
        images_per_step: slices per step (n, at most the number of training slices).
        loss: "mse" (squared one-hot difference, background included) or "dice" (soft
            Dice over the foreground labels), see :func:`~tutorial_utils.losses.label_loss`.
        prealign: how the training slices are aligned once per slice ("none", "com",
            "moments"; "affine" means "moments"); default: register_images' pre-alignment.
        train_ids: slices to train on (default ``dataset.train_ids``).
        threads: CPU threads while training (default 1, restored afterwards).
        model: a model to go on training (default: a fresh ``DisplacementUNet()``).

    Returns:
        ``(model, history)``: the model (on ``device``, eval mode) and a
        :class:`~tutorial_utils.training.LossHistory` (one loss per step, pairs, seconds).
    """
    _check_dataset(dataset)
    if seconds is not None:
        seconds = check_number("seconds", seconds, 0, strict_minimum=True)
    if num_pairs is None and seconds is None:
        num_pairs = DEFAULT_PAIRS
    if num_pairs is not None:
        num_pairs = check_int("num_pairs", num_pairs, minimum=1)
    ids = _training_ids(dataset, train_ids)
    seed, images_per_step, lr, diffusion_weight, threads = _check_training(
        seed, images_per_step, lr, diffusion_weight, threads)
    check_choice("loss", loss, LABEL_LOSSES)
    prealign = _training_prealign(prealign)
    device = choose_device(str(device)) if device is not None else choose_device()
    n = min(images_per_step, len(ids))
    steps = -(-num_pairs // (n * (n - 1))) if num_pairs is not None else None

    with seeded(seed, device) as generator:
        model = (model if model is not None else DisplacementUNet()).to(device)
        stride = getattr(model, "total_stride", 1)
        H, W = dataset.image_size
        if H % stride or W % stride:
            raise ValueError(f"the images ({H}x{W}) must be divisible by the U-Net's total stride {stride}")
        images, onehot = _prepare_training_data(dataset, ids, prealign, device, stride=1)  # [N,1,H,W], [N,L,H,W]
        settings = {"num_pairs": num_pairs, "seconds": seconds, "seed": seed, "device": str(device), "lr": lr,
                    "diffusion_weight": diffusion_weight, "images_per_step": n, "loss": loss, "prealign": prealign,
                    "steps": steps, "threads": threads, "channels": getattr(model, "channels", None),
                    "flow_level": getattr(model, "flow_level", None)}

        def group_loss(chosen: torch.Tensor) -> torch.Tensor:
            return unet_loss(model, images[chosen], onehot[chosen], diffusion_weight, loss)

        history = train_loop(model, group_loss, num_slices=len(ids), images_per_step=n, lr=lr,
                             generator=generator, device=device, steps=steps, seconds=seconds, threads=threads,
                             progress=progress, desc="training the U-Net", schedule="cosine", settings=settings)
    return model, history


def measure_rates(dataset: Dataset, num_pairs: int = 240, threads: int | None = 1, seed: int = 0,
                  device: str | torch.device | None = "cpu", repeats: int = 2, **unet_kwargs) -> dict:
    """Training speed of the feature CNN and of the U-Net, measured back to back in this process.

    Runs :func:`~tutorial_utils.train.train_features` and :func:`train_unet` (their
    defaults, ``threads`` threads) for ``num_pairs`` pairs each, alternating, ``repeats``
    times, and returns ``{"cnn": pairs/s, "unet": pairs/s, "ratio": unet / cnn}`` (all pairs
    over all seconds of each). Measured together and interleaved because only the ratio is
    robust when other programs share the machine: the U-Net gets the training budget of a
    feature CNN trained on P pairs with ``round(P * ratio)`` pairs.
    """
    from .train import train_features

    pairs = {"cnn": 0, "unet": 0}
    seconds = {"cnn": 0.0, "unet": 0.0}
    for _ in range(repeats):
        _, cnn = train_features(dataset, num_pairs=num_pairs, seed=seed, device=device, progress=False,
                                threads=threads)
        _, unet = train_unet(dataset, num_pairs=num_pairs, seed=seed, device=device, progress=False,
                             threads=threads, **unet_kwargs)
        for name, history in (("cnn", cnn), ("unet", unet)):
            pairs[name] += history.pairs
            seconds[name] += history.seconds
    rates = {name: pairs[name] / seconds[name] for name in pairs}
    return {**rates, "ratio": rates["unet"] / rates["cnn"]}


# =========================================================================== registration


def register_unet(model: nn.Module, image_fixed: torch.Tensor, image_moving: torch.Tensor,
                  prealign: str | None = "default") -> torch.Tensor:
    """Register ``image_moving`` to ``image_fixed`` with the U-Net, after the usual pre-alignment.

    1. the pre-alignment of :func:`~tutorial_utils.registration.register_images`
       (:func:`~tutorial_utils.prealign.prealign_displacement`; ``"default"`` is
       register_images' default, "affine");
    2. the U-Net on the fixed and the pre-aligned moving image;
    3. the two fields composed (:func:`~tutorial_utils.transform.compose_displacements`).

    Runs under ``torch.no_grad()`` and puts the model in eval mode. The images are moved to
    the model's device; the result stays there.

    Args:
        model: (image_fixed, image_moving) [B, 1, H, W] -> displacement [B, 2, H, W].
        image_fixed, image_moving: [B, 1, H, W] float in [0, 1].

    Returns:
        displacement [B, 2, H, W] (dy, dx) in image pixels: ``warp(image_moving, displacement)``
        is aligned with ``image_fixed``.
    """
    check_image_pair(image_fixed, image_moving)  # [B, 1, H, W] each, same device, finite
    prealign = pipeline_defaults()["prealign"] if prealign == "default" else prealign
    check_choice("prealign", prealign, (*PREALIGN_MODES, None))
    parameter = next(iter(model.parameters()), None)
    if parameter is not None:
        image_fixed, image_moving = image_fixed.to(parameter.device), image_moving.to(parameter.device)
    model.eval()
    with torch.no_grad():
        pre = prealign_displacement(image_fixed, image_moving, prealign)  # [B, 2, H, W]
        if prealign in (None, "none"):
            return model(image_fixed, image_moving)
        residual = model(image_fixed, warp(image_moving, pre))  # [B, 2, H, W]
        return compose_displacements(pre, residual)


# =========================================================================== saving and loading


def save_unet(model: nn.Module, path: str | Path) -> Path:
    """Save the U-Net's weights as a plain ``state_dict`` (tensors only, on the CPU), atomically
    (:func:`~tutorial_utils.training.save_state_dict`)."""
    return save_state_dict(model, path)


def load_unet(path: str | Path | None = None, device: str | torch.device | None = None) -> DisplacementUNet:
    """A default :class:`~tutorial_utils.models.DisplacementUNet` with weights from a ``state_dict`` file.

    ``path`` defaults to the shipped :data:`UNET_CHECKPOINT`. Loaded with
    ``weights_only=True`` (no code runs). Returns the model in eval mode on ``device``
    (default: the CPU).
    """
    return load_state_dict(DisplacementUNet(), UNET_CHECKPOINT if path is None else path, device)


# =========================================================================== command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tutorial_utils.continuous",
        description="Train the continuous baseline (a U-Net that regresses the displacement) with the "
                    "organ labels and save its state_dict; or measure its training speed against the "
                    "feature CNN's.")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--pairs", type=positive_int, default=None, help=f"training pairs (default {DEFAULT_PAIRS})")
    budget.add_argument("--seconds", type=positive_float, default=None,
                        help="train for this wall-clock time instead (not reproducible)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the state_dict (.pt)")
    parser.add_argument("--measure-budget", type=positive_int, default=None, metavar="CNN_PAIRS",
                        help="measure the training speed of both networks back to back and print how many "
                             "U-Net pairs take as long as CNN_PAIRS pairs of the feature CNN; then exit")
    parser.add_argument("--measure-pairs", type=positive_int, default=240,
                        help="pairs per network and repeat for --measure-budget (default 240)")
    parser.add_argument("--measure-repeats", type=positive_int, default=2,
                        help="alternating runs of both networks for --measure-budget (default 2)")
    add_training_arguments(parser, DEFAULTS)
    parser.add_argument("--loss", choices=LABEL_LOSSES, default=DEFAULTS["loss"], help=f"label loss (default: {DEFAULTS['loss']})")
    add_run_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .data import load_dataset

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.measure_budget is None and args.out is None:
        parser.error("--out is required (unless --measure-budget is given)")
    check_run_arguments(parser, args)
    dataset = load_dataset(source=args.source, seed=args.data_seed)
    print(f"data: {dataset}")
    unet_kwargs = dict(lr=args.lr, diffusion_weight=args.diffusion_weight, images_per_step=args.images_per_step,
                       loss=args.loss)
    if args.measure_budget is not None:
        rates = measure_rates(dataset, args.measure_pairs, threads=args.threads if args.threads else 1,
                              seed=args.seed, device=args.device or "cpu", repeats=args.measure_repeats,
                              **unet_kwargs)
        pairs = round(args.measure_budget * rates["ratio"])
        print(f"training speed, measured back to back ({args.measure_repeats} x {args.measure_pairs} pairs each): "
              f"feature CNN "
              f"{rates['cnn']:.1f} pairs/s, U-Net {rates['unet']:.1f} pairs/s (ratio {rates['ratio']:.3f})")
        print(f"the budget of {args.measure_budget} feature-CNN pairs is --pairs {pairs} for the U-Net")
        return 0
    model, history = train_unet(dataset, num_pairs=args.pairs, seconds=args.seconds, seed=args.seed,
                                device=args.device, progress=not args.no_progress, threads=args.threads,
                                **unet_kwargs)
    report_training(history, save_unet(model, args.out), last=20)
    if args.evaluate:
        before = evaluate_registration(dataset, None)
        after = evaluate_registration(dataset, register=lambda f, m: register_unet(model, f, m))
        scored = after["mean_dice"][after["mean_dice"].isfinite()]  # pairs with an organ in both slices
        print(f"test pairs: mean Dice {before['mean_dice'].nanmean():.3f} before, {after['mean_dice'].nanmean():.3f} "
              f"+- {scored.std():.3f} with the U-Net; folding {100 * after['folding'].mean():.2f}%, "
              f"{after['seconds_per_pair']:.3f} s per pair")
    return 0


if __name__ == "__main__":
    sys.exit(main())
