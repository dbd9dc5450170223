"""The checkers of notebook 03's exercises catch each usual mistake and accept correct answers,
also ones written differently from the reference."""

from __future__ import annotations

import re
import textwrap

import pytest
import torch
import torch.nn.functional as F

from tutorial_utils import regularisation as R
from tutorial_utils.exercises._core import CORRECT, ERROR, INCORRECT, NOT_ATTEMPTED
from tutorial_utils.exercises.regularisation import _mean_field_loop, q1, q2, q3


def _status(exercise, answer):
    result = exercise.evaluate(answer)
    return result.status, result.message


# =========================================================================== q1: min-convolution


def slides_style(cost, disp_range):
    """nn modules as on the 2019 slides, min first."""
    B, K, h, w = cost.shape
    seq = torch.nn.Sequential(torch.nn.ReplicationPad2d(5), torch.nn.MaxPool2d(3, stride=1))
    grid = -seq(-cost.permute(0, 2, 3, 1).reshape(-1, 1, disp_range, disp_range))
    avg = torch.nn.AvgPool2d(5, stride=1)
    return avg(avg(grid)).reshape(B, h, w, K).permute(0, 3, 1, 2)


def pool3d_style(cost, disp_range):
    """No permute at all: 3D pooling over the two displacement dims of a [B, 1, D, D, h*w] view."""
    B, K, h, w = cost.shape
    grid = F.pad(cost.reshape(B, 1, disp_range, disp_range, h * w), (0, 0, 5, 5, 5, 5), mode="replicate")
    grid = -F.max_pool3d(-grid, (3, 3, 1), stride=1)
    grid = F.avg_pool3d(F.avg_pool3d(grid, (5, 5, 1), stride=1), (5, 5, 1), stride=1)
    return grid.reshape(B, K, h, w)


@pytest.mark.parametrize("answer", [slides_style, pool3d_style, R.min_convolution])
def test_q1_correct_answers_pass(answer):
    status, message = _status(q1, answer)
    assert status == CORRECT, message


def test_q1_solution_passes():
    namespace = {"F": F, "torch": torch}
    exec(textwrap.dedent(q1.solution_code), namespace)
    status, message = _status(q1, namespace["my_min_convolution"])
    assert status == CORRECT, message


def _recipe(cost, D, pad=5, mode="replicate", first="min", n_avg=2, stride=1, pool_min=True, spatial=False):
    B, K, h, w = cost.shape
    grid = cost if spatial else cost.permute(0, 2, 3, 1).reshape(-1, 1, D, D)
    if pad:
        grid = F.pad(grid, (pad,) * 4, mode=mode)

    def minpool(x):
        return -F.max_pool2d(-x, 3, stride=stride) if pool_min else F.max_pool2d(x, 3, stride=stride)

    if first == "min":
        grid = minpool(grid)
    for _ in range(n_avg):
        grid = F.avg_pool2d(grid, 5, stride=1)
    if first == "avg":
        grid = minpool(grid)
    if spatial:
        return grid
    return grid.reshape(B, h, w, -1).permute(0, 3, 1, 2)


MISTAKES_Q1 = {
    "no padding": (lambda c, D: _recipe(c, D, pad=0), ("padding", "shrank", "pad")),
    "padding too small": (lambda c, D: _recipe(c, D, pad=3), ("shrank",)),
    "padding too large": (lambda c, D: _recipe(c, D, pad=6), ("too large",)),
    "zero padding": (lambda c, D: _recipe(c, D, mode="constant"), ("replication",)),
    "reflect padding": (lambda c, D: _recipe(c, D, mode="reflect"), ("reflection",)),
    "max instead of min": (lambda c, D: _recipe(c, D, pool_min=False), ("maximum instead of the minimum",)),
    "average first": (lambda c, D: _recipe(c, D, first="avg"), ("order of the poolings",)),
    "one average pooling": (lambda c, D: _recipe(c, D, pad=3, n_avg=1), ("One average pooling is missing",)),
    "spatial pooling": (lambda c, D: _recipe(c, D, spatial=True), ("spatial dimensions",)),
    "plain reshape": (lambda c, D: _recipe(c.reshape(-1, 1, D, D).reshape(c.shape).permute(0, 2, 3, 1).reshape(
        c.shape[0], D * D, c.shape[2], c.shape[3]), D), ()),
    "stride = kernel": (lambda c, D: _recipe(c, D, stride=3), ("stride",)),
    "returns numpy": (lambda c, D: R.min_convolution(c, D).detach().numpy(), ("torch.Tensor",)),
    "detached": (lambda c, D: R.min_convolution(c, D).detach(), ("differentiable",)),
}


