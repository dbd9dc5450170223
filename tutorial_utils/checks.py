"""Input checks shared by every public function: one rule for each kind of argument.

Every check raises a ``ValueError`` (a ``TypeError`` for a wrong kind of object) whose
message names the argument, says what was expected and shows what came: the shape, dtype,
device, a NaN or inf, a value out of range. A function checks its inputs first, so a
learner reads one clear line instead of a deep torch traceback, a crashed kernel or a
silent NaN. This module imports nothing of ours; every other module may import it.

Examples::

    disp_range = check_odd("disp_range", disp_range, minimum=3)    # also accepts np.int64(9)
    check_tensor("image_fixed", image_fixed, dims=4, channels=1, floating=True, finite=True)
    check_same("image_fixed", image_fixed, "image_moving", image_moving, shape=True, device=True)
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "describe",
    "check_int",
    "check_odd",
    "check_number",
    "check_choice",
    "check_tensor",
    "check_finite",
    "check_same",
    "check_image",
    "check_volume",
    "check_labels",
    "check_displacement",
    "check_cost_volume",
    "check_feature_pair",
    "check_image_pair",
    "check_volume_pair",
    "argument_type",
]


def describe(value: object) -> str:
    """A short description of ``value`` for an error message: shape, dtype and device of a tensor."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)} on {value.device}"
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):  # numpy arrays and the like
        return f"a {type(value).__name__} of dtype {value.dtype} and shape {list(shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- numbers


def check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python ``int`` (numpy integers accepted); bools, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {describe(value)} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an integer <= {maximum}, got {value}")
    return value


