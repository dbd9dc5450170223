"""Discrete registration of image pairs: features -> cost volume -> regularisation -> warp.

Taught in ``notebooks/03_regularisation.ipynb``; composes the building blocks
:mod:`~tutorial_utils.features`, :mod:`~tutorial_utils.correlation`,
:mod:`~tutorial_utils.regularisation` and :mod:`~tutorial_utils.transform`, after the
pre-alignment of :mod:`~tutorial_utils.prealign`. Nothing here is trained; a trained feature
CNN (next notebook) plugs in through ``features=``. Every setting that shapes the result is
one field of a :class:`RegistrationSettings`; :data:`DEFAULTS` and :data:`DEFAULTS_2019` are
the two that come with the package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import correlation as _correlation_module
from .checks import check_choice, check_image_pair, check_int, check_number, check_odd, describe
from .correlation import argmin_displacement
from .features import intensity_features, mind_features
from .prealign import PREALIGN_MODES, prealign_displacement
from .regularisation import normalise_cost, regularise, soft_displacement
from .transform import compose_displacements, upsample_displacement, warp

__all__ = [
    "FEATURE_STRIDE",
    "DEFAULTS",
    "DEFAULTS_2019",
    "REGULARISATION_KEYS",
    "RegistrationDetails",
    "RegistrationSettings",
    "SettingsBase",
    "cost_volume",
    "extract_features",
    "register_argmin",
    "register_images",
]

FEATURE_STRIDE = 4
"""Feature maps are at 1/4 of the image resolution (like the 2019 CNN)."""

REGULARISATION_KEYS = ("min_kernel", "avg_kernel", "min_order", "meanfield_kernel", "meanfield_iterations",
                       "meanfield_passes")
"""The settings that :func:`~tutorial_utils.regularisation.regularise` takes."""


class SettingsBase:
    """What every frozen settings object shares (:class:`RegistrationSettings` and the 3D ones of
    :mod:`~tutorial_utils.three_d`): ``replace`` with a clear error for an unknown name, ``as_dict``."""

    def _store(self, checked: dict) -> None:
        """Keep the checked values (plain Python numbers: numpy integers are accepted) in the frozen object."""
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes: object):
        """A copy with ``changes`` (names of the attributes above); an unknown name is an error."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise TypeError(f"unknown registration setting(s) {', '.join(unknown)}; the settings are "
                            f"{', '.join(names)}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """``{name: value}`` of every setting."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RegistrationSettings(SettingsBase):
    """Every setting of :func:`register_images` that shapes its result, in one frozen object.

    Two instances come with the package: :data:`DEFAULTS` (this project's pipeline) and
    :data:`DEFAULTS_2019` (the complete 2019 pipeline). ``settings.replace(alpha=30.0)`` is a
    copy with one setting changed. Every value is checked when the object is made, so a bad
    setting fails at once, by name.

    Attributes:
        disp_range: D, odd: D x D displacements of +-(D-1)/2 feature pixels = +-2(D-1) image pixels.
        min_kernel, avg_kernel, min_order: the min-convolution over each pixel's D x D costs
            (:func:`~tutorial_utils.regularisation.min_convolution`): a ``min_kernel``
            min-pooling and two ``avg_kernel`` average poolings; ``min_order="last"``: the
            averages first, as in the 2019 slides' code.
        meanfield_kernel, meanfield_passes, meanfield_iterations: the mean field over the
            image grid (:func:`~tutorial_utils.regularisation.mean_field`): ``meanfield_passes``
            average poolings of ``meanfield_kernel``; min-convolution and mean field run
            ``meanfield_iterations`` times.
        alpha: the soft arg-min's sharpness: probabilities ``softmax(-alpha * cost)``.
        normalise: divide the cost volume by its mean per pair, so that one ``alpha`` serves
            every feature type.
        border: how the moving features continue beyond the image: "replicate" or "zeros".
        upsample_mode: how the 1/4-resolution field is upsampled: "bilinear" or "bicubic".
        prealign: where the search starts, see :data:`~tutorial_utils.prealign.PREALIGN_MODES`.
        refine_range: D' (odd) of a second, finer search from the first result; None: none.
    """

    disp_range: int = 9
    min_kernel: int = 3
    avg_kernel: int = 3
    min_order: str = "first"
    meanfield_kernel: int = 5
    meanfield_passes: int = 3
    meanfield_iterations: int = 2
    alpha: float = 100.0
    normalise: bool = True
    border: str = "replicate"
    upsample_mode: str = "bilinear"
    prealign: str = "affine"
    refine_range: int | None = 5

    def __post_init__(self) -> None:
        checked = {name: check_odd(name, getattr(self, name))
                   for name in ("disp_range", "min_kernel", "avg_kernel", "meanfield_kernel")}
        checked.update({name: check_int(name, getattr(self, name), minimum=0)
                        for name in ("meanfield_passes", "meanfield_iterations")})
        checked["alpha"] = float(check_number("alpha", self.alpha, 0, strict_minimum=True))
        if self.refine_range is not None:
            checked["refine_range"] = check_odd("refine_range", self.refine_range)
        check_choice("min_order", self.min_order, ("first", "last"))
        check_choice("normalise", self.normalise, (True, False))
        check_choice("border", self.border, ("replicate", "zeros"))
        check_choice("upsample_mode", self.upsample_mode, ("bilinear", "bicubic"))
        check_choice("prealign", self.prealign, PREALIGN_MODES)
        self._store(checked)

    def regularisation(self) -> dict:
        """The keyword arguments of :func:`~tutorial_utils.regularisation.regularise`."""
        return {name: getattr(self, name) for name in REGULARISATION_KEYS}


