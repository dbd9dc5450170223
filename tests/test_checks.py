"""The shared input checks: each refuses what it should with a message that names the argument."""

import numpy as np
import pytest
import torch

from tutorial_utils.checks import (
    check_choice,
    check_cost_volume,
    check_displacement,
    check_feature_pair,
    check_finite,
    check_image,
    check_int,
    check_labels,
    check_number,
    check_odd,
    check_same,
    check_tensor,
    check_volume,
    describe,
)

META = torch.device("meta")  # a second device that exists on every machine


def test_describe_shows_shape_dtype_and_device():
    assert describe(torch.zeros(2, 3, dtype=torch.int16)) == "a torch.int16 tensor of shape [2, 3] on cpu"
    assert describe(np.zeros((4,), dtype=np.uint8)) == "a ndarray of dtype uint8 and shape [4]"
    assert describe("x" * 100).endswith("...") and len(describe("x" * 100)) == 60


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), torch.tensor(3).item()])
def test_check_int_accepts_python_and_numpy_integers(value):
    assert check_int("n", value) == 3 and type(check_int("n", value)) is int


@pytest.mark.parametrize("value, kind", [(True, "bool"), (3.0, "float"), ("3", "str"), (None, "NoneType")])
def test_check_int_refuses_other_kinds(value, kind):
    with pytest.raises(TypeError, match=rf"pairs must be an integer, got .*\({kind}\)"):
        check_int("pairs", value)


def test_check_int_range():
    with pytest.raises(ValueError, match="pairs must be an integer >= 1, got -5"):
        check_int("pairs", -5, minimum=1)
    with pytest.raises(ValueError, match="threads must be an integer <= 4, got 5"):
        check_int("threads", 5, maximum=4)
    assert check_int("threads", 4, minimum=1, maximum=4) == 4


@pytest.mark.parametrize("value", [1, 3, 9, np.int64(21)])
def test_check_odd_accepts_odd(value):
    assert check_odd("disp_range", value) == int(value)


@pytest.mark.parametrize("value", [0, -3, 4, 10])
def test_check_odd_refuses_even_and_non_positive(value):
    with pytest.raises(ValueError, match=rf"disp_range must be an odd integer >= 1 \(a centred window\), got {value}"):
        check_odd("disp_range", value)


def test_check_odd_minimum():
    with pytest.raises(ValueError, match="disp_range must be an odd integer >= 3"):
        check_odd("disp_range", 1, minimum=3)
    with pytest.raises(TypeError, match="disp_range must be an integer"):
        check_odd("disp_range", 9.0)


def test_check_number():
    assert check_number("lr", np.float32(0.5), minimum=0) == 0.5
    assert check_number("alpha", 3) == 3.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="diffusion_weight must be a finite number"):
            check_number("diffusion_weight", bad)
    with pytest.raises(ValueError, match=r"alpha must be > 0, got 0.0"):
        check_number("alpha", 0, minimum=0, strict_minimum=True)
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -1.0"):
        check_number("lr", -1, minimum=0)
    with pytest.raises(ValueError, match=r"weight must be <= 1, got 2.0"):
        check_number("weight", 2, maximum=1)
    with pytest.raises(TypeError, match="alpha must be a number"):
        check_number("alpha", "10")
    with pytest.raises(TypeError, match="alpha must be a number"):
        check_number("alpha", True)


def test_check_choice():
    assert check_choice("mode", "com", ("none", "com")) == "com"
    with pytest.raises(ValueError, match=r"mode must be one of 'none', 'com'; got 'affin'"):
        check_choice("mode", "affin", ("none", "com"))
    with pytest.raises(ValueError, match="flag must be one of True, False; got 1"):
        check_choice("flag", 1, (True, False))  # 1 == True, but not the same kind of value


def test_check_finite_counts_nan_and_inf():
    x = torch.zeros(10)
    x[2], x[5], x[7] = float("nan"), float("inf"), float("nan")
    with pytest.raises(ValueError, match="image must be finite, but 3 of its 10 values are NaN or inf"):
        check_finite("image", x)
    assert check_finite("labels", torch.arange(3)) is not None  # integers are always finite
    assert check_finite("ok", torch.ones(3)).sum() == 3


def test_check_tensor_kinds():
    with pytest.raises(TypeError, match=r"image must be a torch.Tensor \[B, 1, H, W\], got a ndarray.*as_tensor"):
        check_tensor("image", np.zeros((1, 1, 4, 4)), dims=4, layout="[B, 1, H, W]")
    with pytest.raises(ValueError, match=r"image must be \[B, 1, H, W\], got a torch.float32 tensor of shape \[4, 4\]"):
        check_tensor("image", torch.zeros(4, 4), dims=4, layout="[B, 1, H, W]")
    with pytest.raises(ValueError, match=r"with 1 channel\(s\) in dimension 1, got .*shape \[1, 3, 4, 4\]"):
        check_tensor("image", torch.zeros(1, 3, 4, 4), dims=4, channels=1)
    with pytest.raises(ValueError, match=r"must be floating point \(e.g. .float\(\)\), got a torch.uint8"):
        check_tensor("image", torch.zeros(1, dtype=torch.uint8), floating=True)
    with pytest.raises(ValueError, match=r"labels must hold integers \(e.g. .long\(\)\), got a torch.float32"):
        check_tensor("labels", torch.zeros(1), floating=False)
    with pytest.raises(ValueError, match="labels must hold integers"):
        check_tensor("labels", torch.zeros(1, dtype=torch.bool), floating=False)
    assert check_tensor("x", torch.zeros(2, 3), dims=(2, 3)).shape == (2, 3)


