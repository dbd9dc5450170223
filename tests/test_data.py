"""The data layer: download (against a local HTTP server), validation, atomic writes, safe unpickling."""

from __future__ import annotations

import functools
import http.server
import io
import os
import pickle
import subprocess
import sys
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tutorial_utils import data, data_files
from tutorial_utils.models import FeatureCNN, UnsafeCheckpointError, load_mindnet
from tutorial_utils.organ_check import LabelOrderWarning, anatomy_problems
from tutorial_utils.phantom import LABEL_NAMES

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures


def _tensor_bytes(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


ORGAN_BOXES = {  # label value: (top, bottom, left, right) as fractions of the height and width
    6: (0.25, 0.70, 0.05, 0.45),  # liver: the largest, on the image's left (the patient's right)
    4: (0.15, 0.25, 0.30, 0.45),  # gallbladder: anterior, under the liver
    7: (0.15, 0.35, 0.55, 0.80),  # stomach: anterior left
    2: (0.40, 0.50, 0.45, 0.70),  # pancreas: in front of the left kidney
    8: (0.55, 0.65, 0.45, 0.55),  # duodenum
    1: (0.40, 0.65, 0.82, 0.95),  # spleen: lateral, on the image's right
    3: (0.65, 0.85, 0.60, 0.78),  # left kidney: posterior, medial to the spleen
    5: (0.70, 0.78, 0.50, 0.55),  # esophagus: small, near the midline
}
"""A hand-made axial slice in radiological display, in the order of ``LABEL_NAMES`` (anterior at the top,
the patient's left on the image's right): small fake archives that pass the anatomy check of the names."""


def _layout_labels(n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 [n, h, w]: the boxes above, every slice shifted by -1..1 pixels; the gallbladder and
    the esophagus are missing on some slices (cut above or below them)."""
    labels = torch.zeros(n, h, w, dtype=torch.uint8)
    shifts = torch.randint(-1, 2, (n, 2), generator=gen)
    cut = torch.rand(n, 2, generator=gen) < 0.3
    for i in range(n):
        dy, dx = shifts[i].tolist()
        for value, (top, bottom, left, right) in ORGAN_BOXES.items():
            if (value == 4 and cut[i, 0]) or (value == 5 and cut[i, 1]):
                continue
            y0, y1 = round(top * h) + dy, max(round(bottom * h), round(top * h) + 1) + dy
            x0, x1 = round(left * w) + dx, max(round(right * w), round(left * w) + 1) + dx
            labels[i, max(y0, 0):y1, max(x0, 0):x1] = value
    return labels


def _small_set(n: int = data_files.NUM_SLICES, h: int = 16, w: int = 20, seed: int = 0):
    """Random uint8 images and hand-made labels (see ``ORGAN_BOXES``) in the format of the 2019 files."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, h, w), generator=gen, dtype=torch.uint8)
    return images, _layout_labels(n, h, w, gen)


def _swap(labels: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """``labels`` with the values a and b exchanged (a lookup table indexed by the labels)."""
    lookup = torch.arange(256, dtype=labels.dtype)
    lookup[a], lookup[b] = b, a
    return lookup[labels.long()]


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return buf.getvalue()


@pytest.fixture(scope="module")
def archives():
    images, labels = _small_set()
    good = _zip({
        "Learn2Reg/tcia_prereg_2d_img.pth": _tensor_bytes(images),
        "Learn2Reg/tcia_prereg_2d_seg.pth": _tensor_bytes(labels),
        "Learn2Reg/learn2reg_discrete.py": b"print('never extracted')\n",
    })
    wrong_count = _zip({
        "Learn2Reg/tcia_prereg_2d_img.pth": _tensor_bytes(images[:42]),
        "Learn2Reg/tcia_prereg_2d_seg.pth": _tensor_bytes(labels[:42]),
    })
    bad_labels = _zip({
        "Learn2Reg/tcia_prereg_2d_img.pth": _tensor_bytes(images),
        "Learn2Reg/tcia_prereg_2d_seg.pth": _tensor_bytes(labels.clone().fill_(9)),
    })
    escaping = _zip({
        "../../outside/tcia_prereg_2d_img.pth": _tensor_bytes(images),
        "/abs/tcia_prereg_2d_seg.pth": _tensor_bytes(labels),
    })
    return {
        "/good.zip": good,
        "/truncated.zip": good[: len(good) // 2],
        "/wrong_count.zip": wrong_count,
        "/bad_labels.zip": bad_labels,
        "/escaping.zip": escaping,
        "/not_a_zip.zip": b"<html>a login page, not an archive</html>",
        "_images": images,
        "_labels": labels,
    }


@pytest.fixture(scope="module")
def server(archives):
    """An HTTP server on 127.0.0.1 serving the archives built above (404 for anything else)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            payload = archives.get(self.path)
            if payload is None or self.path.startswith("_"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):  # keep test output quiet
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """An empty cache folder, no Kaggle mount, no URL override."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(data_files.CACHE_ENV_VAR, str(folder))
    monkeypatch.delenv(data_files.URL_ENV_VAR, raising=False)
    monkeypatch.delenv(data_files.SOURCE_ENV_VAR, raising=False)
    monkeypatch.setattr(data_files, "KAGGLE_DIR", tmp_path / "no-kaggle")
    return folder


download = functools.partial(data_files.download_tcia, retries=0, timeout=10, progress=False)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- download


def test_good_archive_downloads_validates_and_loads(server, cache, archives):
    folder = download(url=server + "/good.zip")
    assert folder == cache / "Learn2Reg"
    assert _leftovers(cache) == ["Learn2Reg"]  # no temp folders, no archive left behind
    assert sorted(p.name for p in folder.iterdir()) == [data_files.IMAGE_FILE, data_files.LABEL_FILE]  # the .py is not extracted
    ds = data.load_dataset("tcia")
    assert ds.source == "tcia" and len(ds) == 43
    assert ds.images.dtype == torch.float32 and ds.images.shape == (43, 1, 16, 20)
    assert torch.allclose(ds.images[:, 0], archives["_images"].float() / 255)
    assert torch.equal(ds.labels, archives["_labels"].long())
    assert ds.test_ids == (35, 41, 0, 4, 33, 38, 39, 17)
    assert sorted(ds.train_ids + ds.test_ids) == list(range(43))
    assert ds.label_names == LABEL_NAMES and ds.num_labels == 9
    assert ds.label_names[1] == "spleen" and ds.label_names[2] == "pancreas" and ds.label_names[6] == "liver"


@pytest.mark.parametrize("path, message", [
    ("/truncated.zip", "truncated"),
    ("/not_a_zip.zip", "broken or truncated"),
    ("/wrong_count.zip", "must hold 43 slices, found 42"),
    ("/bad_labels.zip", "values must lie in 0..8, found 9..9"),
    ("/missing.zip", "could not download"),
])
def test_bad_download_says_why_and_leaves_nothing(server, cache, path, message):
    with pytest.raises(data_files.DataError, match=message.replace(".", r"\.")):
        download(url=server + path)
    assert _leftovers(cache) == []


def test_failed_download_keeps_an_earlier_good_copy(server, cache):
    download(url=server + "/good.zip")
    with pytest.raises(data_files.DataError, match="43 slices"):
        download(url=server + "/wrong_count.zip")
    assert data_files.read_slices(cache / "Learn2Reg")[0].shape[0] == 43


def test_archive_paths_cannot_escape_the_cache(server, cache, tmp_path):
    folder = download(url=server + "/escaping.zip")
    assert (folder / data_files.IMAGE_FILE).is_file()
    assert not (tmp_path / "outside").exists() and not Path("/abs").exists()


def test_url_comes_from_the_environment(server, cache, monkeypatch):
    monkeypatch.setenv(data_files.URL_ENV_VAR, server + "/good.zip")
    assert download().name == "Learn2Reg"


def test_auto_falls_back_to_the_phantom_in_one_line(server, cache, monkeypatch, capsys):
    monkeypatch.setenv(data_files.URL_ENV_VAR, server + "/truncated.zip")
    ds = data.load_dataset("auto", download=True)
    out = capsys.readouterr().out.strip().splitlines()
    assert ds.source == "synthetic"
    assert len(out) == 1 and "synthetic phantom" in out[0] and "truncated" in out[0]
    assert not (cache / "Learn2Reg").exists()


def test_tcia_without_data_is_a_clear_error(cache):
    with pytest.raises(data_files.DataError, match="data_download.py"):
        data.load_dataset("tcia")


# --------------------------------------------------------------------------- where data is found


def _write_set(folder: Path, images, labels) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(images, folder / data_files.IMAGE_FILE)
    torch.save(labels, folder / data_files.LABEL_FILE)
    return folder


def test_search_order_root_then_kaggle_then_cache(tmp_path, cache, monkeypatch):
    kaggle = tmp_path / "kaggle"
    monkeypatch.setattr(data_files, "KAGGLE_DIR", kaggle)
    _write_set(cache / "Learn2Reg", *_small_set(seed=1))
    assert data_files.find_tcia() == cache / "Learn2Reg"
    _write_set(kaggle, *_small_set(seed=2))
    assert data_files.find_tcia() == kaggle
    mine = _write_set(tmp_path / "mine" / "Learn2Reg", *_small_set(seed=3))
    assert data_files.find_tcia(tmp_path / "mine") == mine
    expected = _small_set(seed=3)[0].float() / 255
    found = data.load_dataset("auto", root=tmp_path / "mine")  # "auto" finds the real set first
    assert found.source == "tcia" and torch.allclose(found.images[:, 0], expected)


def test_images_with_a_channel_axis_are_accepted(tmp_path, cache):
    images, labels = _small_set()
    _write_set(tmp_path / "set", images.unsqueeze(1), labels.unsqueeze(1))
    assert data.load_dataset("tcia", root=tmp_path / "set").images.shape == (43, 1, 16, 20)


def test_float_images_on_disk_are_rejected(tmp_path, cache):
    images, labels = _small_set()
    _write_set(tmp_path / "set", images.float(), labels)
    with pytest.raises(data_files.DataError, match="uint8"):
        data.load_dataset("tcia", root=tmp_path / "set")


def test_the_hand_made_fixture_fits_the_organ_names():
    """The fake archives above are realistic enough: the anatomy check finds nothing to object to."""
    for seed in (0, 1, 2, 3):
        labels = _small_set(seed=seed)[1]
        assert anatomy_problems(labels.long(), LABEL_NAMES) == [], seed
        assert {int(v) for v in labels.unique()} == set(range(9))


def test_real_slices_that_fit_the_names_load_without_a_warning(tmp_path, cache):
    _write_set(tmp_path / "set", *_small_set())
    with warnings.catch_warnings():
        warnings.simplefilter("error", LabelOrderWarning)
        ds = data.load_dataset("tcia", root=tmp_path / "set")
    assert ds.label_names == LABEL_NAMES


@pytest.mark.parametrize("a, b, organ", [(6, 1, "liver"), (1, 3, "spleen"), (5, 2, "esophagus")])
def test_swapped_labels_warn_and_get_generic_names(tmp_path, cache, a, b, organ):
    images, labels = _small_set()
    swapped = _swap(labels, a, b).to(torch.uint8)
    _write_set(tmp_path / "set", images, swapped)
    with pytest.warns(LabelOrderWarning, match=r"(?s)do not fit the organ names.*replaced by 'label 1'\.\.'label 8'"
                      ) as caught:
        ds = data.load_dataset("tcia", root=tmp_path / "set")
    assert len([w for w in caught if w.category is LabelOrderWarning]) == 1  # one warning lists everything
    assert f"label {a} '{organ}'" in str(caught[0].message)
    assert ds.label_names == ("background", *(f"label {v}" for v in range(1, 9)))
    assert torch.equal(ds.labels, swapped.long())  # the labels themselves are kept
    assert ds.source == "tcia" and ds.num_labels == 9


def test_the_phantom_set_is_not_checked(tmp_path, cache):
    """source="synthetic" reads the phantom's own files, built to fit LABEL_NAMES: no check runs
    (test_organ_check.py shows that the phantom passes it). Proof: swapped labels pass unchecked."""
    images, labels = _small_set()
    _write_set(tmp_path / "phantom", images, _swap(labels, 6, 1).to(torch.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LabelOrderWarning)
        ds = data.load_dataset("synthetic", root=tmp_path / "phantom")
    assert ds.source == "synthetic" and ds.label_names == LABEL_NAMES


def test_unknown_source_is_a_value_error():
    with pytest.raises(ValueError, match="'auto', 'tcia' or 'synthetic'"):
        data.load_dataset("kaggle")


# --------------------------------------------------------------------------- the phantom through the data layer


def test_synthetic_set_is_written_once_atomically_and_read_back(cache):
    ds = data.load_dataset("synthetic", seed=5)
    folder = data_files.synthetic_folder(seed=5)
    assert folder.parent == cache and folder.name.endswith("-seed5")
    assert sorted(p.name for p in folder.iterdir()) == ["README.txt", data_files.IMAGE_FILE, data_files.LABEL_FILE]
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temp folder left
    stamp = (folder / data_files.IMAGE_FILE).stat().st_mtime_ns
    again = data.load_dataset("synthetic", seed=5)
    assert (folder / data_files.IMAGE_FILE).stat().st_mtime_ns == stamp  # read back, not rebuilt
    assert torch.equal(ds.images, again.images) and torch.equal(ds.labels, again.labels)
    assert ds.source == "synthetic" and len(ds) == 43 and ds.num_labels == 9
    assert ds.images.min() >= 0 and ds.images.max() <= 1


def test_data_download_cli_builds_the_phantom(tmp_path):
    dest = tmp_path / "phantom"
    run = subprocess.run([sys.executable, str(REPO / "data_download.py"), "--synthetic", "--seed", "3",
                          "--dest", str(dest)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "seed 3" in run.stdout
    ds = data.load_dataset("synthetic", root=dest)
    assert ds.images.shape[0] == 43


def test_data_download_cli_without_fallback_fails_clearly(server, tmp_path):
    env = {**os.environ, data_files.CACHE_ENV_VAR: str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, str(REPO / "data_download.py"), "--no-fallback",
                          "--url", server + "/missing.zip", "--dest", str(tmp_path / "d")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 1
    assert "could not download" in run.stderr and "Traceback" not in run.stderr


# --------------------------------------------------------------------------- your own slices


def test_from_arrays_accepts_any_label_count_and_size():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 24, 32), dtype=np.uint8)
    labels = rng.integers(0, 4, (6, 24, 32))
    ds = data.Dataset.from_arrays(images, labels, ["bg", "a", "b", "c"], [0, 1, 2, 3], [4, 5])
    assert ds.num_labels == 4 and ds.image_size == (24, 32)
    assert ds.test_pairs() == [(4, 5), (5, 4)]
    assert np.allclose(ds.images[:, 0].numpy(), images / 255.0)
    assert set(ds.organs_present(0)) <= {"a", "b", "c"}


@pytest.mark.parametrize("change, message", [
    (dict(images=np.zeros((2, 10, 32), np.uint8), labels=np.zeros((2, 10, 32), int)), "divisible by 4"),
    (dict(labels=np.full((2, 8, 8), 3)), r"0\.\.2"),
    (dict(images=np.full((2, 8, 8), 2.0)), r"\[0, 1\]"),
    (dict(images=np.zeros((2, 8, 8), np.int32)), "uint8 or float"),
    (dict(labels=np.zeros((2, 8, 4), int)), "to match the images"),
    (dict(labels=np.zeros((2, 8, 8), float)), "integer"),
    (dict(test_ids=[0]), "disjoint"),
    (dict(test_ids=[7]), "indices in 0..1"),
    (dict(images=np.zeros((8, 8), np.uint8)), r"\[N, H, W\]"),
])
def test_from_arrays_rejects_bad_input_clearly(change, message):
    args = dict(images=np.zeros((2, 8, 8), np.uint8), labels=np.zeros((2, 8, 8), int),
                label_names=["bg", "a", "b"], train_ids=[0], test_ids=[1])
    args.update(change)
    with pytest.raises(ValueError, match=message):
        data.Dataset.from_arrays(**args)


# --------------------------------------------------------------------------- the pickled MIND-net


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_mindnet_loads_through_the_allowlist(tmp_path):
    torch.manual_seed(0)
    reference = nn.Sequential(*[m for m in FeatureCNN()])  # the 2019 file is a plain nn.Sequential
    for p in reference.parameters():
        nn.init.normal_(p)
    reference[1].running_mean.normal_()
    torch.save(reference, tmp_path / "mindnet.pth")
    model = load_mindnet(tmp_path / "mindnet.pth")
    assert isinstance(model, FeatureCNN) and not model.training
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.rand(1, 1, 32, 40)
    assert torch.allclose(model(x), reference.eval()(x))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump(evil, f)
    torch.save({"weights": evil}, tmp_path / "evil_in_torch.pth")
    for name in ("evil.pth", "evil_in_torch.pth"):
        with pytest.raises(UnsafeCheckpointError, match="refused to load"):
            load_mindnet(tmp_path / name)
    assert not marker.exists()


def test_other_modules_are_refused(tmp_path):
    torch.save(nn.Sequential(nn.LSTM(2, 2)), tmp_path / "lstm.pth")
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        load_mindnet(tmp_path / "lstm.pth")
    torch.save(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid()), tmp_path / "short.pth")
    with pytest.raises(UnsafeCheckpointError, match="expected the MIND-net layers"):
        load_mindnet(tmp_path / "short.pth")


def test_slice_files_with_pickled_code_are_refused(tmp_path, cache):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    folder = tmp_path / "set"
    _write_set(folder, *_small_set())
    torch.save(evil, folder / data_files.IMAGE_FILE)
    with pytest.raises(data_files.DataError, match="not a readable torch tensor file"):
        data.load_dataset("tcia", root=folder)
    assert not marker.exists()