DEFAULTS_2019 = RegistrationSettings(
    disp_range=9, min_kernel=3, avg_kernel=5, min_order="last", meanfield_kernel=5, meanfield_passes=3,
    meanfield_iterations=1, alpha=10.0, normalise=False, border="zeros", upsample_mode="bicubic", prealign="none",
    refine_range=None)
"""The complete pipeline of the 2019 tutorial: ``register_images(fixed, moving, features, DEFAULTS_2019)``.

Every setting that shapes the result, as the 2019 slides' code and kernel had it:

* ``disp_range=9``: 9 x 9 displacements of +-4 feature pixels (+-16 image pixels);

* ``border="zeros"``: the correlation layer ``F.unfold(feat_moving, (D, D), padding=r)``
  pads the moving features with zeros (no replication padding before it);
* ``normalise=False``: the raw SSD summed over the feature channels (not divided by its mean);
* ``min_kernel=3``, ``avg_kernel=5``, ``min_order="last"``: the slides' ``minconv =
  Sequential(ReplicationPad2d(5), AvgPool2d(5), AvgPool2d(5), MaxPool2d(3))`` applied as
  ``-minconv(-cost)`` over each pixel's D x D displacements: replication padding 5, two 5 x 5
  average poolings, then a 3 x 3 min-pooling (the slides' order; this project's order is
  min-pooling first);
* ``meanfield_kernel=5``, ``meanfield_passes=3``, ``meanfield_iterations=1``: the slides'
  ``meanfield = Sequential(ReplicationPad2d(6), AvgPool2d(5), AvgPool2d(5), AvgPool2d(5))``
  over the spatial dimensions, applied once after the min-convolution;
* ``alpha=10.0``: probabilities ``softmax(-10 * cost)`` over the D*D displacements, whose
  expectation is the displacement at 1/4 resolution;
* ``upsample_mode="bicubic"``: that field upsampled x4 bicubically (``align_corners=False``,
  PyTorch's default) and multiplied by 4;
* ``prealign="none"``, ``refine_range=None``: no pre-alignment and no second stage.

The cost volume comes from the fast :func:`~tutorial_utils.correlation.correlation`, which
has the values of the slides' unfold layer (up to float rounding).
"""

DEFAULTS = RegistrationSettings()
"""The settings :func:`register_images` uses unless told otherwise, chosen on training pairs in
notebook 03 (the class's defaults): min-pooling before averaging, two rounds of regularisation,
a sharper soft arg-min (alpha 100) on normalised costs, replicated borders, affine
pre-alignment and a second search of 5 x 5 displacements."""

Features = Union[str, nn.Module, Callable[[torch.Tensor], torch.Tensor]]


