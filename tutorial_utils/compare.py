"""Two established registration tools on the tutorial's 2D slices, and a confidence interval.

Taught in notebook 06 ("Your scans, and how it compares"). :func:`register_ants_syn` (ANTs
SyN, through ``antspyx``) and :func:`register_elastix` (elastix affine + B-spline, through
``itk-elastix``) take the tutorial's images and return the tutorial's displacement, so that
:func:`~tutorial_utils.evaluation.evaluate_registration` measures them with exactly the code
that measures the discrete pipeline (its ``register=`` argument)::

    images [B, 1, H, W] float in [0, 1]  ->  displacement [B, 2, H, W] (dy, dx) in pixels,
    warped[y, x] = moving[y + dy, x + dx]   (tutorial_utils.transform)

Each tool runs with its library's default settings (stated in each docstring; ``options``
changes them), with two exceptions for reproducibility: its random sampling is seeded
(``seed``), and it runs on one thread (multi-threaded sums change the sampled metrics in the
last bits, which the stochastic optimisers amplify: one pair registered by elastix on two
threads instead of one moved by pixels).
Pixels are the physical unit (spacing 1, origin 0, identity direction), so settings given in
millimetres (elastix's final B-spline grid spacing of 10) mean pixels here.

Both libraries are optional (``pip install ".[compare]"`` in the repository, or
``pip install antspyx itk-elastix``) and imported only when a function needs them;
:func:`available_methods` says which are installed (``L2R_SKIP_TOOLS=1`` leaves both out),
:func:`load_libraries` loads them ahead of a timing, and a missing one raises
:class:`MissingLibraryError` (an ``ImportError``) with the pip command.

:func:`patient_bootstrap` gives a confidence interval of a mean over pairs that resamples
*patients*, not pairs: the pairs of one patient are not independent of each other.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checks import check_choice, check_image_pair, check_int, check_number, describe

__all__ = ["INSTALL_HINT", "METHODS", "MissingLibraryError", "available_methods", "load_libraries",
           "patient_bootstrap", "register_ants_syn", "register_elastix", "why_unavailable"]

INSTALL_HINT = 'pip install ".[compare]"'
"""How to get both libraries (in the repository's folder; elsewhere: ``pip install antspyx itk-elastix``)."""

METHODS: dict[str, tuple[str, str]] = {"ANTs SyN": ("ants", "antspyx"), "elastix": ("itk", "itk-elastix")}
"""Method name -> (Python module, pip package)."""

_ELASTIX_MODULE = "itk.ElastixPython"  # what itk-elastix adds to the itk package
_ANTS_THREADS_VARIABLE = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"


class MissingLibraryError(ImportError):
    """An optional library of :mod:`~tutorial_utils.compare` is not installed; the message says how to get it."""


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it; a ``None`` entry in ``sys.modules`` means no)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    parent = module.rpartition(".")[0]
    if parent and not _installed(parent):
        return False
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


SKIP_VARIABLE = "L2R_SKIP_TOOLS"
"""Set to ``1`` to leave both tools out even where they are installed (CI's second notebook pass does)."""


def available_methods() -> dict[str, bool]:
    """``{"ANTs SyN": bool, "elastix": bool}``: which of the two libraries can be used here.

    Both are ``False`` when the environment variable ``L2R_SKIP_TOOLS`` is ``1`` (the tools'
    rows then take no time; see :func:`why_unavailable`).
    """
    if os.environ.get(SKIP_VARIABLE, "") == "1":
        return {method: False for method in METHODS}
    return {"ANTs SyN": _installed("ants"), "elastix": _installed("itk") and _installed(_ELASTIX_MODULE)}


def why_unavailable(method: str) -> str:
    """Why ``method`` (a key of :data:`METHODS`) cannot be used here, in a few words for a printed note."""
    check_choice("method", method, tuple(METHODS))
    if os.environ.get(SKIP_VARIABLE, "") == "1":
        return f"left out because {SKIP_VARIABLE}=1"
    if available_methods()[method]:
        return "it is available"
    return f"its library {METHODS[method][1]} is not installed ({INSTALL_HINT})"


