"""The 2D abdominal CT slices: the real TCIA set of the 2019 tutorial, or the synthetic phantom.

One interface for both::

    dataset = load_dataset()            # real slices if found locally, else the phantom
    dataset.images   # float32 [N, 1, H, W] in [0, 1]
    dataset.labels   # int64   [N, H, W], 0 = background

Where the real slices are looked for, in this order: the folder given (``root=``), the
Kaggle mount ``/kaggle/input/learn2reg``, the local cache (``$L2R_DATA_DIR``, default
``~/.cache/l2r-discrete``); with ``download=True`` (or ``python data_download.py``) the
tutorial's archive is then downloaded, validated and unpacked atomically into the cache.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checks import check_finite, check_int, describe
from .phantom import LABEL_NAMES, PHANTOM_VERSION, make_phantom

TCIA_URL = "https://cloud.imi.uni-luebeck.de/s/WnPcByW4zrDcrRA/download"
"""Where the 2019 tutorial's archive ``Learn2Reg.zip`` was published (no checksum is known)."""
URL_ENV_VAR = "L2R_DATA_URL"
CACHE_ENV_VAR = "L2R_DATA_DIR"
SOURCE_ENV_VAR = "L2R_DATA_SOURCE"
KAGGLE_DIR = Path("/kaggle/input/learn2reg")

IMAGE_FILE = "tcia_prereg_2d_img.pth"
LABEL_FILE = "tcia_prereg_2d_seg.pth"
MINDNET_FILE = "mindnet_cnn_pancreas.pth"
ARCHIVE_MEMBERS = (IMAGE_FILE, LABEL_FILE, MINDNET_FILE)
"""The files taken from the archive; nothing else in it is extracted."""
TCIA_FOLDER = "Learn2Reg"

NUM_SLICES = 43
TEST_IDS = (35, 41, 0, 4, 33, 38, 39, 17)
"""The test slices of the 2019 tutorial; the other 35 are for training."""
TRAIN_IDS = tuple(i for i in range(NUM_SLICES) if i not in TEST_IDS)


class DataError(RuntimeError):
    """The data could not be had or is not what it should be; the message says why."""


# --------------------------------------------------------------------------- the dataset


@dataclass
class Dataset:
    """A set of 2D slices with label maps and a train/test split.

    Attributes:
        images: float32 [N, 1, H, W], intensities in [0, 1].
        labels: int64 [N, H, W], values 0..num_labels-1 (0 = background).
        label_names: one name per label value, index = value.
        train_ids, test_ids: slice indices of the split (disjoint).
        source: "tcia", "synthetic" or "custom".
        root: the folder the data was read from, if any.
    """

    images: torch.Tensor
    labels: torch.Tensor
    label_names: tuple[str, ...]
    train_ids: tuple[int, ...]
    test_ids: tuple[int, ...]
    source: str = "custom"
    root: Path | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _validate_dataset(self)

    def __repr__(self) -> str:
        n, _, h, w = self.images.shape
        return (f"Dataset(source={self.source!r}, slices={n}, size={h}x{w}, labels={self.num_labels}, "
                f"train={len(self.train_ids)}, test={len(self.test_ids)})")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_labels(self) -> int:
        """Number of label values, background included."""
        return len(self.label_names)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return tuple(self.images.shape[-2:])

    def organs_present(self, index: int) -> list[str]:
        """Names of the foreground labels that slice ``index`` shows."""
        values = torch.unique(self.labels[index]).tolist()
        return [self.label_names[v] for v in values if v != 0]

    def test_pairs(self) -> list[tuple[int, int]]:
        """Every ordered (fixed, moving) pair of distinct test slices."""
        return [(f, m) for f in self.test_ids for m in self.test_ids if f != m]

    @classmethod
    def from_arrays(
        cls,
        images,
        labels,
        label_names: Sequence[str],
        train_ids: Sequence[int],
        test_ids: Sequence[int],
        source: str = "custom",
    ) -> Dataset:
        """Build a dataset from your own slices.

        Args:
            images: [N, H, W] (or [N, 1, H, W]) uint8, or float in [0, 1]; numpy or torch.
            labels: integer [N, H, W], values in 0..len(label_names)-1.
            label_names: one name per label value, background first.
            train_ids, test_ids: disjoint slice indices.
        H and W must be divisible by 4 (the feature CNN works at 1/4 resolution). The images
        must be finite (no NaN or inf), every label value needs a name, and each slice index
        an integer in 0..N-1, used once.
        """
        images = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
        if images.dim() == 4 and images.shape[1] == 1:
            images = images[:, 0]
        if images.dim() != 3:
            raise ValueError(f"images must be [N, H, W] (or [N, 1, H, W]), got shape {tuple(images.shape)}")
        if labels.dim() >= 1 and labels.shape[0] != images.shape[0]:
            raise ValueError(f"there are {images.shape[0]} images but {labels.shape[0]} label maps: labels must "
                             f"be [N, H, W] to match the images, got {tuple(labels.shape)}")
        label_names = _label_names(label_names)
        train_ids, test_ids = _slice_ids("train_ids", train_ids), _slice_ids("test_ids", test_ids)
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        elif images.is_floating_point():
            check_finite("images", images)
            lo, hi = float(images.min()), float(images.max())
            if lo < 0.0 or hi > 1.0:
                raise ValueError(
                    f"float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                    "rescale them (e.g. window the CT and divide) or pass uint8"
                )
            images = images.float()
        else:
            raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        return cls(
            images=images.unsqueeze(1).contiguous(),
            labels=labels.long().contiguous(),
            label_names=label_names,
            train_ids=train_ids,
            test_ids=test_ids,
            source=source,
        )


