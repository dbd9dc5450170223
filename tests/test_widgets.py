"""The registration explorer: the plain computation against independent facts, and the widget
panel driven programmatically (no browser; see test_browser.py for that)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch

from tutorial_utils import explorer, metrics, widgets
from tutorial_utils.data import Dataset
from tutorial_utils.phantom import LABEL_NAMES, make_phantom

SHAPE = (128, 160)  # small phantom slices: each registration takes about a second on 2 cores


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    """Four slices: 0 and 1 are the same image (and labels), 2 and 3 two other patients.

    Test ids (1, 0) on purpose: the explorer must list them first, in that order.
    """
    images, labels = make_phantom(num_slices=3, seed=0, shape=SHAPE)
    order = [0, 0, 1, 2]
    return Dataset.from_arrays(images[order], labels[order], LABEL_NAMES,
                               train_ids=(2, 3), test_ids=(1, 0), source="custom")


@pytest.fixture(scope="module")
def result_pair(dataset) -> explorer.ExplorerResult:
    return explorer.explore_registration(dataset, 2, 3)


def _dice_numpy(a: np.ndarray, b: np.ndarray, value: int, moving: np.ndarray | None = None) -> float:
    """Dice of one label value by the definition 2|A n B| / (|A| + |B|), the primary convention: NaN
    unless the value is in both slices (a and b, or a and ``moving`` when b is the warped moving map)."""
    in_a, in_b = a == value, b == value
    shown_by_both = in_a.any() and ((moving == value).any() if moving is not None else in_b.any())
    return 2.0 * np.logical_and(in_a, in_b).sum() / (in_a.sum() + in_b.sum()) if shown_by_both else float("nan")


# --------------------------------------------------------------------------- the plain function


def test_result_shapes_and_types(dataset, result_pair):
    r = result_pair
    H, W = SHAPE
    assert r.image_fixed.shape == r.image_moving.shape == r.image_warped.shape == (1, 1, H, W)
    assert r.labels_fixed.shape == r.labels_moving.shape == r.labels_warped.shape == (1, H, W)
    assert r.labels_warped.dtype == torch.int64
    assert r.displacement.shape == (1, 2, H, W)
    assert (r.fixed_id, r.moving_id) == (2, 3)
    assert r.parameters == {**explorer.DEFAULT_PARAMETERS, "features": "mind"}
    assert r.runtime_s > 0
    assert 0.0 <= r.folding_fraction <= 1.0
    assert torch.equal(r.image_fixed[0], dataset.images[2])
    assert torch.equal(r.labels_moving[0], dataset.labels[3])


def test_dice_before_matches_the_definition(dataset, result_pair):
    r = result_pair
    fixed, moving = dataset.labels[2].numpy(), dataset.labels[3].numpy()
    present = sorted(int(v) for v in (set(np.unique(fixed)) | set(np.unique(moving))) - {0})
    assert list(r.dice_before) == [LABEL_NAMES[v] for v in present]  # every organ of either slice is listed
    direct = metrics.dice(dataset.labels[2], dataset.labels[3], len(LABEL_NAMES))
    for value in present:
        name = LABEL_NAMES[value]
        expected = _dice_numpy(fixed, moving, value)
        assert (math.isnan(r.dice_before[name]) and math.isnan(expected)) or \
            r.dice_before[name] == pytest.approx(expected, abs=1e-12)
        assert r.dice_before[name] == pytest.approx(float(direct[value]), abs=1e-12, nan_ok=True)
    assert r.mean_dice_before == pytest.approx(np.nanmean(list(r.dice_before.values())), abs=1e-12)


def test_dice_after_matches_the_definition_on_the_warped_labels(result_pair):
    r = result_pair
    fixed, moving, warped = r.labels_fixed[0].numpy(), r.labels_moving[0].numpy(), r.labels_warped[0].numpy()
    for name, value in r.dice_after.items():
        expected = _dice_numpy(fixed, warped, LABEL_NAMES.index(name), moving=moving)
        assert (math.isnan(value) and math.isnan(expected)) or value == pytest.approx(expected, abs=1e-12)
        assert math.isnan(value) == math.isnan(r.dice_before[name])  # the pair decides which organs count
    assert r.mean_dice_after == pytest.approx(np.nanmean(list(r.dice_after.values())), abs=1e-12)


def test_organs_in_one_slice_only_are_listed_but_not_scored(dataset, monkeypatch):
    """The moving slice without its liver: listed with NaN (a through-plane difference), left out of the means."""
    liver = LABEL_NAMES.index("liver")
    labels = dataset.labels.clone()
    labels[3][labels[3] == liver] = 0
    assert (labels[2] == liver).any()
    cut = Dataset.from_arrays(dataset.images, labels, LABEL_NAMES, train_ids=(2, 3), test_ids=(1, 0))

    def no_motion(image_fixed, image_moving, features="mind", disp_range=9, **kwargs):
        return torch.zeros(image_fixed.shape[0], 2, *image_fixed.shape[-2:])

    monkeypatch.setattr(explorer.registration, "register_images", no_motion)
    r = explorer.explore_registration(cut, 2, 3)
    assert "liver" in r.dice_before and math.isnan(r.dice_before["liver"]) and math.isnan(r.dice_after["liver"])
    scored = [v for v in r.dice_before.values() if not math.isnan(v)]
    assert len(scored) == len(r.dice_before) - 1 and r.mean_dice_before == pytest.approx(sum(scored) / len(scored))
    table = explorer.dice_table_html(r)
    assert "liver" in table and "not scored" in table
    assert "not scored" not in explorer.dice_table_html(explorer.explore_registration(dataset, 2, 3))


def test_zero_displacement_gives_back_the_moving_image(dataset, monkeypatch):
    """With a registration that returns u = 0, warped = moving and Dice after = Dice before."""

    def no_motion(image_fixed, image_moving, features="mind", disp_range=9, **kwargs):
        B, _, H, W = image_fixed.shape
        return torch.zeros(B, 2, H, W)

    monkeypatch.setattr(explorer.registration, "register_images", no_motion)
    r = explorer.explore_registration(dataset, 2, 3)
    assert torch.allclose(r.image_warped, r.image_moving, atol=1e-4)  # grid_sample round-off
    assert torch.equal(r.labels_warped, r.labels_moving)
    assert r.dice_after == r.dice_before
    assert r.folding_fraction == 0.0


def test_a_known_translation_is_applied(dataset, monkeypatch):
    """u = (0, +3) everywhere: warped[y, x] = moving[y, x + 3] away from the border."""

    def shift(image_fixed, image_moving, features="mind", disp_range=9, **kwargs):
        B, _, H, W = image_fixed.shape
        u = torch.zeros(B, 2, H, W)
        u[:, 1] = 3.0
        return u

    monkeypatch.setattr(explorer.registration, "register_images", shift)
    r = explorer.explore_registration(dataset, 2, 3)
    assert torch.allclose(r.image_warped[..., :-3], r.image_moving[..., 3:], atol=1e-5)
    assert torch.equal(r.labels_warped[..., :-3], r.labels_moving[..., 3:])


def test_parameters_reach_register_images(dataset, monkeypatch):
    seen = {}

    def spy(image_fixed, image_moving, features="mind", disp_range=9, **kwargs):
        seen.update(features=features, disp_range=disp_range, **kwargs)
        B, _, H, W = image_fixed.shape
        return torch.zeros(B, 2, H, W)

    monkeypatch.setattr(explorer.registration, "register_images", spy)
    explorer.explore_registration(dataset, 2, 3, disp_range=7, min_kernel=5, avg_kernel=1,
                                 meanfield_kernel=3, meanfield_iterations=2, alpha=2.5,
                                 features="intensity")
    assert seen == {"features": "intensity", "disp_range": 7, "min_kernel": 5, "avg_kernel": 1,
                    "meanfield_kernel": 3, "meanfield_iterations": 2, "alpha": 2.5}


def test_identical_images_need_no_motion(dataset):
    """Slices 0 and 1 are the same: Dice before is 1, and registration must not move organs."""
    r = explorer.explore_registration(dataset, 0, 1)
    assert all(v == 1.0 for v in r.dice_before.values())
    organs = r.labels_fixed[0] > 0
    motion = r.displacement[0].norm(dim=0)[organs]  # [pixels inside organs], px
    assert float(motion.mean()) < 1.0, f"mean |u| inside organs {float(motion.mean()):.2f} px for identical images"
    worst = min(r.dice_after.items(), key=lambda kv: kv[1])
    assert worst[1] >= 0.95, f"identical images, yet Dice after for {worst[0]} is {worst[1]:.3f}"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"disp_range": 8}, "disp_range"),
        ({"disp_range": 1}, "disp_range"),
        ({"disp_range": 9.0}, "disp_range"),
        ({"min_kernel": 4}, "min_kernel"),
        ({"avg_kernel": 0}, "avg_kernel"),
        ({"meanfield_kernel": -3}, "meanfield_kernel"),
        ({"meanfield_iterations": -1}, "meanfield_iterations"),
        ({"meanfield_iterations": True}, "meanfield_iterations"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"alpha": "10"}, "alpha"),
    ],
)
def test_bad_parameters_raise(dataset, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):  # TypeError: a float/bool/str where a number belongs
        explorer.explore_registration(dataset, 2, 3, **kwargs)


@pytest.mark.parametrize(
    "fixed_id, moving_id, message",
    [(2, 2, "different"), (4, 2, "fixed_id"), (-1, 2, "fixed_id"), (2, 99, "moving_id"),
     (2.0, 3, "fixed_id")],
)
def test_bad_ids_raise(dataset, fixed_id, moving_id, message):
    with pytest.raises(ValueError, match=message):
        explorer.explore_registration(dataset, fixed_id, moving_id)


# --------------------------------------------------------------------------- pictures


def test_displacement_colours():
    field = np.zeros((2, 4, 4))
    assert np.allclose(explorer.displacement_to_rgb(field), 1.0)  # no motion: white
    field[1] = 2.0  # everything moves right by 2 px
    right = explorer.displacement_to_rgb(field)
    field[1] = -2.0
    left = explorer.displacement_to_rgb(field)
    assert right.shape == (4, 4, 3) and 0 <= right.min() and right.max() <= 1
    assert not np.allclose(right, left)  # direction changes the hue
    assert right.min() == pytest.approx(0.0)  # full length is fully saturated
    half = explorer.displacement_to_rgb(field, scale=4.0)
    assert half.min() == pytest.approx(0.5)  # half the scale: half saturated


def test_plot_and_png(result_pair):
    import matplotlib.pyplot as plt

    figures_before = set(plt.get_fignums())
    fig = explorer.plot_explorer_result(result_pair)
    try:
        assert len(fig.axes) >= 4
        assert "mean Dice" in fig._suptitle.get_text()
    finally:
        plt.close(fig)
    png = explorer.render_png(result_pair)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(plt.get_fignums()) == figures_before  # the PNG path leaves no pyplot figure behind


def test_dice_table_lists_every_organ(result_pair):
    table = explorer.dice_table_html(result_pair)
    for name in result_pair.dice_before:
        assert name in table
    assert f"{result_pair.mean_dice_after:.3f}" in table
    assert 'class="l2r-mean-dice-after"' in table


# --------------------------------------------------------------------------- the widget panel


def test_explorer_builds_and_shows_the_default(dataset):
    panel = widgets.RegistrationExplorer(dataset, debounce_s=0)
    assert [value for _, value in panel.fixed_dropdown.options][:2] == [1, 0]  # test ids first
    assert (panel.fixed_dropdown.value, panel.moving_dropdown.value) == (1, 0)
    assert panel.parameters() == explorer.DEFAULT_PARAMETERS
    assert panel.updates == 1 and panel.error is None
    assert panel.result.parameters["disp_range"] == 9
    assert panel.figure.value[:4] == b"\x89PNG"
    assert "Dice" in panel.dice_html.value and "%" in panel.folding_html.value
    assert "ready" in panel.status.value
    for widget, css in [(panel.panel, "l2r-explorer"), (panel.dice_html, "l2r-dice"),
                        (panel.figure, "l2r-figure"), (panel.alpha_slider, "l2r-alpha"),
                        (panel.disp_range_slider, "l2r-disp-range"),
                        (panel.folding_html, "l2r-folding"), (panel.status, "l2r-status")]:
        assert css in widget._dom_classes
    assert all(not s.continuous_update for s in panel.sliders)
    bundle = panel._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_moving_a_slider_recomputes(dataset):
    panel = widgets.RegistrationExplorer(dataset, fixed_id=2, moving_id=3, debounce_s=0)
    first, html_before = panel.result, panel.dice_html.value
    panel.disp_range_slider.value = 3
    assert panel.updates == 2
    assert panel.result is not first
    assert panel.result.parameters["disp_range"] == 3
    assert panel.dice_html.value != html_before
    panel.moving_dropdown.value = 0
    assert panel.updates == 3 and panel.result.moving_id == 0


def test_same_slice_twice_is_reported_not_raised(dataset):
    panel = widgets.RegistrationExplorer(dataset, fixed_id=2, moving_id=3, debounce_s=0)
    panel.moving_dropdown.value = 2
    assert panel.updates == 1
    assert "different" in panel.status.value and panel.error


def test_changes_are_debounced_on_the_event_loop(dataset):
    """In a kernel (an event loop runs), a burst of changes costs one recomputation."""
    panel = widgets.RegistrationExplorer(dataset, fixed_id=2, moving_id=3, debounce_s=0.05)

    async def burst():
        panel.alpha_slider.value = 1.0
        panel.alpha_slider.value = 2.0
        panel.meanfield_iterations_slider.value = 2
        assert panel.pending and panel.updates == 1
        assert "waiting" in panel.status.value
        for _ in range(600):  # at most 60 s
            await asyncio.sleep(0.1)
            if not panel.pending:
                break

    asyncio.run(burst())
    assert not panel.pending
    assert panel.updates == 2
    assert panel.result.parameters["alpha"] == pytest.approx(2.0)
    assert panel.result.parameters["meanfield_iterations"] == 2


def test_explorer_rejects_bad_arguments(dataset):
    with pytest.raises(ValueError, match="debounce_s"):
        widgets.RegistrationExplorer(dataset, debounce_s=-1, compute=False)
    with pytest.raises(ValueError, match="fixed_id"):
        widgets.RegistrationExplorer(dataset, fixed_id=10, compute=False)