def _require(method: str):
    """Import and return the module of ``method`` (a key of :data:`METHODS`), or raise :class:`MissingLibraryError`."""
    module, package = METHODS[method]
    try:
        imported = importlib.import_module(module)
        if method == "elastix" and not _installed(_ELASTIX_MODULE):  # itk without itk-elastix
            raise ImportError(f"no module named {_ELASTIX_MODULE!r}")
    except ImportError as exc:
        raise MissingLibraryError(
            f"{method} needs the optional package {package}, which is not installed ({exc}). Install the comparison "
            f"extras with `{INSTALL_HINT}` in the repository's folder, or `pip install {package}`.") from exc
    return imported


def load_libraries() -> dict[str, float]:
    """Import the installed libraries now, so that timing a registration later measures the registration only.

    ITK loads its modules lazily, at the first use of a class: elastix's (and its dependencies)
    take 10-30 s on a laptop CPU, once per process; importing ANTs takes a few seconds. Also
    sets ANTs' thread count as :func:`register_ants_syn` does (it must be set before ANTs makes
    its first image). Returns ``{method: seconds it took}`` for the methods that are installed.
    """
    seconds = {}
    for method, installed in available_methods().items():
        if not installed:
            continue
        start = time.perf_counter()
        if method == "ANTs SyN":
            os.environ.setdefault(_ANTS_THREADS_VARIABLE, "1")
            _require(method)
        else:
            itk = _require(method)
            for name in ("ParameterObject", "elastix_registration_method", "transformix_deformation_field",
                         "image_from_array", "array_from_image"):
                getattr(itk, name)  # triggers the lazy loading
        seconds[method] = time.perf_counter() - start
    return seconds


def _check_pair(image_fixed: torch.Tensor, image_moving: torch.Tensor, seed: int) -> int:
    """The images as every registration checks them (any size), and the seed (an int >= 1)."""
    check_image_pair(image_fixed, image_moving)  # [B, 1, H, W], floating point, finite, same shape and device
    return check_int("seed", seed, minimum=1)


def _check_options(options: object, reserved: Sequence[str]) -> dict[str, Any]:
    """``options`` as a dict with string keys, none of them ``reserved`` (set by the function itself)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(key, str) for key in options):
        raise TypeError(f"options must be a dict of setting name -> value, got {describe(options)}")
    taken = sorted(set(options) & set(reserved))
    if taken:
        raise ValueError(f"options must not set {taken}: this function sets them (the seed is the argument seed)")
    return dict(options)


def _as_displacement(fields: list[np.ndarray], like: torch.Tensor) -> torch.Tensor:
    """[H, W, 2] (dy, dx) arrays -> [B, 2, H, W] in ``like``'s dtype and device."""
    stacked = torch.from_numpy(np.stack(fields).astype(np.float32)).permute(0, 3, 1, 2)
    return stacked.to(dtype=like.dtype, device=like.device).contiguous()


