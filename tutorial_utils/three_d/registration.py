"""Discrete registration of volume pairs: features -> 3D cost volume -> regularisation -> warp.

Taught in notebook 05: the pipeline of :func:`~tutorial_utils.registration.register_images`,
one dimension up. Volumes [B, 1, Z, Y, X] float in [0, 1]; displacement [B, 3, Z, Y, X]
(dz, dy, dx) in voxels, ``warp3d(volume_moving, displacement)`` aligned with ``volume_fixed``.
:func:`register_volumes` computes features at 1/stride, a D x D x D cost volume
(:mod:`~tutorial_utils.three_d.correlation`), min-convolution over the displacement cube and
mean field over the volume (:mod:`~tutorial_utils.three_d.regularisation`), the soft arg-min,
and upsamples it trilinearly; its settings are one frozen :class:`RegistrationSettings3d`,
:data:`DEFAULTS_3D` unless told otherwise. The pdd_net variant
(costs only at control points, for a sampled displacement cube) is
:func:`~tutorial_utils.three_d.sparse.register_volumes_sparse`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_choice, check_int, check_number, check_odd, check_volume_pair
from ..registration import Features, SettingsBase, _settings
from ..regularisation import normalise_cost
from .correlation import correlation3d
from .features import intensity_features3d, mind_features3d
from .regularisation import displacement_offsets3d, regularise3d, soft_displacement3d
from .transform import upsample_displacement3d

__all__ = [
    "DEFAULTS_3D",
    "RegistrationDetails3d",
    "RegistrationSettings3d",
    "Settings3d",
    "cost_volume3d",
    "extract_features3d",
    "register_volumes",
]


@dataclass(frozen=True)
class Settings3d(SettingsBase):
    """The settings both 3D registrations share (:class:`RegistrationSettings3d` and
    :class:`~tutorial_utils.three_d.sparse.SparseSettings3d`), checked when the object is made.

    Attributes:
        disp_range: D, odd: displacements of +-(D-1)/2 feature voxels = +-stride*(D-1)/2 voxels per axis.
        stride: the feature volumes' downsampling factor (voxels per feature voxel, e.g. 2 or 4); the
            volumes' sizes must be divisible by it.
        min_kernel, avg_kernel, avg_passes: the min-convolution over each voxel's displacement cube
            (:func:`~tutorial_utils.three_d.regularisation.min_convolution3d`): a ``min_kernel``^3
            min-pooling (odd, in displacement steps) and ``avg_passes`` average poolings of
            ``avg_kernel``^3.
        meanfield_kernel, meanfield_passes, meanfield_iterations: the mean field over the volume
            (:func:`~tutorial_utils.three_d.regularisation.mean_field3d`): ``meanfield_passes``
            average poolings of ``meanfield_kernel``^3 (odd, in feature voxels or grid steps);
            min-convolution and mean field run ``meanfield_iterations`` times.
        alpha: the soft arg-min's sharpness (> 0, per unit of normalised cost): ``softmax(-alpha * cost)``.
        normalise: divide the costs by their mean per pair.
    """

    disp_range: int = 7
    stride: int = 2
    min_kernel: int = 3
    avg_kernel: int = 3
    avg_passes: int = 2
    meanfield_kernel: int = 3
    meanfield_passes: int = 3
    meanfield_iterations: int = 1
    alpha: float = 100.0
    normalise: bool = True

    def __post_init__(self) -> None:
        checked = {name: check_odd(name, getattr(self, name))
                   for name in ("disp_range", "min_kernel", "avg_kernel", "meanfield_kernel")}
        checked["stride"] = check_int("stride", self.stride, minimum=1)
        checked.update({name: check_int(name, getattr(self, name), minimum=0)
                        for name in ("avg_passes", "meanfield_passes", "meanfield_iterations")})
        checked["alpha"] = check_number("alpha", self.alpha, 0, strict_minimum=True)
        check_choice("normalise", self.normalise, (True, False))
        self._store(checked)


@dataclass(frozen=True)
class RegistrationSettings3d(Settings3d):
    """Every setting of :func:`register_volumes` that shapes its result, in one frozen object.

    :data:`DEFAULTS_3D` is the one that comes with the package; ``DEFAULTS_3D.replace(disp_range=9)``
    is a copy with one setting changed. The attributes of :class:`Settings3d`, and

    Attributes:
        border: how the moving features continue beyond the volume: "replicate" or "zeros"
            (:func:`cost_volume3d`).
    """

    border: str = "replicate"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("border", self.border, ("replicate", "zeros"))


DEFAULTS_3D = RegistrationSettings3d()
"""Defaults of :func:`register_volumes`, chosen on the phantom pair ``make_phantom_volume(2, seed=1)``
(mean Dice and folding; seed 0 is kept for reporting)."""


@dataclass
class RegistrationDetails3d:
    """Intermediate results of :func:`register_volumes` /
    :func:`~tutorial_utils.three_d.sparse.register_volumes_sparse`.

    Dense: ``cost_volume`` [B, D**3, d, h, w], ``offsets`` [D**3, 3]. Sparse: the costs
    [B, K, gz, gy, gx] on the control grid (``points`` [P, 3]), ``offsets`` [K, 3].
    """

    feat_fixed: torch.Tensor  # [B, C, d, h, w]
    feat_moving: torch.Tensor  # [B, C, d, h, w]
    cost_volume: torch.Tensor  # data cost (normalised when normalise=True)
    cost_regularised: torch.Tensor
    probabilities: torch.Tensor  # softmax(-alpha * cost_regularised) over dim 1
    displacement_low: torch.Tensor  # [B, 3, d, h, w] (dz, dy, dx) in feature voxels
    offsets: torch.Tensor  # [K, 3] (dz, dy, dx) in feature voxels
    stride: int
    disp_range: int
    points: torch.Tensor | None = None  # [P, 3] control points (sparse only)


def extract_features3d(volume: torch.Tensor, features: Features = "mind", stride: int = 2) -> torch.Tensor:
    """Feature volumes [B, C, Z/s, Y/s, X/s] of volumes [B, 1, Z, Y, X].

    ``features``: "intensity" (average-pooled intensities, C = 1), "mind" (3D MIND-SSC at
    dilations 1 and 2 voxels, average-pooled, C = 24; see
    :func:`~tutorial_utils.three_d.features.mind_features3d`), or any ``nn.Module`` / callable that
    maps the volumes to features at 1/stride.
    """
    if isinstance(features, str):
        if features == "intensity":
            return intensity_features3d(volume, stride)
        if features == "mind":
            return mind_features3d(volume, stride)
        raise ValueError(f"features must be 'intensity', 'mind' or a callable, got {features!r}")
    if not callable(features):
        raise ValueError(f"features must be 'intensity', 'mind' or a callable, got {type(features).__name__}")
    feat = features(volume)
    expected = (volume.shape[0], *(n // stride for n in volume.shape[-3:]))
    if not isinstance(feat, torch.Tensor) or feat.dim() != 5 or (feat.shape[0], *feat.shape[-3:]) != expected:
        raise ValueError(f"the feature callable must map [B, 1, Z, Y, X] to [B, C, Z/{stride}, Y/{stride}, X/{stride}]"
                         f" = [{expected[0]}, C, {expected[1]}, {expected[2]}, {expected[3]}], got "
                         f"{getattr(feat, 'shape', type(feat).__name__)}")
    return feat


def _pad_replicate3d(feat: torch.Tensor, r: int) -> torch.Tensor:
    return F.pad(feat, (r,) * 6, mode="replicate") if r > 0 else feat


def cost_volume3d(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, disp_range: int,
                  normalise: bool = True, border: str = "replicate") -> torch.Tensor:
    """SSD cost volume [B, D**3, d, h, w], divided by its mean per pair when ``normalise``.

    ``border``: "replicate" (both feature volumes replication-padded by r, correlated and
    cropped: the moving features continue beyond the volume with their edge values) or
    "zeros" (the layer's own zero padding). See :func:`~tutorial_utils.registration.cost_volume`.
    """
    if border == "replicate":
        r = (disp_range - 1) // 2
        d, h, w = feat_fixed.shape[-3:]
        cost = correlation3d(_pad_replicate3d(feat_fixed, r), _pad_replicate3d(feat_moving, r),
                             disp_range)[..., r:r + d, r:r + h, r:r + w]
    elif border == "zeros":
        cost = correlation3d(feat_fixed, feat_moving, disp_range)
    else:
        raise ValueError(f"border must be 'replicate' or 'zeros', got {border!r}")
    return normalise_cost(cost.flatten(3)).view_as(cost) if normalise else cost


def register_volumes(
    volume_fixed: torch.Tensor,
    volume_moving: torch.Tensor,
    features: Features = "mind",
    settings: RegistrationSettings3d = DEFAULTS_3D,
    *,
    return_details: bool = False,
    **changes: object,
) -> torch.Tensor | tuple[torch.Tensor, RegistrationDetails3d]:
    """Register ``volume_moving`` to ``volume_fixed`` with dense discrete optimisation in 3D.

    1. features at 1/``stride`` (``features``: "intensity", "mind" or a callable);
    2. SSD cost volume over D x D x D displacements (:func:`cost_volume3d`), normalised;
    3. :func:`~tutorial_utils.three_d.regularisation.regularise3d`: min-convolution over the
       displacement cube, mean field over the volume, ``meanfield_iterations`` times;
    4. soft arg-min of ``softmax(-alpha * cost)``, trilinearly upsampled to the volume and
       multiplied by ``stride``.

    Args:
        volume_fixed, volume_moving: [B, 1, Z, Y, X] float in [0, 1]; Z, Y, X divisible by stride.
        features: see :func:`extract_features3d`.
        settings: a :class:`RegistrationSettings3d`: :data:`DEFAULTS_3D` or your own.
        return_details: also return a :class:`RegistrationDetails3d`.
        changes: any setting by name, changed for this call, e.g. ``disp_range=9`` or ``stride=4``
            (``settings.replace(**changes)``).

    Returns:
        displacement [B, 3, Z, Y, X] (dz, dy, dx) in voxels, such that
        ``warp3d(volume_moving, displacement)`` is aligned with ``volume_fixed``; with
        ``return_details`` the tuple ``(displacement, RegistrationDetails3d)``.
    """
    settings = _settings(settings, changes, RegistrationSettings3d, "DEFAULTS_3D")
    check_volume_pair(volume_fixed, volume_moving, settings.stride)
    stride, disp_range = settings.stride, settings.disp_range
    feat_fixed = extract_features3d(volume_fixed, features, stride)  # [B, C, d, h, w]
    feat_moving = extract_features3d(volume_moving, features, stride)
    cost = cost_volume3d(feat_fixed, feat_moving, disp_range, settings.normalise,
                         settings.border)  # [B, D**3, d, h, w]
    cost_reg = regularise3d(cost, disp_range, settings.min_kernel, settings.avg_kernel, settings.avg_passes,
                            settings.meanfield_kernel, settings.meanfield_passes, settings.meanfield_iterations)
    probabilities, displacement_low = soft_displacement3d(cost_reg, disp_range, settings.alpha)  # [B, 3, d, h, w]
    displacement = upsample_displacement3d(displacement_low, volume_fixed.shape[-3:])
    if not return_details:
        return displacement
    offsets = displacement_offsets3d(disp_range, cost.device, cost.dtype)
    return displacement, RegistrationDetails3d(feat_fixed, feat_moving, cost, cost_reg, probabilities,
                                               displacement_low, offsets, stride, disp_range)
