"""The checker of notebook 02's exercise catches each usual mistake and accepts correct answers,
also ones written differently from the reference."""

from __future__ import annotations

import re
import textwrap

import pytest
import torch
import torch.nn.functional as F

from tutorial_utils.correlation import correlation, correlation_unfold
from tutorial_utils.exercises._core import CORRECT, ERROR, INCORRECT, NOT_ATTEMPTED
from tutorial_utils.exercises.correlation import q1, q2


def _status(answer):
    result = q1.evaluate(answer)
    return result.status, result.message


# --------------------------------------------------------------------------- correct answers


def unfold_2019(feat_fixed, feat_moving, disp_range):
    """The 2019 layer, written as on the slides."""
    B, C, H, W = feat_fixed.size()
    disp_hw = (disp_range - 1) // 2
    feat_mov_unfold = F.unfold(feat_moving.transpose(1, 0), (disp_range, disp_range), padding=disp_hw)
    ssd = ((feat_fixed.view(C, 1, -1) - feat_mov_unfold) ** 2).sum(0)
    return ssd.view(1, disp_range**2, H, W)


def loop_over_shifts(feat_fixed, feat_moving, disp_range):
    """Pad and slice, one offset at a time: nothing like unfold."""
    r = (disp_range - 1) // 2
    H, W = feat_fixed.shape[-2:]
    padded = F.pad(feat_moving, (r, r, r, r))
    costs = []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            shifted = padded[:, :, r + dy:r + dy + H, r + dx:r + dx + W]
            costs.append(((feat_fixed - shifted) ** 2).sum(dim=1))
    return torch.stack(costs, dim=1)


def expanded_square(feat_fixed, feat_moving, disp_range):
    """||f||^2 + ||m||^2 - 2 f.m through the fast layer's dot metric."""
    ones = torch.ones_like(feat_moving[:, :1])
    norm_moving = correlation(ones, (feat_moving**2).sum(1, keepdim=True), disp_range, metric="dot")
    return (feat_fixed**2).sum(1, keepdim=True) - norm_moving + 2 * correlation(
        feat_fixed, feat_moving, disp_range, metric="dot")


@pytest.mark.parametrize("answer", [unfold_2019, loop_over_shifts, expanded_square, correlation_unfold,
                                    correlation])
def test_correct_answers_pass(answer):
    status, message = _status(answer)
    assert status == CORRECT, message


def test_the_solution_passes():
    namespace = {"F": F, "torch": torch}
    exec(textwrap.dedent(q1.solution_code), namespace)
    status, message = _status(namespace["my_correlation_layer"])
    assert status == CORRECT, message


# --------------------------------------------------------------------------- not attempted, errors


def stub(feat_fixed, feat_moving, disp_range):
    raise NotImplementedError


def test_stub_is_not_attempted():
    status, message = _status(stub)
    assert status == NOT_ATTEMPTED
    assert "NotImplementedError" in message


def test_an_exception_is_reported_without_traceback():
    def broken(feat_fixed, feat_moving, disp_range):
        return feat_fixed @ feat_moving  # shapes do not fit

    status, message = _status(broken)
    assert status == ERROR
    assert message.startswith("RuntimeError")


def test_not_a_function_and_not_a_tensor():
    assert _status(42)[0] == INCORRECT
    status, message = _status(lambda f, m, d: None)
    assert status == INCORRECT and "torch.Tensor" in message


# --------------------------------------------------------------------------- each mistake, named


def no_padding(feat_fixed, feat_moving, disp_range):
    B, C, H, W = feat_fixed.shape
    unfolded = F.unfold(feat_moving.transpose(0, 1), (disp_range, disp_range))  # no padding
    r = (disp_range - 1) // 2
    inner = feat_fixed[:, :, r:H - r, r:W - r].reshape(C, 1, -1)
    return ((inner - unfolded) ** 2).sum(0).view(1, disp_range**2, H - 2 * r, W - 2 * r)


