"""The checker of notebook 04's exercise catches each usual mistake and accepts correct answers,
also ones written differently from the reference."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from tutorial_utils.exercises._core import CORRECT, ERROR, INCORRECT, NOT_ATTEMPTED
from tutorial_utils.exercises.training import q1
from tutorial_utils.losses import nonlocal_label_loss_reference


def _status(answer):
    result = q1.evaluate(answer)
    return result.status, result.message


def _solution():
    namespace = {"F": F, "torch": torch}
    exec(textwrap.dedent(q1.solution_code), namespace)
    return namespace["my_label_loss"]


# --------------------------------------------------------------------------- building blocks of answers


def _onehot(labels, num_labels, dtype):
    return F.one_hot(labels, num_labels).permute(0, 3, 1, 2).to(dtype)


def _unfold_warp(probabilities, moving):
    B, K, h, w = probabilities.shape
    D = int(round(K**0.5))
    unfolded = F.unfold(moving, (D, D), padding=(D - 1) // 2).view(B, moving.shape[1], K, h * w)
    return (unfolded * probabilities.view(B, 1, K, h * w)).sum(2).view(B, moving.shape[1], h, w)


def make_answer(downsample="avg", warp="unfold", drop_background=False, reduce="sum-mean", offsets="ok",
                swap=False, onehot_without_count=False, detach=False, pad="zeros"):
    """A family of answers: the right one by default, each keyword one mistake."""

    def answer(probabilities, labels_fixed, labels_moving, num_labels):
        B, K, h, w = probabilities.shape
        D = int(round(K**0.5))
        s = labels_fixed.shape[-1] // w
        p = probabilities.detach() if detach else probabilities
        if offsets == "flipped":
            p = p.flip(1)
        elif offsets == "transposed":
            p = p.view(B, D, D, h, w).transpose(1, 2).reshape(B, K, h, w)

        def low(labels):
            onehot = (F.one_hot(labels) if onehot_without_count else F.one_hot(labels, num_labels))
            onehot = onehot.permute(0, 3, 1, 2).to(p.dtype)
            if downsample == "avg":
                return F.avg_pool2d(onehot, s)
            if downsample == "none":
                return onehot
            if downsample == "subsample":
                return onehot[:, :, ::s, ::s]
            if downsample == "bilinear":
                return F.interpolate(onehot, size=(h, w), mode="bilinear", align_corners=False)
            raise AssertionError(downsample)

        fixed, moving = low(labels_fixed), low(labels_moving)
        if swap:
            fixed, moving = moving, fixed
        if drop_background:
            fixed, moving = fixed[:, 1:], moving[:, 1:]
        if warp == "unfold":
            if pad == "zeros":
                warped = _unfold_warp(p, moving)
            else:
                r = (D - 1) // 2
                padded = F.pad(moving, (r, r, r, r), mode=pad)
                warped = sum(p[:, k:k + 1] * padded[:, :, k // D:k // D + h, k % D:k % D + w] for k in range(K))
        elif warp == "mean":
            warped = _unfold_warp(p, moving) / K
        elif warp == "unweighted":
            warped = _unfold_warp(torch.ones_like(p), moving)
        elif warp == "not-summed":
            unfolded = F.unfold(moving, (D, D), padding=(D - 1) // 2).view(B, moving.shape[1], K, h * w)
            each = unfolded * p.view(B, 1, K, h * w)  # [B, L, K, hw], the D*D axis never summed
            return ((each - fixed.view(B, -1, 1, h * w)) ** 2).sum(1).mean()
        else:
            raise AssertionError(warp)
        diff = warped - fixed
        if reduce == "sum-mean":
            return (diff**2).sum(1).mean()
        if reduce == "mean-mean":
            return (diff**2).mean()
        if reduce == "sum-sum":
            return (diff**2).sum() / B
        if reduce == "abs":
            return diff.abs().sum(1).mean()
        if reduce == "sqrt":
            return (diff**2).sum(1).sqrt().mean()
        if reduce == "none":
            return (diff**2).sum(1)
        raise AssertionError(reduce)

    return answer


# --------------------------------------------------------------------------- correct answers


def loop_over_offsets(probabilities, labels_fixed, labels_moving, num_labels):
    """Pad and slice one offset at a time; one-hot by comparison; 'area' interpolation."""
    B, K, h, w = probabilities.shape
    D = int(K**0.5)
    r = D // 2
    values = torch.arange(num_labels).view(1, -1, 1, 1)
    fixed = F.interpolate((labels_fixed[:, None] == values).double(), size=(h, w), mode="area")
    moving = F.interpolate((labels_moving[:, None] == values).double(), size=(h, w), mode="area")
    padded = F.pad(moving, (r, r, r, r))
    warped = torch.zeros_like(fixed)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            k = (dy + r) * D + (dx + r)
            warped = warped + probabilities[:, k:k + 1] * padded[:, :, r + dy:r + dy + h, r + dx:r + dx + w]
    return ((warped - fixed) ** 2).sum(dim=1).mean()


def einsum_and_reshape(probabilities, labels_fixed, labels_moving, num_labels):
    """Block average by reshaping, the warp by einsum, float32 one-hots."""
    B, K, h, w = probabilities.shape
    s = labels_fixed.shape[1] // h
    D = int(K**0.5)

    def low(labels):
        onehot = F.one_hot(labels, num_labels).float()  # [B, H, W, L]
        return onehot.view(B, h, s, w, s, num_labels).mean(dim=(2, 4)).permute(0, 3, 1, 2)

    cols = F.unfold(low(labels_moving), D, padding=D // 2).view(B, num_labels, K, h, w)
    warped = torch.einsum("blkyx,bkyx->blyx", cols.to(probabilities.dtype), probabilities)
    return (warped - low(labels_fixed).to(probabilities.dtype)).pow(2).sum(1).mean()


@pytest.mark.parametrize("answer", [_solution(), loop_over_offsets, einsum_and_reshape, make_answer(),
                                    nonlocal_label_loss_reference])
def test_correct_answers_pass(answer):
    status, message = _status(answer)
    assert status == CORRECT, message


# --------------------------------------------------------------------------- the usual mistakes


@pytest.mark.parametrize("mistake, words", [
    (dict(warp="mean"), "averaged, not summed"),
    (dict(warp="unweighted"), "probabilities are missing"),
    (dict(warp="not-summed"), "not summed over the displacement axis"),
    (dict(downsample="none"), "not downsampled"),
    (dict(downsample="subsample"), "subsampled"),
    (dict(downsample="bilinear"), "bilinearly"),
    (dict(drop_background=True), "background is left out"),
    (dict(onehot_without_count=True), "num_labels to F.one_hot"),
    (dict(reduce="mean-mean"), "labels are averaged"),
    (dict(reduce="sum-sum"), "pixels are summed"),
    (dict(reduce="abs"), "not squared"),
    (dict(reduce="sqrt"), "square root"),
    (dict(reduce="none"), "one number"),
    (dict(swap=True), "swapped"),
    (dict(offsets="flipped"), "flipped"),
    (dict(offsets="transposed"), "transposed"),
    (dict(pad="replicate"), "replicate padding"),
    (dict(detach=True), "Not differentiable"),
])
def test_each_mistake_is_named(mistake, words):
    status, message = _status(make_answer(**mistake))
    assert status == INCORRECT, message
    assert words in message, message


def test_averaging_label_values_is_named():
    def answer(probabilities, labels_fixed, labels_moving, num_labels):
        h, w = probabilities.shape[-2:]

        def low(labels):  # average the label values, then one-hot: wrong
            values = F.avg_pool2d(labels[:, None].double(), 4).round().long()[:, 0]
            return _onehot(values.clamp(0, num_labels - 1), num_labels, probabilities.dtype)

        return ((_unfold_warp(probabilities, low(labels_moving)) - low(labels_fixed)) ** 2).sum(1).mean()

    status, message = _status(answer)
    assert status == INCORRECT and "before the one-hot" in message, message


def test_a_broken_gradient_is_caught():
    right = _solution()

    def answer(probabilities, labels_fixed, labels_moving, num_labels):
        frozen = probabilities.detach() + 0 * probabilities  # right values, zero gradient
        return right(frozen, labels_fixed, labels_moving, num_labels)

    status, message = _status(answer)
    assert status == INCORRECT and "gradient" in message, message


def test_an_unexplained_wrong_value_says_what_was_expected():
    right = _solution()
    status, message = _status(lambda *args: right(*args) * 1.37)
    assert status == INCORRECT and "should be" in message, message


# --------------------------------------------------------------------------- not attempted, errors, misuse


def test_stub_is_not_attempted():
    def my_label_loss(probabilities, labels_fixed, labels_moving, num_labels):
        raise NotImplementedError

    assert _status(my_label_loss)[0] == NOT_ATTEMPTED


def test_other_exceptions_are_reported_without_traceback():
    def broken(*args):
        raise KeyError("oops")

    status, message = _status(broken)
    assert status == ERROR and "KeyError" in message


def test_non_callable_and_non_tensor_answers():
    status, message = _status(3.0)
    assert status == INCORRECT and "function itself" in message
    status, message = _status(lambda *args: 0.5)
    assert status == INCORRECT and "torch.Tensor" in message


def test_hints_solution_and_use(capsys):
    for level in (1, 2, 3, 9):
        q1.hint(level)
    q1.solution()
    printed = capsys.readouterr().out
    assert "avg_pool2d" in printed and "F.unfold" in printed
    fallback = nonlocal_label_loss_reference
    assert q1.use(make_answer(warp="mean"), fallback) is fallback
    good = _solution()
    assert q1.use(good, fallback) is good