@pytest.mark.parametrize("name", sorted(MISTAKES_Q1))
def test_q1_catches_mistake(name):
    answer, words = MISTAKES_Q1[name]
    status, message = _status(q1, answer)
    assert status == INCORRECT, (name, status, message)
    for word in words:
        assert word.lower() in message.lower(), (name, message)


def test_q1_plain_reshape_is_named():
    def plain_reshape(cost, D):
        B, K, h, w = cost.shape
        grid = F.pad(cost.reshape(-1, 1, D, D), (5,) * 4, mode="replicate")
        grid = F.avg_pool2d(F.avg_pool2d(-F.max_pool2d(-grid, 3, stride=1), 5, stride=1), 5, stride=1)
        return grid.reshape(B, K, h, w)

    status, message = _status(q1, plain_reshape)
    assert status == INCORRECT and "reshape mixes the dimensions" in message


def test_q1_stub_error_and_fallback(capsys):
    def stub(cost, disp_range):
        raise NotImplementedError

    assert _status(q1, stub)[0] == NOT_ATTEMPTED

    def broken(cost, disp_range):
        raise KeyError("oops")

    assert _status(q1, broken)[0] == ERROR
    chosen = q1.use(stub, fallback=R.min_convolution)
    assert chosen is R.min_convolution
    assert "reference" in capsys.readouterr().out


# =========================================================================== q2: soft arg-min


def soft_loop(cost, disp_range, alpha):
    """Explicit loop over the displacement channels."""
    r = (disp_range - 1) // 2
    prob = torch.exp(-alpha * cost - torch.logsumexp(-alpha * cost, dim=1, keepdim=True))
    dy = torch.zeros_like(cost[:, 0])
    dx = torch.zeros_like(cost[:, 0])
    for k in range(disp_range**2):
        dy = dy + prob[:, k] * (k // disp_range - r)
        dx = dx + prob[:, k] * (k % disp_range - r)
    return prob, torch.stack([dy, dx], 1)


@pytest.mark.parametrize("answer", [soft_loop, R.soft_displacement])
def test_q2_correct_answers_pass(answer):
    status, message = _status(q2, answer)
    assert status == CORRECT, message


def test_q2_solution_passes():
    namespace = {"F": F, "torch": torch}
    exec(textwrap.dedent(q2.solution_code), namespace)
    status, message = _status(q2, namespace["my_soft_displacement"])
    assert status == CORRECT, message


def _soft(cost, D, alpha, sign=-1.0, dim=1, use_alpha=True, offsets="ij", centred=True, hard=False):
    r = (D - 1) // 2
    prob = torch.softmax(sign * (alpha if use_alpha else 1.0) * cost, dim=dim)
    steps = torch.arange(-r, r + 1, dtype=cost.dtype) + (0 if centred else r)
    gy, gx = torch.meshgrid(steps, steps, indexing=offsets)
    if hard:
        k = cost.argmin(1)
        return prob, torch.stack([gy.reshape(-1)[k], gx.reshape(-1)[k]], 1)
    dy = (prob * gy.reshape(1, -1, 1, 1)).sum(1)
    dx = (prob * gx.reshape(1, -1, 1, 1)).sum(1)
    return prob, torch.stack([dy, dx], 1)


MISTAKES_Q2 = {
    "softmax of +cost": (lambda c, D, a: _soft(c, D, a, sign=1.0), "LARGEST cost"),
    "alpha missing": (lambda c, D, a: _soft(c, D, a, use_alpha=False), "alpha is missing"),
    "softmax over dim 2": (lambda c, D, a: _soft(c, D, a, dim=2), "wrong dimension"),
    "softmax over dim 3": (lambda c, D, a: _soft(c, D, a, dim=3), "wrong dimension"),
    "softmax over dim 0": (lambda c, D, a: _soft(c, D, a, dim=0), "wrong dimension"),
    "grid order xy": (lambda c, D, a: _soft(c, D, a, offsets="xy"), "wrong order"),
    "channels (dx, dy)": (lambda c, D, a: tuple([_soft(c, D, a)[0], _soft(c, D, a)[1].flip(1)]), "wrong order"),
    "grid not centred": (lambda c, D, a: _soft(c, D, a, centred=False), "not centred"),
    "hard arg-min": (lambda c, D, a: _soft(c, D, a, hard=True), "hard arg-min"),
    "wrong tuple order": (lambda c, D, a: _soft(c, D, a)[::-1], "wrong order"),
    "channels last": (lambda c, D, a: (_soft(c, D, a)[0], _soft(c, D, a)[1].permute(0, 2, 3, 1)), "Channels last"),
    "only displacement": (lambda c, D, a: _soft(c, D, a)[1], "Return two tensors"),
}


@pytest.mark.parametrize("name", sorted(MISTAKES_Q2))
def test_q2_catches_mistake(name):
    answer, words = MISTAKES_Q2[name]
    status, message = _status(q2, answer)
    assert status == INCORRECT, (name, status, message)
    assert words.lower() in message.lower(), (name, message)


def test_q2_stub_is_not_attempted():
    def stub(cost, disp_range, alpha):
        raise NotImplementedError

    assert _status(q2, stub)[0] == NOT_ATTEMPTED
    assert q2.use(stub, fallback=R.soft_displacement) is R.soft_displacement


def test_hints_and_solutions_show(capsys):
    for exercise in (q1, q2):
        exercise.hint()
        exercise.hint(3)
        exercise.solution()
    out = capsys.readouterr().out
    assert "hint 1 of 3" in out and "hint 3 of 3" in out and "def my_min_convolution" in out


# =========================================================================== q3: the mean field


@pytest.mark.parametrize("shape, kernel, passes", [((2, 9, 4, 5), 3, 2), ((1, 25, 5, 3), 5, 3), ((1, 4, 3, 2), 3, 1),
                                                    ((1, 9, 2, 3), 5, 1), ((2, 1, 3, 3), 1, 2), ((1, 9, 3, 4), 3, 0)])
def test_q3_reference_loop_is_the_package_mean_field(shape, kernel, passes):
    """The checker's brute-force loop and tutorial_utils.regularisation.mean_field are the same definition."""
    cost = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)
    expected = R.mean_field(cost, kernel=kernel, passes=passes)
    torch.testing.assert_close(_mean_field_loop(cost, kernel, passes), expected, rtol=1e-12, atol=1e-12)