def test_check_tensor_device():
    with pytest.raises(ValueError, match=r"displacement is on meta but must be on cpu .*\.to\('cpu'\)"):
        check_tensor("displacement", torch.zeros(1, device=META), device="cpu")


def test_check_same():
    a, b = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 12)
    with pytest.raises(ValueError, match=r"image_fixed and image_moving must have the same shape, got \[1, 1, 8, 8\] and \[1, 1, 8, 12\]"):
        check_same("image_fixed", a, "image_moving", b, shape=True)
    with pytest.raises(ValueError, match=r"must have the same size, got \[8, 8\] and \[8, 12\]"):
        check_same("moving", a, "displacement", b, spatial=2)
    with pytest.raises(ValueError, match="image_fixed is on cpu but image_moving is on meta"):
        check_same("image_fixed", a, "image_moving", torch.zeros(1, 1, 8, 8, device=META))
    with pytest.raises(ValueError, match="moving has batch 3 but displacement has batch 2"):
        check_same("moving", torch.zeros(3, 1), "displacement", torch.zeros(2, 1), batch=True)
    check_same("moving", torch.zeros(3, 1), "displacement", torch.zeros(1, 1), batch=True)  # 1 broadcasts


def test_check_image():
    assert check_image("image", torch.rand(2, 1, 8, 12, dtype=torch.float64), multiple_of=4).dtype == torch.float64
    with pytest.raises(ValueError, match=r"image_moving: height and width must be positive multiples of 4 .* got 10 x 12"):
        check_image("image_moving", torch.zeros(1, 1, 10, 12), multiple_of=4)
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="image_fixed must be finite, but 1 of its 64 values are NaN"):
        check_image("image_fixed", image)
    with pytest.raises(ValueError, match=r"image_fixed must be \[B, 1, H, W\]"):
        check_image("image_fixed", torch.zeros(1, 8, 8))


def test_check_volume():
    check_volume("volume", torch.zeros(1, 1, 4, 8, 8), multiple_of=2)
    with pytest.raises(ValueError, match=r"volume_fixed: each size must be a positive multiple of 2, got \[3, 8, 8\]"):
        check_volume("volume_fixed", torch.zeros(1, 1, 3, 8, 8), multiple_of=2)
    with pytest.raises(ValueError, match=r"volume_fixed must be \[B, 1, Z, Y, X\]"):
        check_volume("volume_fixed", torch.zeros(1, 1, 8, 8))


def test_check_labels():
    check_labels("labels", torch.zeros(2, 4, 4, dtype=torch.uint8), num_labels=9)
    with pytest.raises(ValueError, match=r"labels_moving must hold values 0..8, got values from 0 to 9"):
        check_labels("labels_moving", torch.tensor([[[0, 9]]]), num_labels=9)
    with pytest.raises(ValueError, match=r"labels_moving must hold values 0..8, got values from -1 to 0"):
        check_labels("labels_moving", torch.tensor([[[0, -1]]]), num_labels=9)
    with pytest.raises(ValueError, match=r"labels must be \[B, H, W\]"):
        check_labels("labels", torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must hold integers"):
        check_labels("labels", torch.zeros(1, 4, 4))
    check_labels("labels", torch.zeros(4, 4, dtype=torch.long), dims=2)


def test_check_displacement():
    check_displacement("displacement", torch.zeros(1, 2, 4, 4))
    check_displacement("displacement", torch.zeros(1, 3, 4, 4, 4), ndim=3)
    with pytest.raises(ValueError, match=r"displacement must be \[B, 2, H, W\] with channels \(dy, dx\)"):
        check_displacement("displacement", torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, 3, Z, Y, X\] with channels \(dz, dy, dx\)"):
        check_displacement("displacement", torch.zeros(1, 2, 4, 4), ndim=3)
    with pytest.raises(ValueError, match="displacement must be finite"):
        check_displacement("displacement", torch.full((1, 2, 4, 4), float("inf")))


def test_check_cost_volume():
    assert check_cost_volume("cost", torch.zeros(2, 9, 5, 6), 3) == (3, 2, 5, 6)
    assert check_cost_volume("cost", torch.zeros(1, 27, 2, 3, 4), np.int64(3), ndim=3) == (3, 1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"cost has 8 displacement channels, expected disp_range\*\*2 = 9"):
        check_cost_volume("cost", torch.zeros(1, 8, 2, 2), 3)
    with pytest.raises(ValueError, match="disp_range must be an odd integer"):
        check_cost_volume("cost", torch.zeros(1, 16, 2, 2), 4)
    with pytest.raises(ValueError, match="cost must be floating point"):
        check_cost_volume("cost", torch.zeros(1, 9, 2, 2, dtype=torch.long), 3)
    cost = torch.zeros(1, 9, 2, 2)
    cost[0, 4, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="cost must be finite, but 1 of its 36 values are NaN"):
        check_cost_volume("cost", cost, 3)


def test_check_feature_pair():
    check_feature_pair(torch.zeros(1, 4, 5, 6), torch.zeros(1, 4, 5, 6))
    with pytest.raises(ValueError, match=r"feat_fixed and feat_moving must have the same shape"):
        check_feature_pair(torch.zeros(1, 4, 5, 6), torch.zeros(1, 3, 5, 6))
    with pytest.raises(ValueError, match="feat_moving must be finite"):
        check_feature_pair(torch.zeros(1, 4, 5, 6), torch.full((1, 4, 5, 6), float("nan")))
    with pytest.raises(ValueError, match=r"feat_fixed must be \[B, C, d, h, w\]"):
        check_feature_pair(torch.zeros(1, 4, 5, 6), torch.zeros(1, 4, 5, 6), ndim=3)