def no_channel_sum(feat_fixed, feat_moving, disp_range):
    B, C, H, W = feat_fixed.shape
    unfolded = F.unfold(feat_moving.transpose(0, 1), (disp_range, disp_range), padding=(disp_range - 1) // 2)
    return ((feat_fixed.view(C, 1, -1) - unfolded) ** 2).view(1, C * disp_range**2, H, W)


def flat_output(feat_fixed, feat_moving, disp_range):
    return unfold_2019(feat_fixed, feat_moving, disp_range).flatten(2)


def swapped_order(feat_fixed, feat_moving, disp_range):
    H, W = feat_fixed.shape[-2:]
    D = disp_range
    return unfold_2019(feat_fixed, feat_moving, D).view(1, D, D, H, W).transpose(1, 2).reshape(1, D * D, H, W)


def flipped_offsets(feat_fixed, feat_moving, disp_range):
    """Shifts the fixed features instead of the moving ones: offset (-dy, -dx) in channel k."""
    r = (disp_range - 1) // 2
    H, W = feat_fixed.shape[-2:]
    padded = F.pad(feat_moving, (r, r, r, r))
    costs = [((feat_fixed - padded[:, :, r - dy:r - dy + H, r - dx:r - dx + W]) ** 2).sum(dim=1)
             for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    return torch.stack(costs, dim=1)


def shuffled_channels(feat_fixed, feat_moving, disp_range):
    out = unfold_2019(feat_fixed, feat_moving, disp_range)
    order = torch.arange(disp_range**2)
    order[[0, 3]] = order[[3, 0]]
    return out[:, order]


def replicate_padding(feat_fixed, feat_moving, disp_range):
    r = (disp_range - 1) // 2
    padded = F.pad(feat_moving, (r, r, r, r), mode="replicate")
    C, H, W = feat_fixed.shape[1:]
    unfolded = F.unfold(padded.transpose(0, 1), (disp_range, disp_range))
    return ((feat_fixed.view(C, 1, -1) - unfolded) ** 2).sum(0).view(1, disp_range**2, H, W)


def border_fill_one(feat_fixed, feat_moving, disp_range):
    """Pads with ones: right inside, wrong at the border (no named padding mode)."""
    r = (disp_range - 1) // 2
    padded = F.pad(feat_moving, (r, r, r, r), value=1.0)
    C, H, W = feat_fixed.shape[1:]
    unfolded = F.unfold(padded.transpose(0, 1), (disp_range, disp_range))
    return ((feat_fixed.view(C, 1, -1) - unfolded) ** 2).sum(0).view(1, disp_range**2, H, W)


def no_square(feat_fixed, feat_moving, disp_range):
    C, H, W = feat_fixed.shape[1:]
    unfolded = F.unfold(feat_moving.transpose(0, 1), (disp_range, disp_range), padding=(disp_range - 1) // 2)
    return (feat_fixed.view(C, 1, -1) - unfolded).sum(0).view(1, disp_range**2, H, W)


def absolute_differences(feat_fixed, feat_moving, disp_range):
    C, H, W = feat_fixed.shape[1:]
    unfolded = F.unfold(feat_moving.transpose(0, 1), (disp_range, disp_range), padding=(disp_range - 1) // 2)
    return (feat_fixed.view(C, 1, -1) - unfolded).abs().sum(0).view(1, disp_range**2, H, W)


def plus_instead_of_minus(feat_fixed, feat_moving, disp_range):
    C, H, W = feat_fixed.shape[1:]
    unfolded = F.unfold(feat_moving.transpose(0, 1), (disp_range, disp_range), padding=(disp_range - 1) // 2)
    return ((feat_fixed.view(C, 1, -1) + unfolded) ** 2).sum(0).view(1, disp_range**2, H, W)


def negative_costs(feat_fixed, feat_moving, disp_range):
    return -unfold_2019(feat_fixed, feat_moving, disp_range)


def square_root(feat_fixed, feat_moving, disp_range):
    return unfold_2019(feat_fixed, feat_moving, disp_range).sqrt()


def channel_mean(feat_fixed, feat_moving, disp_range):
    return unfold_2019(feat_fixed, feat_moving, disp_range) / feat_fixed.shape[1]


def detached(feat_fixed, feat_moving, disp_range):
    return unfold_2019(feat_fixed.detach(), feat_moving.detach(), disp_range)


def through_numpy(feat_fixed, feat_moving, disp_range):
    out = unfold_2019(feat_fixed, feat_moving, disp_range)
    return torch.from_numpy(out.detach().numpy().copy())


def only_fixed_differentiable(feat_fixed, feat_moving, disp_range):
    return unfold_2019(feat_fixed, feat_moving.detach(), disp_range)


def hard_coded_disp_range(feat_fixed, feat_moving, disp_range):
    return unfold_2019(feat_fixed, feat_moving, 5)


def numpy_inside(feat_fixed, feat_moving, disp_range):
    out = unfold_2019(feat_fixed, feat_moving, disp_range)
    return torch.as_tensor(out.numpy())  # raises when the inputs require grad


MISTAKES = [
    (no_padding, ["Wrong output shape", "pad the moving features"]),
    (no_channel_sum, ["Wrong output shape", "sum the squared differences over the channels"]),
    (flat_output, ["Wrong output shape", ".view(1, D*D, H, W)"]),
    (hard_coded_disp_range, ["Wrong output shape", "use the disp_range argument"]),
    (swapped_order, ["Wrong displacement order", "x and y are swapped"]),
    (flipped_offsets, ["Wrong displacement order", "sign of the displacement is flipped"]),
    (shuffled_channels, ["Wrong displacement order", "wrong channels"]),
    (replicate_padding, ["Wrong padding at the border", "replicate"]),
    (border_fill_one, ["Wrong padding at the border", "zero outside the image"]),
    (no_square, ["A square is missing"]),
    (absolute_differences, ["sum of absolute differences"]),
    (plus_instead_of_minus, ["A sign is wrong"]),
    (negative_costs, ["wrong sign"]),
    (square_root, ["square root"]),
    (channel_mean, ["averaged over the channels"]),
    (detached, ["Not differentiable"]),
    (through_numpy, ["Not differentiable"]),
    (numpy_inside, ["Not differentiable", "RuntimeError"]),
    (only_fixed_differentiable, ["Not differentiable with respect to feat_moving"]),
]


@pytest.mark.parametrize("answer,phrases", MISTAKES, ids=[m[0].__name__ for m in MISTAKES])
def test_each_mistake_is_named(answer, phrases):
    status, message = _status(answer)
    assert status == INCORRECT, message
    for phrase in phrases:
        assert phrase in message, message


def test_an_unexplained_error_points_at_a_pixel():
    def off_by_a_bit(feat_fixed, feat_moving, disp_range):
        out = unfold_2019(feat_fixed, feat_moving, disp_range)
        return out + 0.5 * (out > 1).to(out.dtype)

    status, message = _status(off_by_a_bit)
    assert status == INCORRECT
    assert "Wrong values" in message and "should be" in message


# --------------------------------------------------------------------------- hint, solution, use


def test_hints_and_solution_print(capsys):
    q1.hint()
    q1.hint(2)
    q1.hint(99)  # clamped to the last one
    q1.solution()
    out = capsys.readouterr().out
    assert "hint 1 of 3" in out and "hint 2 of 3" in out and "hint 3 of 3" in out
    assert "F.unfold" in out and "def my_correlation_layer" in out


def test_check_shows_the_result_once(capsys):
    assert q1.check(stub) is None  # shown, not returned: a cell ending in check() shows it once
    assert capsys.readouterr().out.count("Not attempted yet") == 1


def test_use_falls_back_with_a_notice(capsys):
    assert q1.use(stub, fallback=correlation_unfold) is correlation_unfold
    assert "reference implementation" in capsys.readouterr().out
    assert q1.use(loop_over_shifts, fallback=correlation_unfold) is loop_over_shifts
    assert "using your implementation" in capsys.readouterr().out


# =========================================================================== q2: a batch of pairs


def _status2(answer):
    result = q2.evaluate(answer)
    return result.status, result.message


def batch_unfold(feat_fixed, feat_moving, disp_range):
    """Unfold on the batch, channel-major view: the exercise's way."""
    B, C, H, W = feat_fixed.shape
    D = disp_range
    unfolded = F.unfold(feat_moving, (D, D), padding=(D - 1) // 2).view(B, C, D * D, H * W)
    return ((feat_fixed.view(B, C, 1, H * W) - unfolded) ** 2).sum(1).view(B, D * D, H, W)


def pair_by_pair(feat_fixed, feat_moving, disp_range):
    """The single-pair layer on each pair, concatenated."""
    return torch.cat([unfold_2019(feat_fixed[b:b + 1], feat_moving[b:b + 1], disp_range)
                      for b in range(feat_fixed.shape[0])])


def transpose_trick_done_right(feat_fixed, feat_moving, disp_range):
    """The 2019 transpose with the batch kept apart: the batch becomes unfold's channels."""
    B, C, H, W = feat_fixed.shape
    D = disp_range
    unfolded = F.unfold(feat_moving.transpose(0, 1), (D, D), padding=(D - 1) // 2)  # [C, B*D*D, H*W]
    fixed = feat_fixed.transpose(0, 1).reshape(C, B, 1, H * W)
    return ((fixed - unfolded.view(C, B, D * D, H * W)) ** 2).sum(0).view(B, D * D, H, W)


@pytest.mark.parametrize("answer", [batch_unfold, pair_by_pair, transpose_trick_done_right, loop_over_shifts,
                                    correlation_unfold, correlation])
def test_q2_correct_answers_pass(answer):
    status, message = _status2(answer)
    assert status == CORRECT, message


def test_q2_solution_passes():
    namespace = {"F": F, "torch": torch}
    exec(textwrap.dedent(q2.solution_code), namespace)
    status, message = _status2(namespace["my_correlation_batch"])
    assert status == CORRECT, message


def test_q2_stub_not_a_function_not_a_tensor():
    assert _status2(stub) == (NOT_ATTEMPTED, _status(stub)[1])
    status, message = _status2(42)
    assert status == INCORRECT and "q2.check(my_correlation_batch)" in message
    status, message = _status2(lambda f, m, d: batch_unfold(f, m, d).numpy())
    assert status == INCORRECT and "torch.Tensor" in message


def pair_zero_repeated(feat_fixed, feat_moving, disp_range):
    return unfold_2019(feat_fixed[:1], feat_moving[:1], disp_range).expand(feat_fixed.shape[0], -1, -1, -1)


def moving_flipped(feat_fixed, feat_moving, disp_range):
    return batch_unfold(feat_fixed, feat_moving.flip(0), disp_range)


def moving_rolled(feat_fixed, feat_moving, disp_range):
    return batch_unfold(feat_fixed, feat_moving.roll(1, dims=0), disp_range)


def pairs_reversed(feat_fixed, feat_moving, disp_range):
    return batch_unfold(feat_fixed, feat_moving, disp_range).flip(0)


def only_pair_zero(feat_fixed, feat_moving, disp_range):
    return unfold_2019(feat_fixed[:1], feat_moving[:1], disp_range)


def pairs_summed(feat_fixed, feat_moving, disp_range):
    return batch_unfold(feat_fixed, feat_moving, disp_range).sum(0, keepdim=True)


def second_pair_wrong(feat_fixed, feat_moving, disp_range):
    out = batch_unfold(feat_fixed, feat_moving, disp_range)
    return torch.cat([out[:1], out[1:] * 1.5])


def channels_confused(feat_fixed, feat_moving, disp_range):
    B, C, H, W = feat_fixed.shape
    D = disp_range
    unfolded = F.unfold(feat_moving, (D, D), padding=(D - 1) // 2).view(B, D * D, C, H * W)  # wrong order
    return ((feat_fixed.view(B, 1, C, H * W) - unfolded) ** 2).sum(2).view(B, D * D, H, W)


def single_pair_layer(feat_fixed, feat_moving, disp_range):
    """q1's solution used as it is: its views assume B = 1."""
    return unfold_2019(feat_fixed, feat_moving, disp_range)


def view_without_batch(feat_fixed, feat_moving, disp_range):
    """Unfold on the batch, then the single-pair layer's view(C, 1, H*W) of the fixed features."""
    B, C, H, W = feat_fixed.shape
    D = disp_range
    unfolded = F.unfold(feat_moving, (D, D), padding=(D - 1) // 2).view(B, C, D * D, H * W)
    return ((feat_fixed.view(C, 1, H * W) - unfolded) ** 2).sum(1).view(B, D * D, H, W)


def batch_sum(feat_fixed, feat_moving, disp_range):
    """sum(0) as in the single-pair layer: that sums the pairs, not the channels."""
    B, C, H, W = feat_fixed.shape
    D = disp_range
    unfolded = F.unfold(feat_moving, (D, D), padding=(D - 1) // 2).view(B, C, D * D, H * W)
    return ((feat_fixed.view(B, C, 1, H * W) - unfolded) ** 2).sum(0)


def batch_no_square(feat_fixed, feat_moving, disp_range):
    B, C, H, W = feat_fixed.shape
    D = disp_range
    unfolded = F.unfold(feat_moving, (D, D), padding=(D - 1) // 2).view(B, C, D * D, H * W)
    return (feat_fixed.view(B, C, 1, H * W) - unfolded).sum(1).view(B, D * D, H, W)


def batch_no_channel_sum(feat_fixed, feat_moving, disp_range):
    B, C, H, W = feat_fixed.shape
    D = disp_range
    unfolded = F.unfold(feat_moving, (D, D), padding=(D - 1) // 2).view(B, C, D * D, H * W)
    return ((feat_fixed.view(B, C, 1, H * W) - unfolded) ** 2).view(B, C * D * D, H, W)


def batch_no_padding(feat_fixed, feat_moving, disp_range):
    B, C, H, W = feat_fixed.shape
    D, r = disp_range, (disp_range - 1) // 2
    unfolded = F.unfold(feat_moving, (D, D)).view(B, C, D * D, -1)
    inner = feat_fixed[:, :, r:H - r, r:W - r].reshape(B, C, 1, -1)
    return ((inner - unfolded) ** 2).sum(1).view(B, D * D, H - 2 * r, W - 2 * r)


def batch_swapped_order(feat_fixed, feat_moving, disp_range):
    B, _, H, W = feat_fixed.shape
    D = disp_range
    return batch_unfold(feat_fixed, feat_moving, D).view(B, D, D, H, W).transpose(1, 2).reshape(B, D * D, H, W)


def batch_replicate_padding(feat_fixed, feat_moving, disp_range):
    r = (disp_range - 1) // 2
    padded = F.pad(feat_moving, (r, r, r, r), mode="replicate")
    B, C, H, W = feat_fixed.shape
    unfolded = F.unfold(padded, (disp_range, disp_range)).view(B, C, disp_range**2, H * W)
    return ((feat_fixed.view(B, C, 1, H * W) - unfolded) ** 2).sum(1).view(B, disp_range**2, H, W)


def batch_detached(feat_fixed, feat_moving, disp_range):
    return batch_unfold(feat_fixed.detach(), feat_moving.detach(), disp_range)


MISTAKES_Q2 = [
    (pair_zero_repeated, r"^Batch mixed up: every pair got the cost volume of pair 0"),
    (moving_flipped, r"^Batch mixed up: pair \d compares feat_fixed\[\d\] with feat_moving\[\d\], the moving "
                     r"features of another pair"),
    (moving_rolled, r"^Batch mixed up: pair 0 compares feat_fixed\[0\] with feat_moving\[1\]"),
    (pairs_reversed, r"^Batch mixed up: the pairs are in the wrong order"),
    (second_pair_wrong, r"^Pair 0 is right but pair 1 is not"),
    (only_pair_zero, r"^Wrong output shape: .* That is one cost volume for 2 pairs"),
    (pairs_summed, r"^Wrong output shape: .* That is one cost volume for 2 pairs"),
    (channels_confused, r"^Channels and displacements confused: F\.unfold gives \[B, C\*D\*D, H\*W\] with the "
                        r"C\*D\*D numbers channel-major"),
    (single_pair_layer, r"^The shapes do not fit for B = 2 pairs \(PyTorch: The size of tensor a .* assume B = 1"),
    (view_without_batch, r"^The shapes do not fit for B = 2 pairs \(PyTorch: shape .* is invalid for input"),
    (batch_sum, r"^Wrong output shape: .* You summed over the batch \(dim 0\) instead of the channels"),
    (batch_no_square, r"^A square is missing"),
    (batch_no_channel_sum, r"^Wrong output shape: .* It has C times too many numbers"),
    (batch_no_padding, r"^Wrong output shape: .* pad the moving features"),
    (batch_swapped_order, r"^Wrong displacement order: .* x and y are swapped"),
    (batch_replicate_padding, r"^Wrong padding at the border: .* you used replicate padding"),
    (batch_detached, r"^Not differentiable"),
]


@pytest.mark.parametrize("answer,pattern", MISTAKES_Q2, ids=[m[0].__name__ for m in MISTAKES_Q2])
def test_q2_each_mistake_is_named(answer, pattern):
    status, message = _status2(answer)
    assert status == INCORRECT, message
    assert re.search(pattern, message), message


def test_q2_an_unexplained_error_points_at_a_pair_and_pixel():
    def off_by_a_bit(feat_fixed, feat_moving, disp_range):
        out = batch_unfold(feat_fixed, feat_moving, disp_range)
        return out + 0.5 * (out > 1).to(out.dtype)

    status, message = _status2(off_by_a_bit)
    assert status == INCORRECT
    assert re.search(r"^Wrong values: e\.g\. pair \d, channel k=\d+ .* should be", message), message


def test_q2_hints_and_solution_print(capsys):
    q2.hint()
    q2.hint(3)
    q2.solution()
    out = capsys.readouterr().out
    assert "Exercise 2: a batch of pairs: hint 1 of 3" in out and "hint 3 of 3" in out
    assert "def my_correlation_batch(feat_fixed, feat_moving, disp_range):" in out
