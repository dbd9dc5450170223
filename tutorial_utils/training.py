"""What both trained networks share: the data of a run, the loop, the schedule, checkpoints, options.

Taught in ``notebooks/04_training.ipynb`` (the feature CNN, :mod:`~tutorial_utils.train`) and
used again in ``notebooks/05_why_discrete.ipynb`` (the U-Net, :mod:`~tutorial_utils.continuous`),
so that the two networks are trained under the same conditions:

* the same data: random groups of ``images_per_step`` slices of ``dataset.train_ids`` only,
  each slice pre-aligned once the way :func:`~tutorial_utils.registration.register_images`
  would start (:func:`_prepare_training_data`), all n(n-1) ordered pairs of a group used;
* the same loop (:func:`train_loop`): Adam, a cosine decay of the learning rate to 5% of
  its start (:func:`cosine_lr`), seeded (:func:`seeded`: deterministic on the CPU, the global
  random state untouched), one loss per step in a :class:`LossHistory`;
* the same CPU settings while training (:func:`_cpu_settings`: one thread, denormals flushed);
* the same files: plain ``state_dict`` checkpoints (:func:`save_state_dict`,
  :func:`load_state_dict`) and the same command-line options (:func:`add_run_arguments`).

Each network brings its own loss: the training loss of a group of slices.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checks import argument_type, check_choice, check_finite, check_int, check_number, check_odd
from .data import Dataset, _slice_ids
from .environment import choose_device
from .prealign import centre_of_mass_shift, moments_affine
from .registration import DEFAULTS as REGISTRATION
from .registration import FEATURE_STRIDE
from .regularisation_fast import REG_KEYS, _check_reg
from .transform import affine_displacement, translation_displacement, warp

__all__ = [
    "LR_FLOOR",
    "TRAINING_PREALIGN",
    "LossHistory",
    "add_run_arguments",
    "add_training_arguments",
    "check_run_arguments",
    "cosine_lr",
    "device_name",
    "load_state_dict",
    "pipeline_defaults",
    "report_training",
    "save_state_dict",
    "seeded",
    "train_loop",
]


def pipeline_defaults() -> dict:
    """The fixed parts of :func:`~tutorial_utils.registration.register_images`, read from its
    :data:`~tutorial_utils.registration.DEFAULTS`: ``{"alpha", "border", "prealign", "reg": {min_kernel, ...}}``
    (what a trained network must fit)."""
    return {"alpha": REGISTRATION.alpha, "border": REGISTRATION.border, "prealign": REGISTRATION.prealign,
            "reg": {key: getattr(REGISTRATION, key) for key in REG_KEYS}}


# =========================================================================== the CPU while training

_DENORMALS = """softmax(-alpha * cost) puts values around 1e-40 on unlikely displacements: denormal
floats, which the CPU multiplies up to a hundred times slower than normal ones. Training on the
CPU therefore flushes denormals to zero (``torch.set_flush_denormal``) while it runs; this
changes nothing measurable (they are below 1.2e-38) and is switched off again afterwards."""

_THREADS = """Training on the CPU uses one thread unless told otherwise (``threads=``). The loop is
made of many operations on small tensors; with two threads, every one of them waits for the
other thread, and when anything else runs on the machine that wait can make training ten times
slower (measured on a busy 2-core machine: 2.2 pairs/s with two threads, 20.7 with one). Pass
``threads=torch.get_num_threads()`` to use them all on an idle machine."""


@contextmanager
def _cpu_settings(device: torch.device, threads: int | None):
    """While training on the CPU: flush denormals (see ``_DENORMALS``) and use ``threads``
    threads (default 1, see ``_THREADS``); both are restored afterwards."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    flushing = torch.set_flush_denormal(True)
    torch.set_num_threads(threads if threads is not None else 1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        if flushing:
            torch.set_flush_denormal(False)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[torch.Generator]:
    """Seed the global random state with ``seed`` for a while (initial weights) and give a
    generator seeded alike (the choice of slices); the global state is restored afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


# =========================================================================== the data of a run

TRAINING_PREALIGN = {None: "none", "none": "none", "com": "com", "moments": "moments", "affine": "moments"}
"""How the training slices are aligned for each ``prealign`` of register_images (see
:func:`_prepare_training_data`): a pairwise affine refinement cannot be done once per slice,
so "affine" trains on slices aligned by their moments."""


def _training_ids(dataset: Dataset, train_ids: Sequence[int] | None) -> list[int]:
    """The slices to train on (default ``dataset.train_ids``): at least 2 indices in 0..N-1 whose
    images are finite (a NaN pixel would make every weight NaN after one step)."""
    ids = list(dataset.train_ids if train_ids is None else _slice_ids("train_ids", train_ids))
    if len(ids) < 2:
        raise ValueError(f"training needs at least 2 training slices, the dataset has {len(ids)}")
    bad = [i for i in ids if not 0 <= i < len(dataset)]
    if bad:
        raise ValueError(f"train_ids must be slice indices in 0..{len(dataset) - 1}, got {bad}")
    check_finite("the training images (dataset.images[train_ids])", dataset.images[ids])
    return ids


def _check_training(seed: int, images_per_step: int, lr: float, diffusion_weight: float,
                    threads: int | None) -> tuple[int, int, float, float, int | None]:
    """The hyper-parameters both trainers share: (seed, images_per_step, lr, diffusion_weight, threads)."""
    return (check_int("seed", seed), check_int("images_per_step", images_per_step, minimum=2),
            check_number("lr", lr, 0, strict_minimum=True), check_number("diffusion_weight", diffusion_weight, 0),
            None if threads is None else check_int("threads", threads, minimum=1))


def _training_prealign(prealign: str | None) -> str | None:
    """How the training slices are aligned, one of :data:`TRAINING_PREALIGN`'s keys; ``"default"``:
    the pre-alignment of :func:`~tutorial_utils.registration.register_images` (:func:`pipeline_defaults`)."""
    prealign = pipeline_defaults()["prealign"] if prealign == "default" else prealign
    check_choice("prealign", prealign, tuple(TRAINING_PREALIGN))
    return prealign


def _pipeline_settings(alpha: float | None, border: str | None, prealign: str | None, reg: dict) -> tuple:
    """``(alpha, border, prealign, reg)`` of the fixed blocks a feature CNN is trained through, checked,
    with register_images' values (:func:`pipeline_defaults`) where not given."""
    defaults = pipeline_defaults()
    alpha = check_number("alpha", defaults["alpha"] if alpha is None else alpha, 0, strict_minimum=True)
    border = check_choice("border", defaults["border"] if border is None else border, ("replicate", "zeros"))
    prealign = _training_prealign(prealign)
    unknown = sorted(set(reg) - set(REG_KEYS))
    if unknown:
        raise TypeError(f"train_features() got unexpected keyword arguments {unknown}")
    reg = {**defaults["reg"], **reg}
    _check_reg(*(reg[key] for key in REG_KEYS))
    return alpha, border, prealign, reg


def _prepare_training_data(dataset: Dataset, ids: Sequence[int], prealign: str | None, device: torch.device,
                           stride: int = FEATURE_STRIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 1, H, W] and one-hot labels at 1/``stride`` resolution [N, L, h, w] of ``ids``.

    The pre-alignment of :func:`~tutorial_utils.registration.register_images` is pairwise;
    here every slice is aligned once, so that one CNN pass serves all the pairs it is in:
    ``"com"`` translates each slice (and its labels) so that its intensity centre of mass
    lies at the image centre (the centre of mass of a uniform image:
    :func:`~tutorial_utils.prealign.centre_of_mass_shift` onto one; an empty slice stays
    where it is); ``"moments"`` (also used for "affine") maps each slice onto the first one
    by its centre of mass and principal axes (rotation, isotropic scale, translation). Any
    two slices are then aligned with each other as the pairwise pre-alignment would align
    them (up to the affine refinement).
    """
    if prealign not in TRAINING_PREALIGN:
        raise ValueError(f"prealign must be one of {sorted(k for k in TRAINING_PREALIGN if k)} or None, "
                         f"got {prealign!r}")
    mode = TRAINING_PREALIGN[prealign]
    index = torch.as_tensor(list(ids), dtype=torch.long)
    images = dataset.images[index].to(device)  # [N, 1, H, W]
    onehot = F.one_hot(dataset.labels[index].to(device), dataset.num_labels).permute(0, 3, 1, 2).float()
    H, W = images.shape[-2:]
    field = None
    if mode == "com":
        shift = centre_of_mass_shift(torch.ones_like(images), images)  # [N, 2]: look this far away to centre
        field = translation_displacement(shift, (H, W))  # [N, 2, H, W]
    elif mode == "moments":
        reference = images[:1].expand_as(images)
        field = affine_displacement(moments_affine(reference, images), (H, W))  # [N, 2, H, W]
    if field is not None:
        images = warp(images, field)
        onehot = warp(onehot, field)  # border padding: the edge labels continue outward
    return images, F.avg_pool2d(onehot, stride)  # [N, 1, H, W], [N, L, h, w]


# =========================================================================== the loop


class LossHistory(list):
    """The training loss, one float per optimisation step, with what the run measured.

    Attributes: ``pairs_per_step``, ``pairs`` (in all), ``seconds`` (wall time of the loop),
    ``pairs_per_second``, ``settings`` (the arguments of the run).
    """

    pairs_per_step: int = 0
    pairs: int = 0
    seconds: float = 0.0
    settings: dict

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else float("nan")


LR_FLOOR = 0.05
"""The cosine schedule decays the learning rate to this fraction of its start."""


def cosine_lr(lr: float, progress: float) -> float:
    """The learning rate at ``progress`` (0: the start, 1: the end of training): a cosine decay
    from ``lr`` to ``LR_FLOOR * lr``."""
    low = LR_FLOOR * lr
    return low + (lr - low) * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def train_loop(model: nn.Module, group_loss: Callable[[torch.Tensor], torch.Tensor], *, num_slices: int,
               images_per_step: int, lr: float, generator: torch.Generator, device: torch.device,
               steps: int | None = None, seconds: float | None = None, threads: int | None = None,
               progress: bool = True, desc: str = "training", schedule: str = "cosine",
               settings: dict | None = None) -> LossHistory:
    """Train ``model`` in place with Adam until ``steps`` steps or ``seconds`` seconds are done.

    Every step draws ``images_per_step`` = n of the ``num_slices`` slices (``generator``),
    takes ``group_loss(chosen)`` (chosen: int [n] on ``device``; the mean loss of their
    n(n-1) ordered pairs) and one Adam step. The learning rate follows :func:`cosine_lr` of
    the fraction of steps or seconds done, whichever is further along (``schedule="cosine"``),
    or torch's ``CosineAnnealingLR`` over ``steps`` (``schedule="torch"``: the same curve,
    computed step by step, so its values differ in the last bits; the feature CNN's shipped
    checkpoint was made with it). BatchNorm uses each step's slices; the model is left in
    ``eval()`` mode. CPU settings: :func:`_cpu_settings` (``threads``). Returns the
    :class:`LossHistory` (``settings`` attached).
    """
    from tqdm.auto import tqdm

    if schedule not in ("cosine", "torch") or (schedule == "torch" and steps is None):
        raise ValueError(f"schedule must be 'cosine', or 'torch' with a number of steps; got {schedule!r}")
    n = images_per_step
    history = LossHistory()
    history.pairs_per_step = pairs_per_step = n * (n - 1)
    history.settings = dict(settings or {})
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps, eta_min=LR_FLOOR * lr)
                 if schedule == "torch" else None)
    model.train()
    off = {} if progress else {"disable": True}  # progress=True leaves disable unset, so TQDM_DISABLE=1 still works
    bar = tqdm(total=steps * pairs_per_step if steps is not None else None, unit="pairs", desc=desc, **off)
    running, step = None, 0
    with _cpu_settings(device, threads):
        start = time.perf_counter()
        while True:
            elapsed = time.perf_counter() - start
            if (steps is not None and step >= steps) or (seconds is not None and elapsed >= seconds):
                break
            if scheduler is None:
                fraction = max(step / steps if steps else 0.0, elapsed / seconds if seconds else 0.0)
                for group in optimiser.param_groups:
                    group["lr"] = cosine_lr(lr, fraction)
            chosen = torch.randperm(num_slices, generator=generator)[:n].to(device)  # [n]
            loss = group_loss(chosen)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            history.append(float(loss.detach()))
            running = history[-1] if running is None else 0.9 * running + 0.1 * history[-1]
            bar.update(pairs_per_step)
            bar.set_postfix(loss=f"{running:.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        history.seconds = time.perf_counter() - start
    history.pairs = step * pairs_per_step
    bar.close()
    model.eval()
    return history


# =========================================================================== checkpoints


def save_state_dict(model: nn.Module, path: str | Path) -> Path:
    """Save the model's weights as a plain ``state_dict`` (tensors only, on the CPU), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_state_dict(model: nn.Module, path: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """Load the weights of ``model`` from a ``state_dict`` file (``weights_only=True``: tensors
    only, no code runs) and return it in ``eval()`` mode on ``device`` (default: the CPU)."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state_dict of "
                         f"{type(model).__name__} weights")
    model.load_state_dict(state)
    return model.to(device if device is not None else "cpu").eval()


