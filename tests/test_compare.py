"""ANTs SyN and elastix behind the tutorial's displacement convention, and the patient bootstrap.

The registration tests need the optional libraries (``pip install ".[compare]"``) and skip
without them: a smooth synthetic image and a copy of it moved by a known whole-pixel
translation must give back that translation, with the tutorial's sign convention
(``warped[y, x] = moving[y + dy, x + dx]``, checked by warping with
``tutorial_utils.transform.warp``). The error for a missing library and the bootstrap are
tested everywhere; the bootstrap against a brute-force enumeration of all draws.
"""

import itertools
import math
import sys

import numpy as np
import pytest
import torch

from tutorial_utils import compare
from tutorial_utils.transform import warp

pytestmark = [pytest.mark.usefixtures("single_thread"),  # ITK's SWIG modules warn at import (Python >= 3.11):
              pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")]

H, W = 64, 80
SHIFTS = ((4.0, -3.0), (-2.0, 5.0))
"""(dy, dx) of the two test pairs: moving[y + dy, x + dx] = fixed[y, x]."""


def body(shift=(0.0, 0.0), seed: int = 0) -> torch.Tensor:
    """[H, W] in [0, 1], moved by ``shift`` (dy, dx): a smooth elliptic "body" filled with a texture of six
    plane waves (wavelengths 10-25 px, random directions and phases). Both tools need both: on the
    texture alone ANTs' affine stage can stop in a local optimum, on a flat body elastix's B-spline
    wanders (seeds 0-3 of the texture checked: largest error 0.5 px)."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64) - shift[0],
                          torch.arange(W, dtype=torch.float64) - shift[1], indexing="ij")
    inside = torch.sigmoid(12 * (1 - ((y - 32) / 22) ** 2 - ((x - 40) / 30) ** 2))
    texture = torch.zeros(H, W, dtype=torch.float64)
    for _ in range(6):
        angle, phase = 2 * math.pi * torch.rand(2, generator=generator, dtype=torch.float64)
        wavelength = 10 + 15 * torch.rand(1, generator=generator, dtype=torch.float64)
        texture += torch.cos(2 * math.pi * (y * torch.sin(angle) + x * torch.cos(angle)) / wavelength + phase)
    return (inside * (0.5 + 0.08 * texture)).clamp(0, 1).float()


@pytest.fixture(scope="module")
def pair():
    """image_fixed [2, 1, H, W] (the same image twice), image_moving [2, 1, H, W] (it moved by each of SHIFTS)."""
    fixed = body()[None, None].repeat(2, 1, 1, 1)
    moving = torch.stack([body(shift) for shift in SHIFTS])[:, None]
    return fixed, moving


def check_translation(displacement, fixed, moving):
    """The shape, dtype and the recovered shift (within 1 px inside the body)."""
    assert displacement.shape == (2, 2, H, W) and displacement.dtype == torch.float32
    inside = fixed[0, 0] > 0.1  # [H, W]
    for k, shift in enumerate(SHIFTS):
        error = (displacement[k] - torch.tensor(shift)[:, None, None]).norm(dim=0)[inside]  # pixels
        assert error.mean() < 0.5 and error.max() < 1.0, (k, shift, displacement[k][:, inside].mean(1))
    # the convention itself: warping the moving image with it gives the fixed one back
    warped = warp(moving, displacement)
    assert (warped - fixed)[:, :, inside].abs().max() < 0.1


def test_ants_syn_recovers_a_translation(pair, tmp_path, monkeypatch):
    pytest.importorskip("ants")
    monkeypatch.chdir(tmp_path)
    fixed, moving = pair
    displacement = compare.register_ants_syn(fixed, moving)  # the library's defaults
    check_translation(displacement, fixed, moving)
    assert torch.equal(compare.register_ants_syn(fixed[:1], moving[:1]), displacement[:1])  # seeded, one thread
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_elastix_recovers_a_translation(pair, tmp_path, monkeypatch):
    pytest.importorskip("itk")
    if not compare.available_methods()["elastix"]:
        pytest.skip("itk-elastix is not installed")
    monkeypatch.chdir(tmp_path)  # transformix writes files into the working folder unless told otherwise
    fixed, moving = pair
    fewer = {"MaximumNumberOfIterations": 64, "NumberOfResolutions": 2}  # the defaults take ~7 s per pair
    displacement = compare.register_elastix(fixed, moving, options=fewer)
    check_translation(displacement, fixed, moving)
    assert torch.equal(compare.register_elastix(fixed[:1], moving[:1], options=fewer), displacement[:1])
    assert not list(tmp_path.iterdir())  # nothing left behind


@pytest.mark.parametrize("method, module", [("ANTs SyN", "ants"), ("elastix", "itk")])
def test_a_missing_library_says_how_to_install_it(monkeypatch, pair, method, module):
    monkeypatch.setitem(sys.modules, module, None)  # "import module" now fails, as if not installed
    assert compare.available_methods()[method] is False
    register = {"ANTs SyN": compare.register_ants_syn, "elastix": compare.register_elastix}[method]
    with pytest.raises(ImportError, match=r'pip install "\.\[compare\]"') as caught:
        register(*pair)
    assert isinstance(caught.value, compare.MissingLibraryError) and compare.METHODS[method][1] in str(caught.value)


def test_load_libraries_loads_what_is_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "ants", None)
    monkeypatch.setitem(sys.modules, "itk", None)
    assert compare.load_libraries() == {}
    monkeypatch.undo()
    seconds = compare.load_libraries()
    assert set(seconds) == {name for name, here in compare.available_methods().items() if here}
    assert all(s >= 0 for s in seconds.values())


def test_skip_variable_leaves_both_tools_out(monkeypatch):
    monkeypatch.setenv("L2R_SKIP_TOOLS", "1")
    assert compare.available_methods() == {"ANTs SyN": False, "elastix": False}
    assert compare.load_libraries() == {}
    assert "L2R_SKIP_TOOLS=1" in compare.why_unavailable("elastix")
    monkeypatch.setenv("L2R_SKIP_TOOLS", "0")
    monkeypatch.setitem(sys.modules, "ants", None)
    assert "antspyx is not installed" in compare.why_unavailable("ANTs SyN")
    with pytest.raises(ValueError, match="method must be one of"):
        compare.why_unavailable("SyN")


def test_itk_without_elastix_is_not_available(monkeypatch):
    pytest.importorskip("itk")
    monkeypatch.setitem(sys.modules, "itk.ElastixPython", None)
    assert compare.available_methods()["elastix"] is False


def test_bad_inputs_are_named(pair):
    fixed, moving = pair
    with pytest.raises(ValueError, match="differ in shape"):
        compare.register_ants_syn(fixed, moving[:, :, :32])
    with pytest.raises(ValueError, match="image_moving"):
        compare.register_elastix(fixed, moving[:, 0])
    with pytest.raises(ValueError, match="RandomSeed"):
        compare.register_elastix(fixed, moving, options={"RandomSeed": 3})
    with pytest.raises(TypeError, match="options"):
        compare.register_ants_syn(fixed, moving, options=[("syn_metric", "CC")])


# --------------------------------------------------------------------------- the bootstrap


def weighted_mean_by_enumeration(draw, pairs, values):
    """The mean over every (fixed, moving) pair among the drawn patients, listed one by one (None: no pair)."""
    listed = [values[pairs.index((a, b))] for a, b in itertools.permutations(draw, 2) if (a, b) in pairs]
    return sum(listed) / len(listed) if listed else None


def test_bootstrap_interval_spans_the_extreme_draws():
    """Three patients, all 27 equally likely draws: every valid draw has probability >= 1/27 > 2.5%, so the
    95% interval runs from the smallest to the largest mean of the draws (enumerated here pair by pair)."""
    pairs = [(f, m) for f in (3, 7, 9) for m in (3, 7, 9) if f != m]
    values = [0.1, 0.5, 0.2, 0.9, 0.4, 0.3]
    means = [weighted_mean_by_enumeration(draw, pairs, values) for draw in itertools.product((3, 7, 9), repeat=3)]
    means = [m for m in means if m is not None]
    mean, low, high = compare.patient_bootstrap(torch.tensor(values), pairs, resamples=20000, seed=1)
    assert mean == pytest.approx(np.mean(values))
    assert low == pytest.approx(min(means)) and high == pytest.approx(max(means))


def test_bootstrap_is_seeded_and_collapses_for_equal_values():
    pairs = [(f, m) for f in range(5) for m in range(5) if f != m]
    values = np.linspace(0.2, 0.8, len(pairs))
    first = compare.patient_bootstrap(values, pairs, resamples=500, seed=3)
    assert first == compare.patient_bootstrap(values, pairs, resamples=500, seed=3)
    assert first[1] < first[0] < first[2]
    assert compare.patient_bootstrap(np.full(len(pairs), 0.4), pairs, resamples=200) == pytest.approx((0.4, 0.4, 0.4))


def test_bootstrap_refuses_bad_input():
    with pytest.raises(ValueError, match="finite"):
        compare.patient_bootstrap([0.5, float("nan")], [(0, 1), (1, 0)])
    with pytest.raises(ValueError, match=r"pairs \[P, 2\]"):
        compare.patient_bootstrap([0.5, 0.4], [(0, 1)])
    with pytest.raises(ValueError, match="level"):
        compare.patient_bootstrap([0.5, 0.4], [(0, 1), (1, 0)], level=0)