def check_odd(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as a Python ``int`` that is odd and ``>= minimum`` (a window size such as ``disp_range``)."""
    value = check_int(name, value)
    if value < minimum or value % 2 == 0:
        raise ValueError(f"{name} must be an odd integer >= {minimum} (a centred window), got {value}")
    return value


def check_number(
    name: str,
    value: object,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    strict_minimum: bool = False,
) -> float:
    """``value`` as a finite Python ``float`` in ``[minimum, maximum]`` (``(minimum, ...`` when ``strict_minimum``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {describe(value)} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if minimum is not None and (value <= minimum if strict_minimum else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict_minimum else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_choice(name: str, value: object, choices: Sequence[object]) -> object:
    """``value`` if it is one of ``choices``."""
    if not any(value == choice and type(value) is type(choice) for choice in choices):
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {describe(value)}")
    return value


# --------------------------------------------------------------------------- tensors


def check_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if it holds no NaN or inf (integer tensors always pass)."""
    if tensor.is_floating_point() or tensor.is_complex():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = (~finite).sum().item()
            kinds = [k for k, f in (("NaN", torch.isnan), ("inf", torch.isinf)) if bool(f(tensor).any())]
            raise ValueError(
                f"{name} must be finite, but {bad} of its {tensor.numel()} values are {' or '.join(kinds)}: "
                f"replace them (e.g. torch.nan_to_num) before passing it"
            )
    return tensor


def check_tensor(
    name: str,
    tensor: object,
    *,
    dims: int | Sequence[int] | None = None,
    layout: str | None = None,
    channels: int | None = None,
    floating: bool | None = None,
    finite: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Check a tensor argument and return it.

    Args:
        dims: the number of dimensions (or the allowed numbers).
        layout: how the dimensions are named in messages, e.g. ``"[B, 1, H, W]"``.
        channels: the size of dimension 1, if fixed.
        floating: True for a floating point dtype, False for an integer dtype (bool refused).
        finite: refuse NaN and inf.
        device: the device the tensor must be on (messages suggest ``.to(device)``).
    """
    expected = layout or (f"a {dims}-dimensional tensor" if isinstance(dims, int) else "a tensor")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {expected}, got {describe(tensor)} ({type(tensor).__name__}); "
                        f"convert it with torch.as_tensor")
    allowed = (dims,) if isinstance(dims, int) else dims
    if allowed is not None and tensor.dim() not in allowed:
        raise ValueError(f"{name} must be {expected}, got {describe(tensor)}")
    if channels is not None and (tensor.dim() < 2 or tensor.shape[1] != channels):
        raise ValueError(f"{name} must be {expected} with {channels} channel(s) in dimension 1, got {describe(tensor)}")
    if floating is True and not tensor.is_floating_point():
        raise ValueError(f"{name} must be floating point (e.g. .float()), got {describe(tensor)}")
    if floating is False and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        raise ValueError(f"{name} must hold integers (e.g. .long()), got {describe(tensor)}")
    if device is not None and tensor.device != torch.device(device):
        raise ValueError(f"{name} is on {tensor.device} but must be on {torch.device(device)} like the other inputs: "
                         f"move it with .to({str(torch.device(device))!r})")
    if finite:
        check_finite(name, tensor)
    return tensor


def check_same(
    name_a: str,
    a: torch.Tensor,
    name_b: str,
    b: torch.Tensor,
    *,
    shape: bool = False,
    spatial: int = 0,
    device: bool = True,
    batch: bool = False,
) -> None:
    """Check that two tensors agree: the device, the whole shape, the last ``spatial`` sizes, the batch."""
    if device and a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}: "
                         f"move both to one device, e.g. {name_b}.to({str(a.device)!r})")
    if shape and a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {list(a.shape)} and {list(b.shape)}")
    if spatial and a.shape[-spatial:] != b.shape[-spatial:]:
        raise ValueError(f"{name_a} and {name_b} must have the same size, got {list(a.shape[-spatial:])} "
                         f"and {list(b.shape[-spatial:])} (shapes {list(a.shape)} and {list(b.shape)})")
    if batch and a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(f"{name_a} has batch {a.shape[0]} but {name_b} has batch {b.shape[0]} "
                         f"(they must be equal, or one of them 1)")


# --------------------------------------------------------------------------- what the tutorial passes around


def check_image(name: str, image: object, *, multiple_of: int = 1, finite: bool = True) -> torch.Tensor:
    """A batch of 2D images [B, 1, H, W], floating point, finite, H and W divisible by ``multiple_of``."""
    check_tensor(name, image, dims=4, layout="[B, 1, H, W]", channels=1, floating=True, finite=finite)
    H, W = image.shape[-2:]
    if H < multiple_of or W < multiple_of or H % multiple_of or W % multiple_of:
        raise ValueError(f"{name}: height and width must be positive multiples of {multiple_of} "
                         f"(the feature stride), got {H} x {W}; crop or pad the image")
    return image


def check_volume(name: str, volume: object, *, multiple_of: int = 1, finite: bool = True) -> torch.Tensor:
    """A batch of volumes [B, 1, Z, Y, X], floating point, finite, each size divisible by ``multiple_of``."""
    check_tensor(name, volume, dims=5, layout="[B, 1, Z, Y, X]", channels=1, floating=True, finite=finite)
    size = tuple(volume.shape[-3:])
    if any(s < multiple_of or s % multiple_of for s in size):
        raise ValueError(f"{name}: each size must be a positive multiple of {multiple_of}, got {list(size)}")
    return volume


def check_labels(name: str, labels: object, *, dims: int | Sequence[int] = 3, num_labels: int | None = None,
                 layout: str | None = None) -> torch.Tensor:
    """An integer label map (``[B, H, W]`` by default); values in ``0..num_labels-1`` when ``num_labels`` is given."""
    layout = layout or {2: "[H, W]", 3: "[B, H, W]", 4: "[B, Z, Y, X]"}.get(dims if isinstance(dims, int) else -1)
    check_tensor(name, labels, dims=dims, layout=layout, floating=False)
    if num_labels is not None:
        num_labels = check_int("num_labels", num_labels, minimum=1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
            raise ValueError(f"{name} must hold values 0..{num_labels - 1}, got values from {int(labels.min())} "
                             f"to {int(labels.max())}")
    return labels


def check_displacement(name: str, displacement: object, *, ndim: int = 2, finite: bool = True) -> torch.Tensor:
    """A displacement field [B, 2, H, W] (dy, dx) or, with ``ndim=3``, [B, 3, Z, Y, X] (dz, dy, dx); finite."""
    layout = "[B, 2, H, W] with channels (dy, dx)" if ndim == 2 else "[B, 3, Z, Y, X] with channels (dz, dy, dx)"
    return check_tensor(name, displacement, dims=ndim + 2, layout=layout, channels=ndim, floating=True, finite=finite)


def check_cost_volume(name: str, cost: object, disp_range: object, *, ndim: int = 2) -> tuple[int, ...]:
    """A cost volume [B, D**ndim, *spatial], floating point, finite; returns ``(D, B, *spatial)``.

    ``disp_range`` D must be odd; ``ndim`` is 2 for [B, D*D, h, w] and 3 for [B, D**3, d, h, w].
    """
    disp_range = check_odd("disp_range", disp_range)
    layout = "[B, D*D, h, w]" if ndim == 2 else "[B, D*D*D, d, h, w]"
    check_tensor(name, cost, dims=ndim + 2, layout=layout, floating=True)
    if cost.shape[1] != disp_range**ndim:
        raise ValueError(f"{name} has {cost.shape[1]} displacement channels, expected disp_range**{ndim} = "
                         f"{disp_range**ndim} for disp_range = {disp_range} (layout {layout})")
    check_finite(name, cost)
    return (disp_range, cost.shape[0], *cost.shape[2:])


def check_feature_pair(feat_fixed: object, feat_moving: object, *, ndim: int = 2) -> None:
    """Fixed and moving feature maps [B, C, *spatial]: floating point, finite, same shape and device."""
    layout = "[B, C, h, w]" if ndim == 2 else "[B, C, d, h, w]"
    for name, feat in (("feat_fixed", feat_fixed), ("feat_moving", feat_moving)):
        check_tensor(name, feat, dims=ndim + 2, layout=layout, floating=True)
    check_same("feat_fixed", feat_fixed, "feat_moving", feat_moving, shape=True, device=True)
    check_finite("feat_fixed", feat_fixed)
    check_finite("feat_moving", feat_moving)


def _check_pair(check: Callable, fixed: tuple[str, object], moving: tuple[str, object], multiple_of: int) -> None:
    """A fixed and a moving image (``check_image``) or volume (``check_volume``), given as (name, tensor).

    Both floating point (integer images get a hint to convert them), on one device, of one
    shape, spatial sizes divisible by ``multiple_of``, and finite: one NaN or inf pixel would
    otherwise spread through the pre-alignment into a NaN sampling grid (which can crash the
    process in grid_sample's backward pass) or into every cost.
    """
    for name, image in (fixed, moving):
        if isinstance(image, torch.Tensor) and not (image.is_floating_point() or image.is_complex()):
            raise ValueError(f"{name} must be floating point with intensities in [0, 1], got {image.dtype}: "
                             f"convert it first, e.g. {name}.float() / 255 for uint8 images")
        check(name, image, finite=False)
    (name_f, image_f), (name_m, image_m) = fixed, moving
    check_same(name_f, image_f, name_m, image_m, device=True)  # before the NaN check: it reads the values
    if image_f.shape != image_m.shape:
        raise ValueError(f"{name_f} {list(image_f.shape)} and {name_m} {list(image_m.shape)} differ in shape: "
                         f"register pairs of the same size (crop or pad one of them)")
    spatial = tuple(image_f.shape[2:])
    if any(n % multiple_of for n in spatial):
        raise ValueError(f"the sizes {list(spatial)} of {name_f} and {name_m} must be divisible by {multiple_of} "
                         f"(the features are at 1/{multiple_of} resolution); crop or pad them")
    check_finite(name_f, image_f)
    check_finite(name_m, image_m)


def check_image_pair(image_fixed: object, image_moving: object, multiple_of: int = 1) -> None:
    """Images [B, 1, H, W] to register: floating point, finite, same shape and device, H and W divisible by ``multiple_of``."""
    _check_pair(check_image, ("image_fixed", image_fixed), ("image_moving", image_moving), multiple_of)


def check_volume_pair(volume_fixed: object, volume_moving: object, multiple_of: int = 1) -> None:
    """Volumes [B, 1, Z, Y, X] to register: as :func:`check_image_pair`, one dimension up."""
    _check_pair(check_volume, ("volume_fixed", volume_fixed), ("volume_moving", volume_moving), multiple_of)


# --------------------------------------------------------------------------- command lines


def argument_type(check: Callable[..., object], parse: Callable[[str], object] = int, *, many: bool = False,
                  **limits: object) -> Callable[[str], object]:
    """An argparse ``type=`` that parses the text with ``parse`` and checks it with ``check``.

    ``parser.add_argument("--pairs", type=argument_type(check_int, minimum=1))``: argparse then
    answers ``--pairs -5`` or ``--pairs many`` with its usage line, the check's message and
    exit status 2 instead of a traceback. ``many=True`` reads a comma-separated list.
    """
    def one(text: str) -> object:
        try:
            value = parse(text.strip())
        except ValueError:
            kind = "an integer" if parse is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        try:
            return check("", value, **limits)
        except (TypeError, ValueError) as exc:  # "<name> must be ...": argparse names the option
            raise argparse.ArgumentTypeError(str(exc).strip()) from None

    def convert(text: str) -> object:
        return [one(item) for item in text.split(",")] if many else one(text)

    convert.__name__ = check.__name__.replace("check_", "")
    return convert
