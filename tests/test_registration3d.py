"""The 3D pipeline of tutorial_utils.three_d: warping (transform), 3D MIND-SSC (features),
register_volumes (registration) and the sparse pdd_net variant (sparse), on closed forms and a
small phantom pair."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from tutorial_utils.metrics import dice
from tutorial_utils.phantom import NUM_LABELS, make_phantom_volume
from tutorial_utils.three_d import features as FT
from tutorial_utils.three_d.registration import (
    DEFAULTS_3D,
    RegistrationSettings3d,
    cost_volume3d,
    extract_features3d,
    register_volumes,
)
from tutorial_utils.three_d.sparse import (
    DEFAULTS_SPARSE_3D,
    SparseSettings3d,
    register_volumes_sparse,
)
from tutorial_utils.three_d.transform import (
    interpolate_control_field3d,
    upsample_displacement3d,
    warp3d,
    warp_labels3d,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def small_pair():
    """Two patients at 16 x 32 x 40 (9.6 mm voxels): fast, the same anatomy as notebook 05's."""
    volumes, labels = make_phantom_volume(2, seed=0, shape=(32, 40), depth=16, supersample=1)
    return volumes.float()[:, None] / 255, labels.long()


def _mean_dice(a, b):
    d = dice(a, b, NUM_LABELS, present_in="either")[1:]  # volumes: the Learn2Reg 3D convention
    return d[~d.isnan()].mean().item()


# --------------------------------------------------------------------------- transform


def test_warp3d_integer_shift_and_identity():
    moving = torch.rand(2, 2, 5, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    shift = (1, -2, 3)
    displacement = torch.tensor(shift, dtype=torch.float64).view(1, 3, 1, 1, 1).expand(2, 3, 5, 6, 7)
    warped = warp3d(moving, displacement)
    # warped[z, y, x] = moving[z + 1, y - 2, x + 3] wherever that lies inside
    torch.testing.assert_close(warped[:, :, :4, 2:, :4], moving[:, :, 1:, :4, 3:])
    torch.testing.assert_close(warp3d(moving, torch.zeros_like(displacement)), moving)
    labels = torch.randint(0, 4, (2, 5, 6, 7), generator=torch.Generator().manual_seed(1))
    for mode in ("trilinear", "nearest"):
        out = warp_labels3d(labels, displacement.float(), 4, mode=mode)
        assert out.dtype == torch.int64 and torch.equal(out[:, :4, 2:, :4], labels[:, 1:, :4, 3:])


def test_warp3d_half_voxel_is_the_average():
    moving = torch.rand(1, 1, 3, 4, 5, dtype=torch.float64)
    displacement = torch.zeros(1, 3, 3, 4, 5, dtype=torch.float64)
    displacement[:, 2] = 0.5  # half a voxel along x
    torch.testing.assert_close(warp3d(moving, displacement)[..., :4], (moving[..., :4] + moving[..., 1:]) / 2)


def test_upsample_displacement3d_scales_values():
    field = torch.ones(1, 3, 2, 3, 4) * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1)
    out = upsample_displacement3d(field, (4, 12, 8))
    assert out.shape == (1, 3, 4, 12, 8)
    for axis, value in enumerate((2.0, -8.0, 1.0)):  # x 2, x 4, x 2
        torch.testing.assert_close(out[:, axis], torch.full((1, 4, 12, 8), value))