def _label_names(names: object) -> tuple[str, ...]:
    """``names`` as a tuple of strings; a single string is refused (it would be split into characters)."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise TypeError(f"label_names must be a list of names, one per label value (background first), "
                        f"e.g. ['background', 'liver'], not one string (it would be split into its "
                        f"characters); got {describe(names)}")
    return tuple(str(n) for n in names)


def _slice_ids(name: str, ids: object) -> tuple[int, ...]:
    """``ids`` (a list, range, numpy array or tensor of integers) as a tuple of Python ints.

    Floats (1.7 would silently become 1), bools and strings are refused, as in ``check_int``."""
    if isinstance(ids, (np.ndarray, torch.Tensor)):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"{name} must be a list of slice indices (integers), got {describe(ids)}")
    return tuple(check_int(f"{name}[{k}]", i) for k, i in enumerate(ids))


def _validate_dataset(ds: Dataset) -> None:
    if not (torch.is_tensor(ds.images) and ds.images.dim() == 4 and ds.images.shape[1] == 1):
        raise ValueError(f"images must be a float tensor [N, 1, H, W], got {getattr(ds.images, 'shape', type(ds.images))}")
    n, _, h, w = ds.images.shape
    if ds.images.dtype != torch.float32:
        raise ValueError(f"images must be float32, got {ds.images.dtype}")
    check_finite("images", ds.images)
    if not (torch.is_tensor(ds.labels) and ds.labels.shape == (n, h, w)):
        raise ValueError(
            f"labels must be [N, H, W] = [{n}, {h}, {w}] to match the images, got {tuple(getattr(ds.labels, 'shape', ()))}"
        )
    if ds.labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64, got {ds.labels.dtype}")
    if h % 4 or w % 4:
        raise ValueError(f"H and W must be divisible by 4 (features are at 1/4 resolution), got {h} x {w}")
    if not isinstance(ds.label_names, tuple) or not all(isinstance(n, str) for n in ds.label_names):
        raise TypeError(f"label_names must be a tuple of strings, got {describe(ds.label_names)}")
    if len(ds.label_names) < 2:
        raise ValueError("label_names needs the background and at least one foreground label")
    if n and (int(ds.labels.min()) < 0 or int(ds.labels.max()) >= len(ds.label_names)):
        raise ValueError(
            f"label values must lie in 0..{len(ds.label_names) - 1} (one name per value: label_names has "
            f"{len(ds.label_names)}), got {int(ds.labels.min())}..{int(ds.labels.max())}"
        )
    for name, ids in (("train_ids", ds.train_ids), ("test_ids", ds.test_ids)):
        if not isinstance(ids, tuple):
            raise TypeError(f"{name} must be a tuple of slice indices, got {describe(ids)}")
        for k, i in enumerate(ids):
            check_int(f"{name}[{k}]", i)
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"{name} must be slice indices in 0..{n - 1}, got {bad}")
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"{name} must name each slice once, got {repeated} more than once")
    overlap = sorted(set(ds.train_ids) & set(ds.test_ids))
    if overlap:
        raise ValueError(f"train_ids and test_ids must be disjoint; both contain {overlap}")


# --------------------------------------------------------------------------- where data lives


def cache_dir() -> Path:
    """The local data cache: ``$L2R_DATA_DIR``, else ``~/.cache/l2r-discrete`` (platform cache dir)."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    import pooch

    return Path(pooch.os_cache("l2r-discrete"))


