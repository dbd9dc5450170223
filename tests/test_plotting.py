"""Every figure of tutorial_utils.plotting draws on small inputs and labels what it shows.

The expected pictures are built by hand: which pixel gets which colour, which arrow goes where,
which box spans which quartiles, what the titles, axis labels and legends say.
"""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from tutorial_utils import plotting as P  # noqa: E402
from tutorial_utils.data import Dataset  # noqa: E402

NAMES = ("background", "spleen", "left kidney", "liver")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def small_dataset(n=5, H=16, W=20):
    """n slices; slice i holds label 1 in a square, label 2 in slices 1 and 3, label 3 only in slice 4."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(n, H, W, generator=generator)
    labels = torch.zeros(n, H, W, dtype=torch.long)
    for i in range(n):
        labels[i, 2:6, 3 + i:8 + i] = 1
    labels[1, 10:14, 2:6] = 2
    labels[3, 9:12, 12:18] = 2
    labels[4, 8:15, 1:4] = 3
    return Dataset.from_arrays(images, labels, NAMES, train_ids=[0, 1, 2], test_ids=[3, 4])


def texts(legend):
    return [t.get_text() for t in legend.get_texts()]


# --------------------------------------------------------------------------- colours, overlay, legend


def test_label_colours_background_black_and_distinct():
    colours = P.label_colours(9)
    assert colours.shape == (9, 3) and colours[0].tolist() == [0.0, 0.0, 0.0]
    assert np.array_equal(P.label_colours(4), colours[:4])  # a prefix of the same table
    many = P.label_colours(14)
    assert many.shape == (14, 3) and np.array_equal(many[:9], colours)
    assert len({tuple(c) for c in many}) == 14  # every label its own colour
    assert ((many >= 0) & (many <= 1)).all()


def test_show_overlay_colours_every_labelled_pixel():
    ds = small_dataset()
    fig, ax = plt.subplots()
    P.show_overlay(ax, ds.images[4, 0], ds.labels[4], num_labels=4, alpha=0.3, title="slice four")
    grey, overlay = ax.images
    assert np.allclose(grey.get_array(), ds.images[4, 0].numpy()) and grey.get_clim() == (0, 1)
    assert grey.get_cmap().name == "gray"
    rgba = np.asarray(overlay.get_array())
    colours = P.label_colours(4)
    labels = ds.labels[4].numpy()
    for y in range(labels.shape[0]):
        for x in range(labels.shape[1]):
            value = labels[y, x]
            assert rgba[y, x, 3] == (0.3 if value else 0.0), (y, x)
            if value:
                assert np.allclose(rgba[y, x, :3], colours[value]), (y, x)
    assert ax.get_title() == "slice four" and not ax.axison


def test_show_overlay_contours_one_per_present_label_in_its_colour():
    ds = small_dataset()
    fig, ax = plt.subplots()
    P.show_overlay(ax, ds.images[1], ds.labels[1], num_labels=4, contour=True)  # [1, H, W] is accepted
    assert len(ax.images) == 1  # no colour overlay: contours only
    drawn = [tuple(np.round(c.get_edgecolor()[0][:3], 6)) for c in ax.collections]
    colours = P.label_colours(4)
    assert drawn == [tuple(np.round(colours[v], 6)) for v in (1, 2)]  # labels 1 and 2; 3 is absent
    fig2, ax2 = plt.subplots()
    P.show_overlay(ax2, ds.images[0, 0])  # no labels: the image alone
    assert len(ax2.images) == 1 and not ax2.collections and ax2.get_title() == ""


def test_show_overlay_outlines_a_second_map_over_the_filled_first():
    labels = torch.zeros(6, 6, dtype=torch.long)
    labels[1:3, 1:3] = 1
    second = torch.zeros(6, 6, dtype=torch.long)
    second[2:5, 2:5] = 3
    second[0, 5] = 2
    fig, ax = plt.subplots()
    P.show_overlay(ax, torch.rand(6, 6), labels, num_labels=4, outlines=second)
    assert len(ax.images) == 2  # the grey image and the filled organs
    colours = P.label_colours(4)
    drawn = [to_rgba(c.get_edgecolor()[0]) for c in ax.collections]
    assert sorted(drawn) == sorted(to_rgba(colours[v]) for v in (2, 3))  # one outline per organ of the second map


def test_organ_legend_names_the_organs_in_their_colours():
    fig, ax = plt.subplots()
    legend = P.organ_legend(ax, NAMES)
    assert texts(legend) == ["1 spleen", "2 left kidney", "3 liver"]
    colours = P.label_colours(4)
    for handle, value in zip(legend.legend_handles, (1, 2, 3)):
        assert np.allclose(handle.get_facecolor()[:3], colours[value])
    assert texts(P.organ_legend(fig, NAMES, present=[3, 1])) == ["1 spleen", "3 liver"]


# --------------------------------------------------------------------------- dataset figures


def test_show_slices_titles_and_legend():
    ds = small_dataset()
    fig = P.show_slices(ds, [0, 2, 3], ncols=2, size=1.0)
    assert len(fig.axes) == 4  # a 2 x 2 grid, the last cell empty
    assert [ax.get_title() for ax in fig.axes] == ["slice 0", "slice 2", "slice 3", ""]
    assert [len(ax.images) for ax in fig.axes] == [2, 2, 2, 0]
    assert len(fig.legends) == 1 and texts(fig.legends[0]) == ["1 spleen", "2 left kidney", "3 liver"]
    plain = P.show_slices(ds, [1], ncols=1, size=1.0, overlay=False, titles=["one"])
    assert [ax.get_title() for ax in plain.axes] == ["one"] and len(plain.axes[0].images) == 1
    assert not plain.legends


def test_organ_presence_against_a_pixel_count():
    ds = small_dataset()
    fig, ax = plt.subplots()
    present = P.organ_presence(ds, ax)
    expected = np.zeros((3, 5), dtype=bool)
    for i in range(5):
        for value in ds.labels[i].reshape(-1).tolist():
            if value:
                expected[value - 1, i] = True
    assert np.array_equal(present, expected)
    assert expected[2].tolist() == [False, False, False, False, True]
    rgb = np.asarray(ax.images[0].get_array())
    colours = P.label_colours(4)
    for organ in range(3):
        for i in range(5):
            want = colours[organ + 1] if expected[organ, i] else [0.93] * 3
            assert np.allclose(rgb[organ, i], want)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["spleen", "left kidney", "liver"]
    ticks = ax.get_xticklabels()
    assert [t.get_text() for t in ticks] == ["0", "1", "2", "3", "4"]
    assert [t.get_color() == "crimson" for t in ticks] == [False, False, False, True, True]  # test slices
    assert "test slices" in ax.get_xlabel()


def test_dice_boxplot_boxes_span_the_quartiles_of_the_finite_values():
    generator = np.random.default_rng(0)
    a = generator.uniform(0.2, 0.9, size=(7, 4))
    b = generator.uniform(0.0, 1.0, size=(7, 4))
    a[[1, 4], 2] = np.nan  # an organ in neither image of two pairs: left out
    ax = P.dice_boxplot({"method A": a, "method B": b}, NAMES, ylabel="Dice after")
    assert texts(ax.get_legend()) == ["method A", "method B"]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(NAMES[1:])
    assert ax.get_ylabel() == "Dice after" and ax.get_ylim() == (0, 1)
    boxes = [p for p in ax.patches if p.get_path().vertices.size]
    assert len(boxes) == 2 * 3  # one box per method and organ, method by method
    for m, values in enumerate((a, b)):
        for o in range(3):
            column = values[:, o + 1]
            q1, q3 = np.percentile(column[np.isfinite(column)], [25, 75])
            ys = boxes[3 * m + o].get_path().vertices[:, 1]
            assert (ys.min(), ys.max()) == pytest.approx((q1, q3)), (m, o)
            assert np.allclose(boxes[3 * m + o].get_facecolor()[:3], plt.get_cmap("tab10")(m)[:3])


# --------------------------------------------------------------------------- correlation figures


def test_show_cost_maps_marks_the_minimum_and_has_colour_bars():
    D, r, h, w, stride = 3, 1, 3, 4, 4
    cost = torch.ones(1, D * D, h, w)
    cost[0, 0 * D + 2, 1, 2] = 0.0  # pixel (1, 2): cheapest at (i, j) = (0, 2), i.e. (dy, dx) = (-1, 1)
    cost[0, 2 * D + 1, 0, 0] = -1.0  # pixel (0, 0): (i, j) = (2, 1), (dy, dx) = (1, 0)
    images = torch.rand(2, 4 * h, 4 * w, generator=torch.Generator().manual_seed(1))
    fig = P.show_cost_maps(cost, D, [(1, 2), (0, 0)], images[0], images[1], stride=stride, size=2.0)
    axes = np.array(fig.axes[:6]).reshape(2, 3)
    assert len(fig.axes) == 6 + 2  # one colour bar per cost map
    for row, ((y, x), (i, j)) in enumerate((((1, 2), (0, 2)), ((0, 0), (2, 1)))):
        panel = axes[row, 2]
        assert panel.get_title() == f"3 x 3 costs, minimum at (dy, dx) = ({i - r}, {j - r})"
        assert panel.get_xlabel() == "dx (feature pixels)" and panel.get_ylabel() == "dy"
        assert np.array_equal(panel.images[0].get_array(), cost[0, :, y, x].view(D, D).numpy())
        assert panel.images[0].colorbar is not None and panel.images[0].colorbar.ax in fig.axes[6:]
        cy, cx = (y + 0.5) * stride - 0.5, (x + 0.5) * stride - 0.5  # the feature pixel's centre
        cross = axes[row, 0].lines[0]
        assert (cross.get_xdata()[0], cross.get_ydata()[0]) == pytest.approx((cx, cy))
        dot = axes[row, 1].lines[0]
        assert (dot.get_xdata()[0], dot.get_ydata()[0]) == pytest.approx((cx + (j - r) * stride, cy + (i - r) * stride))
        window = axes[row, 1].patches[0]
        assert window.get_width() == window.get_height() == pytest.approx(D * stride)
        assert window.get_xy() == pytest.approx((cx - D * stride / 2, cy - D * stride / 2))
    assert axes[0, 0].get_title() == "fixed: pixel (y, x) = (1, 2)"
    named = P.show_cost_maps(cost, D, [(1, 2)], images[0], images[1], names=["liver"], zoom=None, size=2.0)
    assert named.axes[0].get_title() == "fixed: liver"


@pytest.mark.parametrize("step, steps", [(1, [0, 1, 2, 3, 4]), (2, [0, 2, 4]), (3, [0, 3, 4])])
def test_show_cost_volume_lays_channels_out_on_the_displacement_grid(step, steps):
    D, r = 5, 2
    cost = torch.rand(1, D * D, 3, 4, generator=torch.Generator().manual_seed(2))
    fig = P.show_cost_volume(cost, D, step=step, size=0.5)
    n = len(steps)
    assert len(fig.axes) == n * n + 1  # the images and one colour bar
    axes = np.array(fig.axes[:n * n]).reshape(n, n)
    for a, i in enumerate(steps):
        for b, j in enumerate(steps):
            assert np.array_equal(axes[a, b].images[0].get_array(), cost[0, i * D + j].numpy())
            assert axes[a, b].get_xlabel() == (f"dx={j - r}" if a == n - 1 else "")
            assert axes[a, b].get_ylabel() == (f"dy={i - r}" if b == 0 else "")
            centre = i == r and j == r
            assert (to_rgba(axes[a, b].spines["top"].get_edgecolor()) == to_rgba("orange")) == centre
    assert "cost volume" in fig.get_suptitle()
    clims = {ax.images[0].get_clim() for ax in fig.axes[:n * n]}
    assert len(clims) == 1  # one shared colour scale
    bar = axes[0, 0].images[0].colorbar or axes[-1, -1].images[0].colorbar
    assert bar is not None and bar.ax is fig.axes[-1] and "cost" in bar.ax.get_ylabel()
    assert (bar.vmin, bar.vmax) == pytest.approx(clims.pop())  # the bar shows the shared scale


def test_show_cost_maps_ticks_are_whole_offsets():
    for D, expected in ((5, [-2, -1, 0, 1, 2]), (13, [-6, -4, -2, 0, 2, 4, 6])):
        cost = torch.rand(1, D * D, 3, 3, generator=torch.Generator().manual_seed(D))
        fig = P.show_cost_maps(cost, D, [(1, 1)], torch.rand(12, 12), torch.rand(12, 12), stride=4, size=2.0)
        panel = fig.axes[2]
        assert list(panel.get_xticks()) == expected and list(panel.get_yticks()) == expected
        plt.close(fig)


def test_masks_leave_the_air_out_of_fields_grids_and_jacobians():
    h, w = 4, 6
    disp = torch.randn(1, 2, h, w, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[1:3, 2:5] = True  # 6 pixels inside
    fig, axes = plt.subplots(1, 3)
    P.show_displacement_field(axes[0], disp, step=1, mask=mask)
    quiver = axes[0].collections[0]
    inside = mask.nonzero().tolist()
    assert len(quiver.X) == len(inside)
    assert np.allclose(quiver.U, [float(disp[0, 1, y, x]) for y, x in inside])
    P.show_deformation_grid(axes[1], disp, spacing=1, mask=mask)
    for line, y in zip(axes[1].lines, range(h)):  # row y: drawn only inside the mask
        assert np.array_equal(np.isfinite(line.get_xdata()), mask[y].numpy())
    jac = torch.linspace(-1, 2, h * w).view(h, w)
    im = P.show_jacobian(axes[2], jac, mask=mask)
    assert np.array_equal(np.ma.getmaskarray(im.get_array()), ~mask.numpy())  # colour inside only
    folds = axes[2].images[1].get_array()
    assert np.array_equal(~np.ma.getmaskarray(folds), ((jac <= 0) & mask).numpy())
    grey = axes[2].images[2].get_array()
    assert np.array_equal(~np.ma.getmaskarray(grey), ~mask.numpy())  # grey exactly outside


@pytest.mark.parametrize("with_image", [False, True])
def test_show_displacement_field_arrows_by_hand(with_image):
    h, w, step, stride = 4, 6, 2, 4
    disp = torch.randn(1, 2, h, w, generator=torch.Generator().manual_seed(3))
    fig, ax = plt.subplots()
    image = torch.rand(stride * h, stride * w) if with_image else None
    P.show_displacement_field(ax, disp, image, step=step, stride=stride, title="field")
    quiver = ax.collections[0]
    xs, ys, us, vs = [], [], [], []
    for y in range(0, h, step):
        for x in range(0, w, step):  # an arrow from the feature pixel's centre, scaled to image pixels
            xs.append((x + 0.5) * stride - 0.5)
            ys.append((y + 0.5) * stride - 0.5)
            us.append(float(disp[0, 1, y, x]) * stride)
            vs.append(float(disp[0, 0, y, x]) * stride)
    assert np.allclose(quiver.X, xs) and np.allclose(quiver.Y, ys)
    assert np.allclose(quiver.U, us) and np.allclose(quiver.V, vs)
    assert ax.get_title() == "field" and len(ax.images) == int(with_image)
    assert ax.get_xlim() == pytest.approx((-0.5, stride * w - 0.5))
    assert ax.get_ylim() == pytest.approx((stride * h - 0.5, -0.5))  # y down, as in the image


def benchmark_result():
    rows = []
    for impl, base in (("unfold", 10.0), ("fast", 1.0)):
        for D in (3, 5):
            rows.append({"impl": impl, "H": 6, "W": 8, "D": D, "forward_ms": base * D, "forward_min_ms": base * D - 1,
                         "forward_backward_ms": 3 * base * D, "forward_backward_min_ms": 3 * base * D - 1,
                         "forward_backward_peak_bytes": D * 2**20, "skipped": None})
    rows.append({"impl": "fast", "H": 6, "W": 8, "D": 7, "skipped": "too large"})
    return {"rows": rows, "machine": {"gpu": None, "processor": "test-cpu", "torch_threads": 2}}


@pytest.mark.parametrize("statistic, suffix", [("median", "_ms"), ("min", "_min_ms")])
def test_plot_correlation_benchmark_plots_the_numbers(statistic, suffix):
    result = benchmark_result()
    fig = P.plot_correlation_benchmark(result, statistic=statistic)
    time_ax, memory_ax = fig.axes
    assert texts(time_ax.get_legend()) == ["unfold, 6x8", "fast, 6x8"]
    assert texts(memory_ax.get_legend()) == ["unfold, 6x8", "fast, 6x8"]
    assert "test-cpu, 2 threads" in time_ax.get_title()
    assert time_ax.get_ylabel() == ("milliseconds (median)" if statistic == "median" else
                                    "milliseconds (fastest repeat)")
    assert memory_ax.get_ylabel() == "MiB" and time_ax.get_xlabel() == "displacements per axis D"
    for impl, line_fb, line_f, line_mem in zip(("unfold", "fast"), time_ax.lines[0::2], time_ax.lines[1::2],
                                               memory_ax.lines):
        rows = [row for row in result["rows"] if row["impl"] == impl and not row["skipped"]]
        assert list(line_fb.get_xdata()) == [3, 5] and line_fb.get_linestyle() == "-"
        assert list(line_fb.get_ydata()) == [row["forward_backward" + suffix] for row in rows]
        assert list(line_f.get_ydata()) == [row["forward" + suffix] for row in rows] and line_f.get_linestyle() == "--"
        assert list(line_mem.get_ydata()) == [3.0, 5.0]  # MiB
    assert [int(t) for t in time_ax.get_xticks()] == [3, 5]  # the skipped D = 7 is not plotted
    with pytest.raises(ValueError, match="statistic"):
        P.plot_correlation_benchmark(result, statistic="mean")


# --------------------------------------------------------------------------- regularisation figures


def test_show_min_convolution_panels_curves_and_legend():
    D, r, lam = 5, 2, 0.3
    generator = torch.Generator().manual_seed(4)
    cost = torch.rand(D, D, generator=generator, dtype=torch.float64)
    cost[3, 1] = -0.5  # the smallest cost: the default row is dy index 3
    exact, approx = cost - 0.1, cost - 0.2  # any grids: the figure only draws them
    fig = P.show_min_convolution(cost, exact, approx, lam)
    assert len(fig.axes) == 4 + 1  # three grids, the curves, one colour bar
    grids = fig.axes[:3]
    for ax, grid in zip(grids, (cost, exact, approx)):
        assert np.array_equal(ax.images[0].get_array(), grid.numpy())
        assert ax.get_xlabel() == "dx" and ax.get_ylabel() == "dy"
        assert ax.lines[0].get_ydata()[0] == 3 - r  # the dashed line marks the drawn row
    assert "lambda = 0.3" in grids[1].get_title()
    assert grids[2].images[0].colorbar is not None
    curves = fig.axes[3]
    assert texts(curves.get_legend()) == ["data cost", "exact: lower envelope of all rows' parabolas", "approximation"]
    assert "another row" in curves.get_title()  # the envelope may lie below the drawn parabolas
    assert list(grids[0].get_xticks()) == list(range(-r, r + 1))  # whole offsets
    parabolas, (data, exact_line, approx_line) = curves.lines[:D], curves.lines[D:]
    for line, grid in ((data, cost), (exact_line, exact), (approx_line, approx)):
        assert np.allclose(line.get_xdata(), np.arange(-r, r + 1)) and np.allclose(line.get_ydata(), grid[3].numpy())
    for k, parabola in zip(range(-r, r + 1), parabolas):  # cost[3, k + r] + lam * (dx - k)^2
        xs = parabola.get_xdata()
        assert np.allclose(parabola.get_ydata(), cost[3, k + r].item() + lam * (xs - k) ** 2)
    assert curves.get_xlabel() == "dx (row dy = 1)" and curves.get_ylabel() == "cost"
    other = P.show_min_convolution(cost, exact, approx, lam, row=0, titles=("a", "b", "c"))
    assert [ax.get_title() for ax in other.axes[:3]] == ["a", "b", "c"]
    assert np.allclose(other.axes[3].lines[D].get_ydata(), cost[0].numpy())


def test_show_deformation_grid_lines_pass_through_the_displaced_points():
    H, W, spacing = 10, 13, 4
    disp = torch.randn(1, 2, H, W, generator=torch.Generator().manual_seed(5))
    fig, ax = plt.subplots()
    P.show_deformation_grid(ax, disp, torch.rand(H, W), spacing=spacing, title="grid", color="red")
    rows, cols = list(range(0, H, spacing)), list(range(0, W, spacing))
    assert len(ax.lines) == len(rows) + len(cols)
    for line, y in zip(ax.lines, rows):  # row y of the fixed grid at (y + dy, x + dx)
        assert np.allclose(line.get_xdata(), np.arange(W) + disp[0, 1, y].numpy())
        assert np.allclose(line.get_ydata(), y + disp[0, 0, y].numpy())
    for line, x in zip(ax.lines[len(rows):], cols):
        assert np.allclose(line.get_xdata(), x + disp[0, 1, :, x].numpy())
        assert np.allclose(line.get_ydata(), np.arange(H) + disp[0, 0, :, x].numpy())
    assert all(to_rgba(line.get_color()) == to_rgba("red") for line in ax.lines)
    assert ax.get_title() == "grid" and ax.get_ylim() == pytest.approx((H - 0.5, -0.5))


def test_show_jacobian_colours_and_marks_folds():
    jac = torch.tensor([[1.0, 1.5, 0.5], [-0.2, 0.0, 2.5]])
    fig, ax = plt.subplots()
    im = P.show_jacobian(ax, jac[None], title="det J", vmax=3.0)
    assert im is ax.images[0] and im.get_cmap().name == "RdBu_r"
    assert im.get_clim() == (-1.0, 3.0)  # symmetric around 1
    folds = ax.images[1].get_array()
    assert np.array_equal(~np.ma.getmaskarray(folds), (jac <= 0).numpy())  # black where det <= 0
    assert ax.get_title() == "det J"
    colorbar = fig.colorbar(im, ax=ax)  # the returned artist is what a colour bar needs
    assert colorbar.mappable is im and math.isclose(colorbar.vmax, 3.0)