def test_interpolate_control_field3d_exact_at_points_and_linear_between():
    field = torch.rand(1, 3, 3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = interpolate_control_field3d(field, (5, 4, 8), grid_step=2, first=(0, 1, 1))
    assert out.shape == (1, 3, 5, 4, 8)
    torch.testing.assert_close(out[:, :, 0::2, 1::2, 1::2], field)
    torch.testing.assert_close(out[:, :, 1], (out[:, :, 0] + out[:, :, 2]) / 2)  # between two points
    torch.testing.assert_close(out[:, :, :, 0], out[:, :, :, 1])  # before the first point: its value


@pytest.mark.parametrize("call, message", [
    (lambda: warp3d(torch.rand(1, 1, 2, 2), torch.zeros(1, 3, 2, 2, 2)), "moving"),
    (lambda: warp3d(torch.rand(1, 1, 2, 2, 2), torch.zeros(1, 2, 2, 2, 2)), "dz, dy, dx"),
    (lambda: warp3d(torch.rand(1, 1, 2, 2, 2), torch.zeros(1, 3, 2, 2, 3)), "upsample"),
    (lambda: warp_labels3d(torch.zeros(1, 2, 2, 2, dtype=torch.long), torch.zeros(1, 3, 2, 2, 2), 1, "cubic"), "mode"),
    (lambda: upsample_displacement3d(torch.zeros(1, 3, 2, 2, 2), (4, 4)), "three"),
])
def test_transform_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------- features


def test_ssc_pairs3d_are_the_twelve_octahedron_edges():
    for d in (1, 2):
        pairs = FT.ssc_pairs3d(d)
        assert len(pairs) == 12 and len(set(pairs)) == 12
        for a, b in pairs:
            assert sum(abs(v) for v in a) == d and sum(abs(v) for v in b) == d
            assert sum((p - q) ** 2 for p, q in zip(a, b)) == 2 * d * d


def test_mind_ssc3d_shape_range_and_intensity_invariance():
    volume = torch.rand(1, 1, 6, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mind = FT.mind_ssc3d(volume, radius=1, dilation=(1, 2))
    assert mind.shape == (1, 24, 6, 7, 8) and mind.min() > 0 and mind.max() <= 1
    torch.testing.assert_close(FT.mind_ssc3d(3.0 * volume + 0.5, dilation=(1, 2)), mind)
    # one channel by hand at an interior voxel, radius 0: exp(-(D - min) / mean(D - min))
    raw = FT.mind_ssc3d(volume, radius=0, dilation=1)[0, :, 3, 3, 3]
    v = volume[0, 0]
    dists = torch.stack([(v[3 + a[0], 3 + a[1], 3 + a[2]] - v[3 + b[0], 3 + b[1], 3 + b[2]]) ** 2
                         for a, b in FT.ssc_pairs3d(1)])
    dists = dists - dists.min()
    assert raw.shape == (12,) and torch.allclose(raw.argmax(), dists.argmin())


def test_extract_features3d():
    volume = torch.rand(2, 1, 4, 8, 8)
    assert extract_features3d(volume, "intensity", 2).shape == (2, 1, 2, 4, 4)
    assert extract_features3d(volume, "mind", 4).shape == (2, 24, 1, 2, 2)
    assert extract_features3d(volume, lambda v: v[:, :, ::2, ::2, ::2], 2).shape == (2, 1, 2, 4, 4)
    with pytest.raises(ValueError, match="feature callable"):
        extract_features3d(volume, lambda v: v, 2)
    with pytest.raises(ValueError, match="divisible"):
        extract_features3d(torch.rand(1, 1, 5, 8, 8), "intensity", 2)


# --------------------------------------------------------------------------- registration


def test_register_volumes_improves_dice(small_pair):
    volumes, labels = small_pair
    before = _mean_dice(labels[0], labels[1])
    displacement, details = register_volumes(volumes[:1], volumes[1:], return_details=True)
    assert displacement.shape == (1, 3, 16, 32, 40)
    assert details.cost_volume.shape == (1, 7**3, 8, 16, 20) and details.offsets.shape == (343, 3)
    after = _mean_dice(labels[0], warp_labels3d(labels[1:], displacement, NUM_LABELS)[0])
    assert after > before + 0.08, (before, after)  # measured: 0.185 -> 0.331
    assert displacement.abs().max() <= 6.0 + 1e-4  # +-r feature voxels x stride 2


def test_register_volumes_sparse_improves_dice(small_pair):
    volumes, labels = small_pair
    before = _mean_dice(labels[0], labels[1])
    # (measured: 0.185 before; 0.460, 0.249 and 0.326 after)
    cases = [({}, 0.15), ({"disp_range": 9, "disp_step": 2}, 0.03),
             ({"offsets": torch.tensor(list(itertools.product((-2, 0, 2), repeat=3)))}, 0.08)]
    for kwargs, gain in cases:
        displacement = register_volumes_sparse(volumes[:1], volumes[1:], **kwargs)
        assert displacement.shape == (1, 3, 16, 32, 40)
        after = _mean_dice(labels[0], warp_labels3d(labels[1:], displacement, NUM_LABELS)[0])
        assert after > before + gain, (kwargs, before, after)


def test_sparse_registration_sees_the_dense_costs(small_pair):
    """grid_step = disp_step = 1: the sparse pipeline's data costs are the dense ones."""
    volumes, _ = small_pair
    _, dense = register_volumes(volumes[:1], volumes[1:], disp_range=3, return_details=True)
    _, sparse = register_volumes_sparse(volumes[:1], volumes[1:], disp_range=3, grid_step=1, disp_step=1,
                                        return_details=True)
    torch.testing.assert_close(sparse.cost_volume, dense.cost_volume, rtol=1e-4, atol=1e-4)
    assert sparse.points.shape == (8 * 16 * 20, 3)


def test_identical_volumes_give_a_near_identity(small_pair):
    """Inside the body near zero (in the flat air around it every displacement costs the same and
    the soft arg-min drifts towards the cheap side, as in 2D)."""
    volumes, _ = small_pair
    inside = volumes[0, 0] > 0.1
    for register in (register_volumes, register_volumes_sparse):
        displacement = register(volumes[:1], volumes[:1])[0][:, inside]
        assert displacement.abs().mean() < 0.25 and displacement.abs().max() < 2.0  # search range: +-6


def test_cost_volume3d_borders():
    f = torch.rand(1, 2, 3, 4, 5, dtype=torch.float64)
    m = torch.rand(1, 2, 3, 4, 5, dtype=torch.float64)
    zeros = cost_volume3d(f, m, 3, normalise=False, border="zeros")
    replicate = cost_volume3d(f, m, 3, normalise=False)
    inner = (slice(None), slice(None), 1, slice(1, 3), slice(1, 4))  # offsets stay inside: same costs
    torch.testing.assert_close(zeros[inner], replicate[inner])
    assert cost_volume3d(f, m, 3).mean().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="border"):
        cost_volume3d(f, m, 3, border="wrap")


@pytest.mark.parametrize("kwargs, message", [
    ({"volume_fixed": torch.rand(1, 1, 8, 8)}, r"\[B, 1, Z, Y, X\]"),
    ({"disp_range": 4}, "disp_range"),
    ({"stride": 3}, "divisible"),
    ({"alpha": 0.0}, "alpha"),
    ({"features": "sift"}, "features"),
])
def test_register_volumes_bad_input(kwargs, message):
    args = {"volume_fixed": torch.rand(1, 1, 4, 8, 8), "volume_moving": torch.rand(1, 1, 4, 8, 8)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        register_volumes(**args)


# --------------------------------------------------------------------------- settings


def test_the_3d_defaults_are_the_documented_values():
    assert DEFAULTS_3D == RegistrationSettings3d() and DEFAULTS_SPARSE_3D == SparseSettings3d()
    assert DEFAULTS_3D.as_dict() == {
        "disp_range": 7, "stride": 2, "min_kernel": 3, "avg_kernel": 3, "avg_passes": 2, "meanfield_kernel": 3,
        "meanfield_passes": 3, "meanfield_iterations": 1, "alpha": 100.0, "normalise": True, "border": "replicate"}
    assert DEFAULTS_SPARSE_3D.as_dict() == {
        "disp_range": 7, "stride": 2, "min_kernel": 3, "avg_kernel": 3, "avg_passes": 1, "meanfield_kernel": 3,
        "meanfield_passes": 1, "meanfield_iterations": 1, "alpha": 100.0, "normalise": True, "grid_step": 2,
        "disp_step": 1, "lam": 0.5}
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS_3D.disp_range = 9


@pytest.mark.parametrize("kind", [RegistrationSettings3d, SparseSettings3d])
@pytest.mark.parametrize("changes, error, message", [
    ({"disp_range": 4}, ValueError, "disp_range must be an odd integer"),
    ({"stride": 0}, ValueError, "stride must be an integer >= 1"),
    ({"stride": 2.0}, TypeError, "stride must be an integer"),
    ({"min_kernel": 2}, ValueError, "min_kernel must be an odd integer"),
    ({"avg_passes": -1}, ValueError, "avg_passes must be an integer >= 0"),
    ({"meanfield_iterations": -1}, ValueError, "meanfield_iterations must be an integer >= 0"),
    ({"alpha": 0.0}, ValueError, "alpha must be > 0"),
    ({"normalise": "yes"}, ValueError, "normalise must be one of True, False"),
])
def test_bad_3d_settings_are_refused_by_name(kind, changes, error, message):
    with pytest.raises(error, match=message):
        kind(**changes)


@pytest.mark.parametrize("kind, changes, error, message", [
    (RegistrationSettings3d, {"border": "wrap"}, ValueError, "border must be one of 'replicate', 'zeros'"),
    (SparseSettings3d, {"grid_step": 0}, ValueError, "grid_step must be an integer >= 1"),
    (SparseSettings3d, {"disp_step": 0}, ValueError, "disp_step must be an integer >= 1"),
    (SparseSettings3d, {"lam": -0.5}, ValueError, "lam must be >= 0"),
    (RegistrationSettings3d, {"grid_step": 2}, TypeError, "unexpected keyword argument 'grid_step'"),
])
def test_bad_settings_of_one_variant_are_refused(kind, changes, error, message):
    with pytest.raises(error, match=message):
        kind(**changes)


def test_numpy_numbers_become_python_numbers():
    np = pytest.importorskip("numpy")
    settings = RegistrationSettings3d(disp_range=np.int64(5), alpha=np.float32(10))
    assert type(settings.disp_range) is int and type(settings.alpha) is float and settings.disp_range == 5


@pytest.mark.parametrize("register, defaults, changes", [
    (register_volumes, DEFAULTS_3D, {"disp_range": 5, "stride": 4, "alpha": 30.0}),
    (register_volumes_sparse, DEFAULTS_SPARSE_3D, {"disp_range": 9, "disp_step": 2, "grid_step": 3}),
])
def test_keyword_changes_equal_a_replaced_settings_object(small_pair, register, defaults, changes):
    volumes, _ = small_pair
    by_keywords = register(volumes[:1], volumes[1:], "intensity", **changes)
    by_object = register(volumes[:1], volumes[1:], "intensity", dataclasses.replace(defaults, **changes))
    assert torch.equal(by_keywords, by_object)
    assert torch.equal(register(volumes[:1], volumes[1:], "intensity"),
                       register(volumes[:1], volumes[1:], "intensity", defaults))


@pytest.mark.parametrize("register", [register_volumes, register_volumes_sparse])
def test_unknown_or_misplaced_3d_settings_are_named(register):
    volume = torch.rand(1, 1, 4, 8, 8)
    with pytest.raises(TypeError, match="unknown registration setting.*disp_rnage"):
        register(volume, volume, disp_rnage=5)
    with pytest.raises(TypeError, match="settings must be a .*Settings3d.*write disp_range=5"):
        register(volume, volume, "mind", 5)  # the old positional disp_range
    other = DEFAULTS_SPARSE_3D if register is register_volumes else DEFAULTS_3D
    with pytest.raises(TypeError, match="settings must be a"):
        register(volume, volume, "mind", other)
