"""The 2019 tutorial's training, complete: its loss and its loop, as the reference of ours.

Taught in ``notebooks/04_training.ipynb`` (what changed since 2019, and how much faster the
training loop of :mod:`~tutorial_utils.train` is; ``python -m benchmarks.training``
measures it). The 2019 loop ran one pair at a time, the CNN twice per pair, the
unfold correlation layer, the slides' pooling modules and an unfolded label tensor:
:func:`loss_2019` is one pair's loss as the 2019 notebook computed it, :func:`train_features_2019`
the loop, :data:`TRAIN_DEFAULTS_2019` every setting of both (the registration part is
:data:`~tutorial_utils.registration.DEFAULTS_2019` itself), and
:func:`train_features_settings_2019` the 2019 settings that :func:`~tutorial_utils.train.train_features`
can take (the like-for-like speed comparison).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_odd
from .correlation import correlation_unfold
from .data import Dataset
from .environment import choose_device
from .models import FeatureCNN
from .registration import DEFAULTS_2019
from .regularisation import normalise_cost
from .regularisation_fast import REG_KEYS
from .training import LossHistory, _cpu_settings, seeded

__all__ = ["TRAIN_DEFAULTS_2019", "loss_2019", "train_features_2019", "train_features_settings_2019"]

TRAIN_DEFAULTS_2019: dict = {
    **DEFAULTS_2019.as_dict(),  # disp_range 9 and the rest of the 2019 registration
    "label_downsampling": "bilinear",
    "num_pairs": 50,
    "lr": 2.5e-4,
    "accumulate": 4,
}
"""The complete 2019 training loop (:func:`loss_2019`, :func:`train_features_2019`).

The registration part is :data:`~tutorial_utils.registration.DEFAULTS_2019` itself (zero
padding of the unfold correlation, the raw SSD, the slides' min-convolution and mean field,
``softmax(-10 * cost)``; its ``upsample_mode`` is not used by the loss, and ``prealign`` /
``refine_range`` must stay "none" / None: the loop trains on the slices as they are), plus:

* ``disp_range=9``: D x D = 9 x 9 displacements (+-4 feature pixels);
* ``label_downsampling="bilinear"``: the one-hot labels of both images are bilinearly
  downsampled to 1/4 (``F.interpolate``, ``align_corners=False``); the moving ones are then
  unfolded over the same D x D window (zero padding) and weighted with the probabilities;
  the loss is the mean over the pixels of the squared difference summed over the labels;
* ``num_pairs=50`` random training pairs, one at a time; Adam with ``lr=2.5e-4``; the
  gradient accumulated over ``accumulate=4`` pairs.
