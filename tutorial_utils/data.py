"""The 2D abdominal CT slices: the real TCIA set of the 2019 tutorial, or the synthetic phantom.

One interface for both::

    dataset = load_dataset()            # real slices if found locally, else the phantom
    dataset.images   # float32 [N, 1, H, W] in [0, 1]
    dataset.labels   # int64   [N, H, W], 0 = background

Where the real slices are looked for, in this order: the folder given (``root=``), the
Kaggle mount ``/kaggle/input/learn2reg``, the local cache (``$L2R_DATA_DIR``, default
``~/.cache/l2r-discrete``); with ``download=True`` (or ``python data_download.py``) the
tutorial's archive is then downloaded, validated and unpacked atomically into the cache
(:mod:`~tutorial_utils.data_files`: where the data lives on disk).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checks import check_finite, check_int, describe
from .data_files import (
    IMAGE_FILE,
    LABEL_FILE,
    NUM_SLICES,
    SOURCE_ENV_VAR,
    DataError,
    _candidate_folders,
    download_tcia,
    find_tcia,
    make_synthetic,
    read_slices,
)
from .organ_check import LabelOrderWarning, anatomy_problems
from .phantom import LABEL_NAMES

TEST_IDS = (35, 41, 0, 4, 33, 38, 39, 17)
"""The test slices of the 2019 tutorial; the other 35 are for training."""
TRAIN_IDS = tuple(i for i in range(NUM_SLICES) if i not in TEST_IDS)



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


def _check_dataset(dataset: object) -> None:
    """The check of a ``dataset`` argument (training, evaluation): a :class:`Dataset`, else ValueError."""
    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset must be a tutorial_utils.data.Dataset, got {type(dataset).__name__}")


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


def generic_label_names(num_labels: int) -> tuple[str, ...]:
    """``("background", "label 1", ..., "label {num_labels - 1}")``: names that claim no organ."""
    return ("background", *(f"label {v}" for v in range(1, check_int("num_labels", num_labels, minimum=1))))


def _checked_label_names(labels: torch.Tensor, folder: Path) -> tuple[str, ...]:
    """:data:`LABEL_NAMES` if they fit the anatomy of ``labels`` [N, H, W], else generic names and one
    :class:`~tutorial_utils.organ_check.LabelOrderWarning` that lists the contradictions.

    Nobody can look at every real slice, so the organ names are checked against the anatomy
    (:func:`~tutorial_utils.organ_check.anatomy_problems`) before any table prints them.
    """
    problems = anatomy_problems(labels, LABEL_NAMES)
    if not problems:
        return LABEL_NAMES
    generic = generic_label_names(len(LABEL_NAMES))
    warnings.warn(
        f"the label values of the slices in {folder} do not fit the organ names "
        f"{', '.join(f'{v} = {n}' for v, n in enumerate(LABEL_NAMES) if v)}:\n"
        + "\n".join(f"  - {p}" for p in problems)
        + f"\nThe organ names are replaced by {generic[1]!r}..{generic[-1]!r}, so that no table prints a "
          f"wrong organ name; the labels themselves are unchanged.",
        LabelOrderWarning, stacklevel=4)
    return generic


def _dataset_from_folder(folder: Path, source: str) -> Dataset:
    """The slices of ``folder``; real slices (any ``source`` but "synthetic") have their organ names checked."""
    images, labels = read_slices(folder)
    names = LABEL_NAMES if source == "synthetic" else _checked_label_names(torch.as_tensor(labels).long(), folder)
    ds = Dataset.from_arrays(images, labels, names, TRAIN_IDS, TEST_IDS, source=source)
    ds.root = folder
    return ds



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

    The organ names of real slices are checked against the anatomy
    (:func:`~tutorial_utils.organ_check.anatomy_problems`); if they do not fit, a
    :class:`~tutorial_utils.organ_check.LabelOrderWarning` lists why and the dataset's
    ``label_names`` are "background", "label 1", ..., "label 8" instead.
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