def _correlation(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, disp_range: int) -> torch.Tensor:
    """The fast ``correlation`` when the package has it, else the 2019 ``correlation_unfold``."""
    fast = getattr(_correlation_module, "correlation", None)
    if fast is not None:
        return fast(feat_fixed, feat_moving, disp_range)
    return _correlation_module.correlation_unfold(feat_fixed, feat_moving, disp_range)


@dataclass
class RegistrationDetails:
    """Intermediate results of :func:`register_images` (``return_details=True``).

    Shapes: B pairs, D = disp_range, feature maps h x w = H/stride x W/stride.
    """

    feat_fixed: torch.Tensor  # [B, C, h, w]
    feat_moving: torch.Tensor  # [B, C, h, w], of the pre-aligned moving image
    cost_volume: torch.Tensor  # [B, D*D, h, w], data cost (normalised when normalise=True)
    cost_regularised: torch.Tensor  # [B, D*D, h, w]
    probabilities: torch.Tensor  # [B, D*D, h, w], softmax(-alpha * cost_regularised)
    displacement_low: torch.Tensor  # [B, 2, h, w], (dy, dx) in feature pixels (after pre-alignment)
    prealign: torch.Tensor  # [B, 2, H, W], the pre-alignment in image pixels (zeros for "none")
    stride: int
    disp_range: int
    extra: dict = field(default_factory=dict)


