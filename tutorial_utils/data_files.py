"""Where the slices live on disk: the cache, the 2019 archive, the tensor files, the phantom set.

Used by :func:`~tutorial_utils.data.load_dataset` (notebook 01) and ``data_download.py``.
The real slices are looked for, in this order: the folder given (``root=``), the Kaggle mount
``/kaggle/input/learn2reg``, the local cache (``$L2R_DATA_DIR``, default
``~/.cache/l2r-discrete``). :func:`download_tcia` downloads the tutorial's archive, takes
only its three data files (by name, no paths from the archive), validates them
(:func:`read_slices`) and moves them into place atomically; :func:`make_synthetic` writes the
phantom set in the same format, atomically too. Nothing is unpickled: the tensor files are
read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

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

class DataError(RuntimeError):
    """The data could not be had or is not what it should be; the message says why."""


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