# =========================================================================== command-line options


# argparse types: a bad value gets argparse's usage line, the check's message and exit status 2
positive_int = argument_type(check_int, minimum=1)
"""An integer >= 1 on the command line (``type=positive_int``)."""
non_negative_int = argument_type(check_int, minimum=0)
"""An integer >= 0 on the command line."""
odd_int = argument_type(check_odd)
"""An odd integer >= 1 on the command line (a window such as ``--disp-range``)."""
positive_float = argument_type(check_number, float, minimum=0, strict_minimum=True)
"""A finite number > 0 on the command line."""
non_negative_float = argument_type(check_number, float, minimum=0)
"""A finite number >= 0 on the command line."""


def device_name(text: str) -> str:
    """A device on the command line ("cpu", "cuda", "cuda:1"), checked with ``choose_device``."""
    try:
        choose_device(text)
    except (RuntimeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_training_arguments(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """The hyper-parameters every training command shares, with the trainer's ``defaults``: seed,
    learning rate, slices per step, diffusion weight."""
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the pairs (default 0)")
    parser.add_argument("--lr", type=positive_float, default=defaults["lr"],
                        help=f"Adam learning rate (default {defaults['lr']})")
    parser.add_argument("--images-per-step", type=argument_type(check_int, minimum=2),
                        default=defaults["images_per_step"],
                        help=f"slices per step, all their ordered pairs are used (default {defaults['images_per_step']})")
    parser.add_argument("--diffusion-weight", type=non_negative_float, default=defaults["diffusion_weight"],
                        help=f"weight of the diffusion penalty (default {defaults['diffusion_weight']})")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every training command shares: device, data, threads, evaluation, progress bar."""
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--source", choices=["auto", "tcia", "synthetic"], default=None,
                        help="data: the real slices, the phantom, or auto (default: $L2R_DATA_SOURCE, else auto)")
    parser.add_argument("--data-seed", type=non_negative_int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for training (default 1) and evaluation (default: torch's)")
    parser.add_argument("--evaluate", action="store_true", help="then print the test pairs' Dice and folding")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What every training command does first: refuse an ``--out`` that is a folder and give the
    evaluation ``--threads`` threads (training is told them by ``threads=``)."""
    if args.out is not None and args.out.is_dir():
        parser.error(f"--out must be a file to write, but {args.out} is a folder")
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def report_training(history: LossHistory, path: Path, last: int) -> None:
    """Print what a training command did: pairs, time, the loss from the first step to the mean of
    the ``last`` steps, and the file it wrote."""
    tail = history[-last:]
    print(f"trained on {history.pairs} pairs in {history.seconds:.1f} s ({history.pairs_per_second:.1f} pairs/s), "
          f"loss {history[0]:.4f} -> {sum(tail) / len(tail):.4f} (mean of the last {len(tail)} steps)")
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB)")
