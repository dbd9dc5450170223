"""``python -m benchmarks.three_d`` (tiny sizes, no timing assertions) and the closed-form cost model."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.three_d import build_parser, cost_3d, extrapolate_3d, fit_3d, format_3d_table, main

# tutorial_utils: the sparse layer's own layout, the reference of the closed form
from tutorial_utils.three_d.sparse import control_points3d, displacement_cube

TINY = ["--grids", "4,6", "--disp-ranges", "3,5", "--channels", "2", "--warmup", "0", "--repeats", "1"]


@pytest.mark.parametrize("shape,D,grid_step,disp_step", [(16, 9, 2, 2), ((7, 8, 9), 5, 3, 1), ((5, 6, 1), 7, 2, 3)])
def test_cost_3d_closed_form(shape, D, grid_step, disp_step):
    out = cost_3d(shape, D, bytes_per_value=4, grid_step=grid_step, disp_step=disp_step, channels=24)
    dims = (shape,) * 3 if isinstance(shape, int) else shape
    voxels = dims[0] * dims[1] * dims[2]
    assert out["voxels"] == voxels and out["offsets"] == D**3
    assert out["dense_bytes"] == D**3 * voxels * 4 and out["feature_bytes"] == 24 * voxels * 4
    # the sparse counts are those of the layer's own layout
    assert out["control_points"] == control_points3d(dims, grid_step)[0].shape[0]
    assert out["sparse_offsets"] == displacement_cube(D, disp_step).shape[0]
    assert out["sparse_bytes"] == out["control_points"] * out["sparse_offsets"] * 4
    assert out["ratio"] == pytest.approx(out["dense_bytes"] / out["sparse_bytes"])


def test_cost_3d_of_a_ct():
    out = cost_3d(128, 17)  # a 256^3 CT at stride 2, D = 17: 4913 offsets
    assert out["dense_bytes"] == 4913 * 128**3 * 4  # 38.4 GiB
    assert out["control_points"] == 64**3 and out["sparse_offsets"] == 9**3
    with pytest.raises(ValueError, match="disp_range"):
        cost_3d(16, 4)
    with pytest.raises(ValueError, match="grid_shape"):
        cost_3d((16, 16), 3)


def test_cli_writes_json_and_prints_the_tables(tmp_path, capsys):
    out = tmp_path / "3d.json"
    assert main([*TINY, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fit dense" in printed and "extrapolated to a 256x256x256 CT" in printed
    result = json.loads(out.read_text())
    assert result["benchmark"] == "3d" and len(result["rows"]) == 2 * 2 * 2  # grids x D x variants
    for row in result["rows"]:
        assert row["total_ms"] > 0 and row["peak_bytes"] >= row["cost_bytes"] > 0
        assert row["work"] == row["K"] * row["P"]
    dense = [r for r in result["rows"] if r["variant"] == "dense"]
    assert {(r["K"], r["P"]) for r in dense} == {(27, 64), (125, 64), (27, 216), (125, 216)}
    assert result["machine"]["torch_threads"] == 1  # fixed during the run (default --threads 1) ...


def test_threads_are_restored(capsys):
    threads = torch.get_num_threads()
    assert main([*TINY, "--no-memory"]) == 0
    assert torch.get_num_threads() == threads  # ... and restored afterwards


def test_command_line_parses_lists():
    args = build_parser().parse_args(["--grids", "8,16", "--disp-ranges", "3,5"])
    assert args.grids == [8, 16] and args.disp_ranges == [3, 5]


def test_fit_and_extrapolation_on_known_numbers():
    """Rows that follow total = 2 ns x costs exactly: the fit finds 2 ns, the extrapolation multiplies."""
    rows = [{"variant": v, "grid": n, "D": D, "K": K, "P": P, "work": K * P, "total_ms": 2e-6 * K * P,
             "correlation_ms": 1e-6 * K * P, "regularisation_ms": 1e-6 * K * P, "peak_bytes": 4 * K * P,
             "cost_bytes": 4 * K * P}
            for v in ("dense", "sparse") for n in (8, 16) for D in (3, 5)
            for K, P in [((D**3, n**3) if v == "dense" else (27, (n // 2) ** 3))]]
    result = {"rows": rows, "settings": {"grid_step": 2, "disp_step": 2, "channels": 2},
              "machine": {"device": "cpu", "processor": "test", "torch_threads": 1, "torch": torch.__version__}}
    fits = fit_3d(result)
    assert fits["dense"]["ns_per_cost"] == pytest.approx(2.0) and fits["dense"]["spread"] == pytest.approx([1, 1])
    table = extrapolate_3d(result, volume_shape=(256, 256, 256), strides=(2, 4), disp_ranges=(9, 17))
    assert [(r["stride"], r["D"]) for r in table] == [(2, 9), (2, 17), (4, 9), (4, 17)]
    first = table[0]
    assert first["dense_bytes"] == 729 * 128**3 * 4
    assert first["dense_seconds"] == pytest.approx(2e-9 * 729 * 128**3)
    assert first["sparse_seconds"] == pytest.approx(2e-9 * 125 * 64**3)
    assert "sparse GiB" in format_3d_table(result)
