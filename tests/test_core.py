"""Small building blocks: device choice, seeding, the feature CNN, Dice, the exercise machinery."""

from __future__ import annotations

import math

import pytest
import torch

from tutorial_utils import environment
from tutorial_utils.exercises import Exercise, Incorrect
from tutorial_utils.metrics import dice, mean_dice
from tutorial_utils.models import FeatureCNN


def test_device_is_cpu_without_cuda_and_cuda_cannot_be_forced(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert environment.choose_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        environment.choose_device("cuda")


def test_quick_mode_reads_the_environment(monkeypatch):
    monkeypatch.delenv(environment.QUICK_ENV_VAR, raising=False)
    assert not environment.quick_mode()
    for value, expected in [("1", True), ("yes", True), ("0", False), ("false", False)]:
        monkeypatch.setenv(environment.QUICK_ENV_VAR, value)
        assert environment.quick_mode() is expected


def test_seeding_repeats_random_numbers():
    environment.seed_everything(7)
    a = torch.rand(5)
    environment.seed_everything(7)
    assert torch.equal(a, torch.rand(5))


def test_setup_notebook_prints_versions_and_device(capsys):
    device = environment.setup_notebook(seed=1)
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and f"device: {device.type}" in out
    import matplotlib.pyplot as plt

    assert plt.rcParams["figure.dpi"] == environment.FIGURE_DPI == 72  # one resolution in every notebook


def test_feature_cnn_shapes_and_errors():
    net = FeatureCNN()
    feat = net(torch.rand(2, 1, 64, 80))
    assert feat.shape == (2, 24, 16, 20)
    assert feat.min() > 0 and feat.max() < 1  # sigmoid output
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.rand(1, 1, 62, 80))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        net(torch.rand(1, 64, 80))


def dice_loops(a, b, num_labels):
    """Brute force: count every label's pixels in a, in b and in both, one pixel at a time."""
    count_a, count_b, both = [0] * num_labels, [0] * num_labels, [0] * num_labels
    for va, vb in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist()):
        count_a[va] += 1
        count_b[vb] += 1
        if va == vb:
            both[va] += 1
    return [2 * both[v] / (count_a[v] + count_b[v]) if count_a[v] + count_b[v] else math.nan
            for v in range(num_labels)]


@pytest.mark.parametrize("shape", [(7, 9), (2, 5, 6), (3, 2, 4, 5)])
def test_dice_and_mean_dice_match_pixel_loops(shape):
    generator = torch.Generator().manual_seed(len(shape))
    a = torch.randint(0, 4, shape, generator=generator)
    b = torch.randint(0, 4, shape, generator=generator)
    b[b == 3] = 2  # label 3 only in a: Dice 0 ("either") or not scored ("both"); label 4 in neither map: NaN
    expected = dice_loops(a, b, 5)
    got = dice(a, b, num_labels=5, present_in="either")
    assert got.dtype == torch.float64 and got.shape == (5,)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), equal_nan=True)
    assert got[3].item() == 0.0 and math.isnan(got[4])
    foreground = [v for v in expected[1:] if not math.isnan(v)]
    assert mean_dice(a, b, 5, present_in="either") == pytest.approx(sum(foreground) / len(foreground))
    primary = dice(a, b, num_labels=5)  # the default: label 3, in one map only, is not scored
    assert math.isnan(primary[3]) and math.isnan(primary[4])
    assert torch.equal(primary[:3], got[:3])
    assert mean_dice(a, b, 5) == pytest.approx(sum(expected[1:3]) / 2)
    assert math.isnan(mean_dice(torch.zeros_like(a), torch.zeros_like(b), 5))  # background only


def test_dice_rejects_bad_label_maps():
    a = torch.zeros(4, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="values 0..3"):
        dice(a + 4, a, 4)
    with pytest.raises(ValueError, match="same shape"):
        dice(a, a[:3], 4)


class _Square(Exercise):
    name = "Square"
    hints = ("Multiply.", "x * x")
    solution_code = "def square(x):\n    return x * x"

    def _check(self, answer):
        if answer(3) != 9:
            raise Incorrect(f"square(3) should be 9, got {answer(3)}")


def _stub(x):
    raise NotImplementedError


def test_exercise_outcomes_are_told_apart():
    q = _Square()
    assert q.evaluate(_stub).status == "not attempted"
    wrong = q.evaluate(lambda x: x + x)
    assert wrong.status == "incorrect" and "should be 9, got 6" in wrong.message
    crashed = q.evaluate(lambda x: 1 / 0)
    assert crashed.status == "error" and crashed.message.startswith("ZeroDivisionError")
    assert q.evaluate(lambda x: x**2).passed


def test_exercise_hints_solution_and_fallback(capsys):
    q = _Square()
    q.hint()
    q.hint(5)  # past the last level: the last hint
    q.solution()
    out = capsys.readouterr().out
    assert "hint 1 of 2" in out and "hint(2) says more" in out and "hint 2 of 2" in out
    assert "return x * x" in out
    assert q.use(_stub, fallback=abs) is abs
    assert "reference implementation" in capsys.readouterr().out
    mine = lambda x: x * x  # noqa: E731
    assert q.use(mine, fallback=abs) is mine