def _candidate_folders(root: str | os.PathLike | None) -> list[Path]:
    """Folders that may hold the real slices, in the order they are searched."""
    places: list[Path] = []
    if root is not None:
        root = Path(root).expanduser()
        places += [root, root / TCIA_FOLDER]
    places += [KAGGLE_DIR, KAGGLE_DIR / TCIA_FOLDER, cache_dir() / TCIA_FOLDER]
    return places


def find_tcia(root: str | os.PathLike | None = None) -> Path | None:
    """The first folder holding both TCIA tensor files, or None."""
    for folder in _candidate_folders(root):
        if (folder / IMAGE_FILE).is_file() and (folder / LABEL_FILE).is_file():
            return folder
    return None


# --------------------------------------------------------------------------- reading and checking


def _load_tensor(path: Path) -> torch.Tensor:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"{path} is not a readable torch tensor file ({type(exc).__name__}: {exc})") from exc
    if not torch.is_tensor(obj):
        raise DataError(f"{path} should hold one tensor, found {type(obj).__name__}")
    return obj


def read_slices(folder: str | os.PathLike, expected_slices: int | None = NUM_SLICES,
                num_labels: int = len(LABEL_NAMES)) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and validate the two tensor files of a data folder.

    Returns images uint8 [N, H, W] and labels uint8/int [N, H, W]. Raises :class:`DataError`
    that says what is wrong (missing file, wrong dtype, slice count, shapes, label range).
    """
    folder = Path(folder)
    missing = [f for f in (IMAGE_FILE, LABEL_FILE) if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)}")
    images = _load_tensor(folder / IMAGE_FILE)
    labels = _load_tensor(folder / LABEL_FILE)
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if labels.dim() == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if images.dtype != torch.uint8:
        raise DataError(f"{IMAGE_FILE} must hold uint8 slices, found {images.dtype}")
    if images.dim() != 3:
        raise DataError(f"{IMAGE_FILE} must be [N, H, W], found shape {tuple(images.shape)}")
    if expected_slices is not None and images.shape[0] != expected_slices:
        raise DataError(f"{IMAGE_FILE} must hold {expected_slices} slices, found {images.shape[0]}")
    if labels.shape != images.shape:
        raise DataError(f"{LABEL_FILE} has shape {tuple(labels.shape)}, the images {tuple(images.shape)}")
    if labels.is_floating_point():
        raise DataError(f"{LABEL_FILE} must hold integer labels, found {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_labels:
        raise DataError(f"{LABEL_FILE} values must lie in 0..{num_labels - 1}, found {lo}..{hi}")
    return images, labels


def _dataset_from_folder(folder: Path, source: str) -> Dataset:
    images, labels = read_slices(folder)
    ds = Dataset.from_arrays(images, labels, LABEL_NAMES, TRAIN_IDS, TEST_IDS, source=source)
    ds.root = folder
    return ds


# --------------------------------------------------------------------------- writing atomically


def _replace_dir(staging: Path, final: Path) -> None:
    """Move a finished folder into place; whatever stood there before is removed."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def download_tcia(dest: str | os.PathLike | None = None, url: str | None = None,
                  retries: int = 2, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download the 2019 archive, keep only the three data files, validate, move into place.

    Args:
        dest: folder that receives ``Learn2Reg/`` (default: the cache).
        url: archive address (default ``$L2R_DATA_URL``, else :data:`TCIA_URL`).
        retries: extra attempts after a failed download.
        timeout: seconds without data before a try is given up.

    Returns the folder holding the validated files. On any failure nothing is left behind
    and :class:`DataError` says what went wrong.
    """
    import pooch

    dest = Path(dest).expanduser() if dest is not None else cache_dir()
    url = url or os.environ.get(URL_ENV_VAR) or TCIA_URL
    final = dest / TCIA_FOLDER
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        tmp = Path(tmp)
        fetcher = pooch.create(path=tmp, base_url="", registry={"Learn2Reg.zip": None},
                               urls={"Learn2Reg.zip": url}, retry_if_failed=retries)
        try:
            archive = Path(fetcher.fetch(
                "Learn2Reg.zip",
                downloader=pooch.HTTPDownloader(progressbar=progress, timeout=timeout),
            ))
        except Exception as exc:
            raise DataError(f"could not download {url}: {type(exc).__name__}: {exc}") from exc
        staging = tmp / TCIA_FOLDER
        _extract_members(archive, staging)
        read_slices(staging)  # raises DataError if the content is wrong
        _replace_dir(staging, final)
    return final


def _extract_members(archive: Path, staging: Path) -> None:
    """Copy the known data files out of the archive by name (no paths from the archive are used)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            by_name = {}
            for info in zf.infolist():
                base = info.filename.replace("\\", "/").rsplit("/", 1)[-1]
                if base in ARCHIVE_MEMBERS and not info.is_dir() and "__MACOSX" not in info.filename:
                    by_name.setdefault(base, info)
            missing = [m for m in (IMAGE_FILE, LABEL_FILE) if m not in by_name]
            if missing:
                raise DataError(f"the archive lacks {', '.join(missing)}: it is truncated or not the 2019 "
                                f"Learn2Reg archive ({len(zf.infolist())} readable entries)")
            staging.mkdir(parents=True)
            for base, info in by_name.items():
                with zf.open(info) as src, open(staging / base, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise DataError(f"the downloaded archive is broken or truncated ({type(exc).__name__}: {exc})") from exc


def synthetic_folder(seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """Where the phantom set of ``seed`` is stored: ``root`` if given, else the cache."""
    if root is not None:
        return Path(root).expanduser()
    return cache_dir() / f"synthetic-v{PHANTOM_VERSION}-seed{seed}"


def make_synthetic(dest: str | os.PathLike | None = None, seed: int = 0, overwrite: bool = False) -> Path:
    """Build the phantom set (43 slices, same files and format as the real set) and store it atomically."""
    final = synthetic_folder(seed, dest)
    if not overwrite and (final / IMAGE_FILE).is_file() and (final / LABEL_FILE).is_file():
        return final
    images, labels = make_phantom(num_slices=NUM_SLICES, seed=seed)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".synthetic-") as tmp:
        staging = Path(tmp) / "set"
        staging.mkdir()
        torch.save(images.contiguous(), staging / IMAGE_FILE)
        torch.save(labels.contiguous(), staging / LABEL_FILE)
        (staging / "README.txt").write_text(
            f"Synthetic abdominal CT phantom v{PHANTOM_VERSION}, seed {seed}, made by "
            "tutorial_utils.phantom.make_phantom.\n"
            "Same format as the 2019 tutorial's TCIA slices; not real patient data.\n")
        if final.exists() and any(final.iterdir()):
            # a user-given folder with other content: write the files in, one by one, atomically
            for name in (IMAGE_FILE, LABEL_FILE, "README.txt"):
                os.replace(staging / name, final / name)
        else:
            if final.exists():
                final.rmdir()
            os.replace(staging, final)
    return final


# --------------------------------------------------------------------------- the one entry point


def load_dataset(source: str | None = None, root: str | os.PathLike | None = None, download: bool | None = None,
                 seed: int = 0, verbose: bool = True) -> Dataset:
    """Load the tutorial's slices.

    Args:
        source: "tcia" (the real slices; error if they cannot be had), "synthetic" (the phantom),
            or "auto" (the real slices if found, else the phantom, with one line saying so).
            Default: ``$L2R_DATA_SOURCE``, else "auto" (the test run sets it to "synthetic").
        root: a folder to look in first (real data), or to read/write the phantom set.
        download: for "tcia"/"auto", download the archive when no local copy is found.
            Default: only on Colab (on Kaggle the data is mounted; locally ``./tutorial.sh``
            runs ``data_download.py`` once, so notebooks and tests never touch the network).
        seed: phantom seed (a new seed gives new "patients").
    """
    if source is None:
        source = os.environ.get(SOURCE_ENV_VAR, "auto")
    if source not in ("auto", "tcia", "synthetic"):
        raise ValueError(f"source must be 'auto', 'tcia' or 'synthetic', got {source!r}")
    if download is None:
        download = "google.colab" in sys.modules
    if source in ("auto", "tcia"):
        folder = find_tcia(root)
        reason = "not found in " + ", ".join(str(p) for p in _candidate_folders(root))
        if folder is None and download:
            try:
                folder = download_tcia()
            except DataError as exc:
                reason = str(exc)
        if folder is not None:
            try:
                return _dataset_from_folder(folder, "tcia")
            except DataError as exc:
                if source == "tcia":
                    raise
                reason = str(exc)
        if source == "tcia":
            raise DataError(f"real TCIA slices {reason}. Get them with `python data_download.py`, or pass "
                            f"root= a folder holding {IMAGE_FILE} and {LABEL_FILE}.")
        if verbose:
            print(f"Real TCIA slices unavailable ({reason}); using the synthetic phantom (seed {seed}).")
        root = None  # root named where to look for real data, not where to put the phantom
    folder = make_synthetic(root, seed=seed)
    return _dataset_from_folder(folder, "synthetic")