"""

_LOOP_KEYS_2019 = ("num_pairs", "lr", "accumulate")


def _settings_2019(settings: dict | None = None, **overrides) -> dict:
    """:data:`TRAIN_DEFAULTS_2019`, updated by ``settings`` and then by the ``overrides`` that are not None."""
    resolved = dict(TRAIN_DEFAULTS_2019)
    if settings is not None:
        unknown = sorted(set(settings) - set(TRAIN_DEFAULTS_2019))
        if unknown:
            raise ValueError(f"unknown settings of the 2019 loop: {unknown}; known: {sorted(TRAIN_DEFAULTS_2019)}")
        resolved.update(settings)
    resolved.update({key: value for key, value in overrides.items() if value is not None})
    D = check_odd("disp_range", resolved["disp_range"])
    for name in ("min_kernel", "avg_kernel", "meanfield_kernel"):
        check_odd(name, resolved[name])
    for name in ("meanfield_iterations", "meanfield_passes"):
        if isinstance(resolved[name], bool) or not isinstance(resolved[name], int) or resolved[name] < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {resolved[name]!r}")
    if not resolved["alpha"] > 0:
        raise ValueError(f"alpha must be > 0, got {resolved['alpha']!r}")
    choices = {"min_order": ("first", "last"), "border": ("zeros", "replicate"),
               "label_downsampling": ("bilinear", "area")}
    for name, allowed in choices.items():
        if resolved[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {resolved[name]!r}")
    if resolved["prealign"] not in (None, "none") or resolved["refine_range"] is not None:
        raise ValueError("the 2019 loop trains on the slices as they are: prealign must be 'none' and "
                         f"refine_range None, got {resolved['prealign']!r} and {resolved['refine_range']!r}")
    resolved["disp_range"] = D
    return resolved


def _regularise_2019(ssd: torch.Tensor, disp_range: int, settings: dict | None = None) -> torch.Tensor:
    """The 2019 regulariser as on the slides (pooling modules, [1, D*D, h, w] only).

    With the kernels of ``settings`` (default :data:`TRAIN_DEFAULTS_2019`: ``minconv =
    Sequential(ReplicationPad2d(5), AvgPool2d(5), AvgPool2d(5), MaxPool2d(3))`` applied as
    ``-minconv(-cost)`` over the D x D displacements, then ``meanfield =
    Sequential(ReplicationPad2d(6), AvgPool2d(5) x 3)`` over the pixels)."""
    s = TRAIN_DEFAULTS_2019 if settings is None else settings
    D = disp_range
    _, _, h, w = ssd.shape
    min_kernel, avg_kernel, passes, kernel = (s["min_kernel"], s["avg_kernel"], s["meanfield_passes"],
                                              s["meanfield_kernel"])
    pad1 = nn.ReplicationPad2d(((min_kernel - 1) + 2 * (avg_kernel - 1)) // 2)
    pad2 = nn.ReplicationPad2d(passes * (kernel - 1) // 2)
    avg1, max1 = nn.AvgPool2d(avg_kernel, stride=1), nn.MaxPool2d(min_kernel, stride=1)
    pools = [avg1, avg1, max1] if s["min_order"] == "last" else [max1, avg1, avg1]
    minconv = nn.Sequential(pad1, *pools)
    meanfield = nn.Sequential(pad2, *[nn.AvgPool2d(kernel, stride=1)] * passes)
    cost = ssd
    for _ in range(s["meanfield_iterations"]):
        ssd_minconv = -minconv(-cost.permute(0, 2, 3, 1).reshape(1, -1, D, D))  # [1, h*w, D, D]
        cost = meanfield(ssd_minconv.permute(0, 2, 3, 1).reshape(1, -1, h, w))  # [1, D*D, h, w]
    return cost


def loss_2019(model: nn.Module, image_fixed: torch.Tensor, image_moving: torch.Tensor, labels_fixed: torch.Tensor,
              labels_moving: torch.Tensor, num_labels: int, disp_range: int | None = None,
              alpha: float | None = None, *, settings: dict | None = None) -> torch.Tensor:
    """One pair's loss as the 2019 notebook computed it (for comparison and the benchmark).

    The CNN once per image (batch 1), the unfold correlation layer (zero padding), the raw
    SSD, the slides' regulariser, ``softmax(-alpha * cost)``, one-hot labels downsampled
    bilinearly to 1/4, the moving ones unfolded over the D x D window (zero padding), the
    squared difference summed over the labels and averaged over the pixels. Images
    [1, 1, H, W], labels [1, H, W].

    Every setting comes from :data:`TRAIN_DEFAULTS_2019` (which holds
    :data:`~tutorial_utils.registration.DEFAULTS_2019`), updated by ``settings`` (a dict
    with some of its keys) and then by ``disp_range`` / ``alpha`` when they are given.
    """
    s = _settings_2019(settings, disp_range=disp_range, alpha=alpha)
    D = s["disp_range"]
    r = (D - 1) // 2
    feat_fixed = model(image_fixed)  # [1, C, h, w]
    feat_moving = model(image_moving)
    h, w = feat_fixed.shape[-2:]
    if s["border"] == "zeros":  # the layer's own zero padding, as in 2019
        ssd = correlation_unfold(feat_fixed, feat_moving, D)  # [1, D*D, h, w]
    else:  # the moving features continued with their edge values (as register_images' "replicate")
        padded = [F.pad(f, (r,) * 4, mode="replicate") for f in (feat_fixed, feat_moving)]
        ssd = correlation_unfold(*padded, D)[..., r:r + h, r:r + w]
    if s["normalise"]:
        ssd = normalise_cost(ssd)
    soft_cost = torch.softmax(-s["alpha"] * _regularise_2019(ssd, D, s), dim=1)  # [1, D*D, h, w]

    def onehot_low(labels):  # [1, H, W] -> [1, L, h, w]
        onehot = F.one_hot(labels.long(), num_labels).permute(0, 3, 1, 2).to(soft_cost.dtype)
        if s["label_downsampling"] == "area":
            return F.interpolate(onehot, size=(h, w), mode="area")
        return F.interpolate(onehot, size=(h, w), mode="bilinear", align_corners=False)

    moving_unfold = F.unfold(onehot_low(labels_moving), (D, D), padding=r)  # zero padding
    moving_unfold = moving_unfold.view(1, num_labels, D * D, h * w)
    warped = (moving_unfold * soft_cost.view(1, 1, D * D, h * w)).sum(2).view(1, num_labels, h, w)
    return ((warped - onehot_low(labels_fixed)) ** 2).sum(1).mean()


def train_features_2019(dataset: Dataset, num_pairs: int | None = None, disp_range: int | None = None, seed: int = 0,
                        device: str | torch.device | None = None, progress: bool = True, *,
                        model: nn.Module | None = None, lr: float | None = None,
                        accumulate: int | None = None, threads: int | None = None,
                        settings: dict | None = None) -> tuple[nn.Module, LossHistory]:
    """The 2019 training loop: one random training pair at a time, Adam (lr 2.5e-4), the
    gradient accumulated over ``accumulate`` (4) pairs, :func:`loss_2019`. Kept as the baseline
    of ``python -m benchmarks.training``. On the CPU, denormals are flushed and
    ``threads`` threads used (default 1) as in :func:`~tutorial_utils.train.train_features`, so that a comparison
    measures the loops and not these settings.

    The settings (``num_pairs``, ``disp_range``, ``lr``, ``accumulate`` and the pipeline) are
    those of :data:`TRAIN_DEFAULTS_2019`, updated by ``settings`` and then by the arguments
    that are given (not None). Returns ``(model, history)`` with one loss per pair."""
    from tqdm.auto import tqdm

    s = _settings_2019(settings, num_pairs=num_pairs, disp_range=disp_range, lr=lr, accumulate=accumulate)
    num_pairs, lr, accumulate = (s[key] for key in _LOOP_KEYS_2019)
    for name, value in (("num_pairs", num_pairs), ("accumulate", accumulate)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    loss_settings = {key: value for key, value in s.items() if key not in _LOOP_KEYS_2019}
    device = choose_device(str(device)) if device is not None else choose_device()
    ids = list(dataset.train_ids)
    if len(ids) < 2:
        raise ValueError(f"training needs at least 2 training slices, the dataset has {len(ids)}")
    with seeded(seed, device) as generator:
        model = (model if model is not None else FeatureCNN()).to(device).train()
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        history = LossHistory()
        history.pairs_per_step = 1
        history.settings = {**s, "seed": seed, "device": str(device)}
        start = time.perf_counter()
        with _cpu_settings(device, threads):
            off = {} if progress else {"disable": True}  # as in training.train_loop: TQDM_DISABLE=1 is honoured
            for step in tqdm(range(num_pairs), desc="training (2019 loop)", unit="pairs", **off):
                f, m = (ids[int(i)] for i in torch.randperm(len(ids), generator=generator)[:2])
                loss = loss_2019(model, dataset.images[f:f + 1].to(device), dataset.images[m:m + 1].to(device),
                                 dataset.labels[f:f + 1].to(device), dataset.labels[m:m + 1].to(device),
                                 dataset.num_labels, settings=loss_settings)
                (loss / accumulate).backward()
                if (step + 1) % accumulate == 0 or step + 1 == num_pairs:
                    optimiser.step()
                    optimiser.zero_grad()
                history.append(float(loss.detach()))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        history.seconds = time.perf_counter() - start
        history.pairs = num_pairs
    return model.eval(), history


def train_features_settings_2019() -> dict:
    """Keyword arguments that give :func:`~tutorial_utils.train.train_features` the 2019 settings it can take.

    ``alpha``, ``border``, ``prealign`` and the kernels of :data:`TRAIN_DEFAULTS_2019`: the
    same work per pair as :func:`train_features_2019` (the like-for-like speed comparison of
    the training benchmark). Not the same numbers: :func:`~tutorial_utils.train.train_features` always divides the
    cost by its mean, min-pools before the average pools (``regularise_fast``) and pools the
    one-hot labels by area; :func:`train_features_2019` is the 2019 loop itself.
    """
    s = TRAIN_DEFAULTS_2019
    return {"alpha": s["alpha"], "border": s["border"], "prealign": s["prealign"], **{key: s[key] for key in REG_KEYS}}