def register_ants_syn(image_fixed: torch.Tensor, image_moving: torch.Tensor, *, seed: int = 1,
                      options: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Register with ANTs SyN, ``ants.registration(fixed, moving, type_of_transform="SyN")``, its defaults.

    The defaults of antspyx (0.6): the centres of mass aligned (initial translation); an
    affine stage (Mattes mutual information, 32 bins, 20% of the pixels sampled regularly,
    ``Affine[0.25]``, 2100 x 1200 x 1200 x 0 iterations at shrink factors 4 x 2 x 2 x 1 and
    smoothing 3 x 2 x 1 x 0 pixels); then symmetric normalisation ``SyN[0.2, 3, 0]``
    (gradient step 0.2, update field smoothed with sigma 3 pixels, total field not smoothed),
    Mattes MI with 32 bins, 40 x 20 x 0 iterations at shrink factors 4 x 2 x 1 and smoothing
    2 x 1 x 0 pixels. The returned field is the composition of both (``ants.apply_transforms``
    with ``compose=``), read on the fixed grid.

    Reproducibility: ``seed`` is passed as ``--random-seed`` (the affine stage samples pixels;
    without it, or with 0, ANTs seeds from the clock, so it must be >= 1).
    ANTs reads its thread count once per process, when it makes its first image, from the
    environment variable ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``; if that is not set, this
    function sets it to 1 (as ``ants.set_ants_deterministic`` does, which we do not call: it
    also reseeds numpy's global generator and refuses "SyN"). The variable stays set, so ITK
    filters started later in the process use one thread too. Two runs in one process with the
    same seed then give the same field; if ANTs made an image before the first call, it keeps
    its thread count (all cores) and runs vary slightly.

    Args:
        image_fixed, image_moving: [B, 1, H, W] float (the tutorial's [0, 1] slices); registered
            pair by pair on the CPU.
        seed: the random seed, an integer >= 1.
        options: changes to the defaults, passed to ``ants.registration`` as keyword arguments
            (e.g. ``{"syn_metric": "CC", "syn_sampling": 2}``); None: the defaults.

    Returns:
        displacement [B, 2, H, W] (dy, dx) in pixels, ``warped[y, x] = moving[y + dy, x + dx]``,
        in ``image_fixed``'s dtype and device.
    """
    seed = _check_pair(image_fixed, image_moving, seed)
    options = _check_options(options, reserved=("fixed", "moving", "type_of_transform", "outprefix"))
    os.environ.setdefault(_ANTS_THREADS_VARIABLE, "1")  # read when ANTs makes its first image in this process
    ants = _require("ANTs SyN")
    config = getattr(ants, "config", None)  # antspyx >= 0.6 takes the seed from there, 0.5 as an argument
    if config is None or not hasattr(config, "_random_seed"):
        config, options = None, {"random_seed": seed, **options}
    previous = getattr(config, "_random_seed", None)
    fields = []
    try:
        if config is not None:
            config._random_seed = seed  # antspyx passes it to antsRegistration as --random-seed
        for fixed, moving in zip(image_fixed[:, 0].detach().cpu().numpy(), image_moving[:, 0].detach().cpu().numpy()):
            def image(array):  # numpy axis 0 (y) is ANTs' first physical axis
                return ants.from_numpy(np.ascontiguousarray(array, dtype=np.float32), origin=(0.0, 0.0),
                                       spacing=(1.0, 1.0), direction=np.eye(2))

            fixed_image, moving_image = image(fixed), image(moving)
            with tempfile.TemporaryDirectory(prefix="l2r-ants-") as folder:
                result = ants.registration(fixed_image, moving_image, type_of_transform="SyN",
                                           outprefix=str(Path(folder) / "syn_"), **options)
                composed = ants.apply_transforms(fixed_image, moving_image, result["fwdtransforms"],
                                                 compose=str(Path(folder) / "composed_"))
                fields.append(ants.image_read(composed).numpy())  # [H, W, 2]: (axis 0, axis 1) = (dy, dx)
    finally:
        if config is not None:
            config._random_seed = previous
    return _as_displacement(fields, image_fixed)


def register_elastix(image_fixed: torch.Tensor, image_moving: torch.Tensor, *, seed: int = 1,
                     options: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Register with elastix: the default "affine" and "bspline" parameter maps, one after the other.

    ``itk.elastix_registration_method`` with ``ParameterObject.GetDefaultParameterMap("affine")``
    and ``("bspline")`` (itk-elastix 0.2x): both maximise Mattes mutual information
    (``AdvancedMattesMutualInformation``) with ``AdaptiveStochasticGradientDescent`` (step
    sizes estimated automatically), 2048 random sample points drawn anew at every iteration,
    4 resolutions of a smoothing pyramid, 256 iterations per resolution, linear interpolation;
    no initial transform. The affine stage optimises an ``AffineTransform`` (scales estimated
    automatically); the B-spline stage a ``BSplineTransform`` with a final control point grid
    spacing of 10 (pixels here), coarser by 2.83, 2, 1.41 and 1 at the four resolutions, plus
    a bending energy penalty of weight 1. The returned field is
    ``itk.transformix_deformation_field`` of the composed result, on the fixed grid.

    Reproducibility: ``seed`` becomes the parameter ``RandomSeed`` of both maps (elastix's
    default is 121212), and elastix runs on one thread (``number_of_threads=1``); two runs in
    one process then give the same field (itk-elastix 0.25; before elastix 5.3 the seed took
    effect once per process only).

    Args:
        image_fixed, image_moving, seed: as :func:`register_ants_syn`.
        options: changes to both parameter maps, parameter name -> value or list of values
            (e.g. ``{"MaximumNumberOfIterations": 500}``); None: the defaults.

    Returns: as :func:`register_ants_syn`.
    """
    seed = _check_pair(image_fixed, image_moving, seed)
    options = _check_options(options, reserved=("RandomSeed",))
    itk = _require("elastix")
    parameters = itk.ParameterObject.New()
    for name in ("affine", "bspline"):
        parameter_map = parameters.GetDefaultParameterMap(name)
        parameter_map["RandomSeed"] = [str(seed)]
        for key, value in options.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            parameter_map[key] = [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
        parameters.AddParameterMap(parameter_map)
    fields = []
    for fixed, moving in zip(image_fixed[:, 0].detach().cpu().numpy(), image_moving[:, 0].detach().cpu().numpy()):
        fixed_image = itk.image_from_array(np.ascontiguousarray(fixed, dtype=np.float32))  # ITK x = numpy axis 1
        moving_image = itk.image_from_array(np.ascontiguousarray(moving, dtype=np.float32))
        _, transform = itk.elastix_registration_method(fixed_image, moving_image, parameter_object=parameters,
                                                       log_to_console=False, number_of_threads=1)
        with tempfile.TemporaryDirectory(prefix="l2r-elastix-") as folder:  # transformix also writes the field there
            field = itk.transformix_deformation_field(moving_image, transform, output_directory=folder)
            fields.append(itk.array_from_image(field)[..., ::-1])  # [H, W, (x, y)] -> (dy, dx)
    return _as_displacement(fields, image_fixed)


def patient_bootstrap(values: Sequence[float] | torch.Tensor | np.ndarray, pairs: Sequence[tuple[int, int]],
                      level: float = 0.95, resamples: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """The mean of ``values`` over ``pairs`` and its bootstrap confidence interval over patients.

    The patients are the slice indices that occur in ``pairs`` (one patient per slice). Each of
    ``resamples`` draws takes as many patients as there are, with replacement; a pair (f, m)
    then counts ``count(f) * count(m)`` times (as often as it occurs among the drawn patients),
    and the draw's statistic is that weighted mean. Draws in which no pair occurs (all drawn
    patients the same) are left out. The interval holds the central ``level`` of the draws'
    means (percentile interval); ``seed`` makes it reproducible.

    Args:
        values: [P], one number per pair (e.g. the mean Dice of each pair), finite.
        pairs: [P] (fixed, moving) slice indices.

    Returns:
        (mean over the pairs, lower bound, upper bound).
    """
    values = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    pairs = np.asarray(pairs.cpu() if isinstance(pairs, torch.Tensor) else pairs, dtype=np.int64)
    if values.ndim != 1 or pairs.shape != (len(values), 2) or not len(values):
        raise ValueError(f"values must be [P] and pairs [P, 2] with P >= 1, got {describe(values)} and "
                         f"{describe(pairs)}")
    if not np.isfinite(values).all():
        raise ValueError(f"values must be finite, got {int((~np.isfinite(values)).sum())} NaN or inf")
    level = check_number("level", level, minimum=0, maximum=1, strict_minimum=True)
    resamples = check_int("resamples", resamples, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    patients, index = np.unique(pairs, return_inverse=True)  # index: [P * 2] positions in patients
    index = index.reshape(-1, 2)
    draws = np.random.default_rng(seed).integers(0, len(patients), size=(resamples, len(patients)))
    counts = np.zeros((resamples, len(patients)))
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1.0)
    weights = counts[:, index[:, 0]] * counts[:, index[:, 1]]  # [R, P]
    total = weights.sum(1)
    means = (weights @ values)[total > 0] / total[total > 0]
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(values.mean()), float(low), float(high)
