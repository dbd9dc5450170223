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


def test_feature_cnn_shapes_and_errors():
    net = FeatureCNN()
    feat = net(torch.rand(2, 1, 64, 80))
    assert feat.shape == (2, 24, 16, 20)
    assert feat.min() > 0 and feat.max() < 1  # sigmoid output
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.rand(1, 1, 62, 80))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        net(torch.rand(1, 64, 80))


def test_dice_of_known_shapes():
    a = torch.zeros(10, 10, dtype=torch.long)
    b = torch.zeros(10, 10, dtype=torch.long)
    a[0:4, 0:5] = 1  # 20 pixels
    b[2:6, 0:5] = 1  # 20 pixels, 10 shared
    a[8:10, 8:10] = 2  # label 2 only in a
    per_label = dice(a, b, num_labels=4)
    assert per_label[1].item() == pytest.approx(2 * 10 / 40)
    assert per_label[2].item() == 0.0
    assert math.isnan(per_label[3].item())  # in neither map
    assert mean_dice(a, b, 4) == pytest.approx((0.5 + 0.0) / 2)
    with pytest.raises(ValueError, match="outside 0..3"):
        dice(a + 4, b, 4)
    with pytest.raises(ValueError, match="same shape"):
        dice(a, b[:5], 4)


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