def mean_field_modules(cost, kernel, passes):
    """nn modules, as the 2019 slides wrote the poolings."""
    pad = torch.nn.ReplicationPad2d(passes * (kernel - 1) // 2)
    pool = torch.nn.AvgPool2d(kernel, stride=1)
    x = pad(cost)
    for _ in range(passes):
        x = pool(x)
    return x


def mean_field_unfold(cost, kernel, passes):
    """Window means with Tensor.unfold instead of pooling."""
    p = passes * (kernel - 1) // 2
    x = F.pad(cost, (p, p, p, p), mode="replicate")
    for _ in range(passes):
        x = x.unfold(2, kernel, 1).unfold(3, kernel, 1).mean(dim=(-2, -1))
    return x


@pytest.mark.parametrize("answer", [mean_field_modules, mean_field_unfold, R.mean_field])
def test_q3_correct_answers_pass(answer):
    status, message = _status(q3, answer)
    assert status == CORRECT, message


def test_q3_solution_passes():
    namespace = {"F": F, "torch": torch}
    exec(textwrap.dedent(q3.solution_code), namespace)
    status, message = _status(q3, namespace["my_mean_field"])
    assert status == CORRECT, message


def _mf(cost, kernel, passes, pad=None, mode="replicate", per_pass=False, pool_padding=0, include=True, stride=1):
    pad = passes * (kernel - 1) // 2 if pad is None else pad
    x = cost
    if pad and not per_pass:
        x = F.pad(x, (pad,) * 4, mode=mode)
    for _ in range(passes):
        if per_pass:
            x = F.pad(x, ((kernel - 1) // 2,) * 4, mode=mode)
        x = F.avg_pool2d(x, kernel, stride=stride, padding=pool_padding, count_include_pad=include)
    return x


def mean_field_over_displacements(cost, kernel, passes):
    """The min-convolution's reshape: pools each pixel's D x D grid instead of the image."""
    B, K, h, w = cost.shape
    D = round(K**0.5)
    grid = _mf(cost.permute(0, 2, 3, 1).reshape(-1, 1, D, D), kernel, passes)
    return grid.reshape(B, h, w, K).permute(0, 3, 1, 2)


def mean_field_3d(cost, kernel, passes):
    p = passes * (kernel - 1) // 2
    x = F.pad(cost[:, None], (p,) * 6, mode="replicate")
    for _ in range(passes):
        x = F.avg_pool3d(x, kernel, stride=1)
    return x[:, 0]


def mean_field_3d_channels_shrink(cost, kernel, passes):
    p = passes * (kernel - 1) // 2
    x = F.pad(cost, (p,) * 4, mode="replicate")[:, None]
    for _ in range(passes):
        x = F.avg_pool3d(x, kernel, stride=1)
    return x[:, 0]


MISTAKES_Q3 = {
    "zero padding": (lambda c, k, n: _mf(c, k, n, mode="constant"), r"^Wrong padding mode: with zero padding"),
    "pool padding (zeros)": (lambda c, k, n: _mf(c, k, n, pad=0, pool_padding=(k - 1) // 2),
                             r"^Wrong padding mode: avg_pool2d's own padding= pads with zeros"),
    "count_include_pad=False": (lambda c, k, n: _mf(c, k, n, pad=0, pool_padding=(k - 1) // 2, include=False),
                                r"^Wrong padding: avg_pool2d\(\.\.\., padding=\.\.\., count_include_pad=False\)"),
    "reflect padding": (lambda c, k, n: _mf(c, k, n, mode="reflect"), r"^Wrong padding mode: .* not reflection"),
    "padding every pass": (lambda c, k, n: _mf(c, k, n, per_pass=True), r"^You padded before every pass"),
    "one pass too few": (lambda c, k, n: _mf(c, k, n - 1), r"^Wrong number of passes: you averaged 1 times; the "
                                                           r"exercise asks for passes = 2"),
    "one pass too many": (lambda c, k, n: _mf(c, k, n + 1), r"^Wrong number of passes: you averaged 3 times"),
    "passes hard-coded 3": (lambda c, k, n: _mf(c, k, 3), r"^Wrong number of passes: you averaged 3 times; the "
                                                         r"exercise asks for passes = 2"),
    "kernel hard-coded 5": (lambda c, k, n: _mf(c, 5, n), r"^Wrong kernel size: you pooled 5 x 5 windows"),
    "over the displacements": (mean_field_over_displacements, r"^You pooled over the displacement dimensions"),
    "3D pooling": (mean_field_3d, r"^You pooled over the displacement channels as well as the image"),
    "3D pooling, channels shrink": (mean_field_3d_channels_shrink,
                                    r"^Wrong output shape: .* The number of displacement channels changed"),
    "padding lost": (lambda c, k, n: _mf(c, k, n, pad=0),
                     r"^Wrong output shape: .* The image shrank by 4 = passes \* \(kernel - 1\): the padding was lost"),
    "padding lost, small map": (lambda c, k, n: R.mean_field(c, k, n) if c.shape[-2] > 5 else _mf(c, k, n, pad=0),
                                r"^The image shrank to nothing: .* The padding was lost"),
    "padding too small": (lambda c, k, n: _mf(c, k, n, pad=1), r"^Wrong output shape: .* the padding is too small"),
    "padding too large": (lambda c, k, n: _mf(c, k, n, pad=3), r"^Wrong output shape: .* The image grew"),
    "default stride": (lambda c, k, n: _mf(c, k, n, stride=k), r"stride"),
    "returns numpy": (lambda c, k, n: R.mean_field(c, k, n).detach().numpy(), r"^Your function should return a "
                                                                           r"torch\.Tensor, it returned ndarray"),
    "detached": (lambda c, k, n: R.mean_field(c, k, n).detach(), r"^Not differentiable"),
}


@pytest.mark.parametrize("name", sorted(MISTAKES_Q3))
def test_q3_catches_mistake(name):
    answer, pattern = MISTAKES_Q3[name]
    status, message = _status(q3, answer)
    assert status == INCORRECT, (name, status, message)
    assert re.search(pattern, message), (name, message)


def test_q3_unexplained_values_point_at_a_pixel():
    status, message = _status(q3, lambda c, k, n: R.mean_field(c, k, n) * 1.1)
    assert status == INCORRECT and re.search(r"^Wrong values: e\.g\. channel k=\d+ at pixel .* should be", message)


def test_q3_stub_not_a_function_and_fallback(capsys):
    def stub(cost, kernel, passes):
        raise NotImplementedError  # replace this line with your code

    assert _status(q3, stub)[0] == NOT_ATTEMPTED
    status, message = _status(q3, "my_mean_field")
    assert status == INCORRECT and "q3.check(my_mean_field)" in message
    assert q3.use(stub, fallback=R.mean_field) is R.mean_field
    assert "reference" in capsys.readouterr().out
    q3.hint(2)
    q3.solution()
    out = capsys.readouterr().out
    assert "Exercise 3: the mean field: hint 2 of 3" in out and "def my_mean_field(cost, kernel, passes):" in out