def extract_features(image: torch.Tensor, features: Features = "mind") -> torch.Tensor:
    """Feature maps [B, C, H/4, W/4] of images [B, 1, H, W].

    ``features``: "intensity" (average-pooled intensities, C = 1), "mind" (MIND-SSC of the
    half-resolution image at dilations 2, 4, 6, 8, average-pooled, C = 16; see
    :func:`~tutorial_utils.features.mind_features`), or any ``nn.Module`` / callable that maps the
    images to feature maps at 1/4 resolution (e.g. the feature CNN).
    """
    if isinstance(features, str):
        if features == "intensity":
            return intensity_features(image, FEATURE_STRIDE)
        if features == "mind":
            return mind_features(image, FEATURE_STRIDE)
        raise ValueError(f"features must be 'intensity', 'mind' or an nn.Module, got {features!r}")
    if not callable(features):
        raise ValueError(f"features must be 'intensity', 'mind' or an nn.Module, got {type(features).__name__}")
    if isinstance(features, nn.Module):
        weight = next(iter(features.parameters()), None)
        if weight is not None and weight.device != image.device:
            raise ValueError(f"the feature model is on {weight.device} but the images are on {image.device}: "
                             f"move one of them, e.g. images.to({str(weight.device)!r}) or model.to({str(image.device)!r})")
    feat = features(image)
    expected = (image.shape[0], image.shape[-2] // FEATURE_STRIDE, image.shape[-1] // FEATURE_STRIDE)
    if not isinstance(feat, torch.Tensor) or feat.dim() != 4 or (feat.shape[0], *feat.shape[-2:]) != expected:
        raise ValueError(
            f"the feature module must map [B, 1, H, W] to [B, C, H/4, W/4] = [{expected[0]}, C, {expected[1]}, "
            f"{expected[2]}], got {getattr(feat, 'shape', type(feat).__name__)}"
        )
    return feat


def cost_volume(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, disp_range: int,
                normalise: bool = True, border: str = "replicate") -> torch.Tensor:
    """SSD cost volume [B, D*D, h, w], divided by its mean per pair when ``normalise``.

    ``border="replicate"``: the moving features continue beyond the image with their edge
    values (both maps are replication-padded by r before the correlation, which is then
    cropped). ``"zeros"``: the correlation layer's own zero padding, as in 2019; features
    that are not 0 outside the body (MIND is 1 in flat air) then make every border pixel
    prefer displacements that stay inside, which pulls the field inwards and folds it.
    """
    if border == "replicate":
        r = (disp_range - 1) // 2
        h, w = feat_fixed.shape[-2:]
        padded = [F.pad(f, (r,) * 4, mode="replicate") for f in (feat_fixed, feat_moving)]
        cost = _correlation(*padded, disp_range)[..., r:r + h, r:r + w]
    elif border == "zeros":
        cost = _correlation(feat_fixed, feat_moving, disp_range)
    else:
        raise ValueError(f"border must be 'replicate' or 'zeros', got {border!r}")
    return normalise_cost(cost) if normalise else cost


def _register_level(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, disp_range: int,
                    settings: RegistrationSettings) -> tuple[torch.Tensor, ...]:
    """One discrete search: cost volume, regularisation, soft arg-min at 1/4 resolution."""
    cost = cost_volume(feat_fixed, feat_moving, disp_range, settings.normalise, settings.border)
    cost_reg = regularise(cost, disp_range, **settings.regularisation())
    probabilities, displacement_low = soft_displacement(cost_reg, disp_range, settings.alpha)
    return cost, cost_reg, probabilities, displacement_low


def _prealigned_features(image_fixed: torch.Tensor, image_moving: torch.Tensor, features: Features,
                         settings: RegistrationSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """How every search here starts: the pre-alignment ``pre`` [B, 2, H, W] (image pixels) and the
    features [B, C, h, w] of the fixed and of the pre-aligned moving image."""
    pre = prealign_displacement(image_fixed, image_moving, settings.prealign)  # [B, 2, H, W]
    moving = warp(image_moving, pre) if settings.prealign != "none" else image_moving
    return pre, extract_features(image_fixed, features), extract_features(moving, features)


def _to_image(displacement_low: torch.Tensor, pre: torch.Tensor, size: tuple[int, int],
              settings: RegistrationSettings) -> torch.Tensor:
    """A field [B, 2, h, w] in feature pixels upsampled to [B, 2, H, W] image pixels, after ``pre``."""
    displacement = upsample_displacement(displacement_low, size, mode=settings.upsample_mode)
    return compose_displacements(pre, displacement) if settings.prealign != "none" else displacement


def _settings(settings: object, changes: dict, kind: type = RegistrationSettings,
              examples: str = "DEFAULTS or DEFAULTS_2019") -> SettingsBase:
    """``settings`` (a ``kind``, e.g. one of ``examples``) with ``changes``; a clear error for anything else.

    Shared by :func:`register_images` and the 3D registrations (``kind`` their settings class).
    """
    if not isinstance(settings, kind):
        hint = (f"; to change the number of displacements write disp_range={settings}"
                if isinstance(settings, int) and not isinstance(settings, bool) else "")
        raise TypeError(f"settings must be a {kind.__name__} such as {examples}, got "
                        f"{describe(settings)} ({type(settings).__name__}){hint}")
    return settings.replace(**changes) if changes else settings


def register_images(
    image_fixed: torch.Tensor,
    image_moving: torch.Tensor,
    features: Features = "mind",
    settings: RegistrationSettings = DEFAULTS,
    *,
    chunk_size: int = 16,
    return_details: bool = False,
    **changes: object,
) -> torch.Tensor | tuple[torch.Tensor, RegistrationDetails]:
    """Register ``image_moving`` to ``image_fixed`` with discrete optimisation.

    1. pre-alignment (``prealign``, see :func:`~tutorial_utils.prealign.prealign_displacement`);
    2. features at 1/4 resolution (``features``: "intensity", "mind" or an ``nn.Module``);
    3. SSD cost volume over D x D displacements (:func:`cost_volume`);
    4. :func:`~tutorial_utils.regularisation.regularise`: min-convolution and mean field;
    5. soft arg-min of ``softmax(-alpha * cost)``, upsampled x4 to the image and scaled by 4;
    6. with ``refine_range`` D': the moving image is warped with the result, its features
       recomputed, and steps 3-5 run once more with D' x D' displacements; the two fields are
       composed.

    Args:
        image_fixed, image_moving: [B, 1, H, W] float in [0, 1] (float32 or float64), finite,
            on one device; H, W divisible by 4. Integer images are refused rather than guessed
            at: convert uint8 slices with ``.float() / 255``.
        features: see :func:`extract_features`.
        settings: a :class:`RegistrationSettings`: :data:`DEFAULTS` (this project's pipeline)
            or :data:`DEFAULTS_2019` (the complete 2019 pipeline), or your own.
        chunk_size: pairs processed at once (bounds memory; results do not depend on it).
        return_details: also return a :class:`RegistrationDetails` (of the first search).
        changes: any setting by name, changed for this call, e.g. ``alpha=30.0`` or
            ``disp_range=7`` (``settings.replace(**changes)``).

    Returns:
        displacement [B, 2, H, W], (dy, dx) in image pixels, such that
        ``warp(image_moving, displacement)`` is aligned with ``image_fixed``; with
        ``return_details`` the tuple ``(displacement, details)``.
    """
    check_image_pair(image_fixed, image_moving, FEATURE_STRIDE)  # first: a NaN pixel can crash the process
    settings = _settings(settings, changes)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    if image_fixed.shape[0] > chunk_size:
        return _register_in_chunks(image_fixed, image_moving, features, settings, chunk_size, return_details)
    H, W = image_fixed.shape[-2:]
    pre, feat_fixed, feat_moving = _prealigned_features(image_fixed, image_moving, features, settings)
    cost, cost_reg, probabilities, displacement_low = _register_level(
        feat_fixed, feat_moving, settings.disp_range, settings)
    displacement = _to_image(displacement_low, pre, (H, W), settings)  # [B, 2, H, W]
    if settings.refine_range is not None:
        feat_refined = extract_features(warp(image_moving, displacement), features)  # [B, C, h, w]
        *_, refined_low = _register_level(feat_fixed, feat_refined, settings.refine_range, settings)
        refined = upsample_displacement(refined_low, (H, W), mode=settings.upsample_mode)
        displacement = compose_displacements(displacement, refined)
    if not return_details:
        return displacement
    details = RegistrationDetails(feat_fixed, feat_moving, cost, cost_reg, probabilities, displacement_low,
                                  pre, FEATURE_STRIDE, settings.disp_range)
    return displacement, details


def register_argmin(image_fixed: torch.Tensor, image_moving: torch.Tensor, features: Features = "intensity",
                    settings: RegistrationSettings = DEFAULTS) -> torch.Tensor:
    """Registration without regularisation: every feature pixel takes its cheapest displacement.

    The "winner takes all" of notebook 02, on whole test sets in notebook 03 to measure what the
    regularisation adds: the pre-alignment and the cost volume of :func:`register_images`
    (``settings.prealign``, ``disp_range``, ``normalise``, ``border``), then the arg-min of each
    pixel's D x D costs (:func:`~tutorial_utils.correlation.argmin_displacement`), no min-convolution,
    mean field, soft arg-min or refinement; upsampled to the image like ``register_images``.

    Args:
        image_fixed, image_moving: [B, 1, H, W] float in [0, 1], as for :func:`register_images`.
        features: see :func:`extract_features`. settings: a :class:`RegistrationSettings`.

    Returns:
        displacement [B, 2, H, W], (dy, dx) in image pixels.
    """
    check_image_pair(image_fixed, image_moving, FEATURE_STRIDE)
    settings = _settings(settings, {})
    pre, feat_fixed, feat_moving = _prealigned_features(image_fixed, image_moving, features, settings)
    cost = cost_volume(feat_fixed, feat_moving, settings.disp_range, settings.normalise,
                       settings.border)  # [B, D*D, h, w]
    low = argmin_displacement(cost, settings.disp_range).to(image_fixed.dtype)  # [B, 2, h, w], feature pixels
    return _to_image(low, pre, image_fixed.shape[-2:], settings)


def _register_in_chunks(image_fixed: torch.Tensor, image_moving: torch.Tensor, features: Features,
                        settings: RegistrationSettings, chunk_size: int, return_details: bool):
    """:func:`register_images` of ``chunk_size`` pairs at a time, the results concatenated."""
    parts = [register_images(image_fixed[s:s + chunk_size], image_moving[s:s + chunk_size], features, settings,
                             chunk_size=chunk_size, return_details=return_details)
             for s in range(0, image_fixed.shape[0], chunk_size)]
    if not return_details:
        return torch.cat(parts)
    names = ("feat_fixed", "feat_moving", "cost_volume", "cost_regularised", "probabilities",
             "displacement_low", "prealign")
    details = RegistrationDetails(**{name: torch.cat([getattr(p[1], name) for p in parts]) for name in names},
                                  stride=FEATURE_STRIDE, disp_range=settings.disp_range)
    return torch.cat([p[0] for p in parts]), details
