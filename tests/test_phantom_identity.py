"""The phantom's bytes do not change: small slices and volumes against recorded SHA-256 hashes.

The hashes were recorded from the pre-split implementation (the single module
``tutorial_utils/phantom.py`` of PHANTOM_VERSION 1 and PHANTOM_VOLUME_VERSION 1), before it
became the ``tutorial_utils.phantom`` subpackage: they are the independent reference that a
refactoring must reproduce. The same hashes came out with ``ATEN_CPU_CAPABILITY=default`` and
``avx2``. A deliberate change of the output bumps the version and records new hashes.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from tutorial_utils.phantom import (
    PHANTOM_VERSION,
    PHANTOM_VOLUME_VERSION,
    make_phantom,
    make_phantom_volume,
)

SLICES = [
    (
        {"num_slices": 4, "seed": 7, "shape": (128, 160)},
        "3546e92f660a000c064c460812b792e96a07e9ceb7f14645d5225fbcbbb4d6fa",
        "ce68c954915a552dd57825aeaebb04ec3d50e4a2d4f5650f7820465a8cc11aff",
    ),
    (
        {"num_slices": 6, "seed": 3, "shape": (64, 80), "misalignment": 3.0},
        "2b5c1ff66c5fe1483afa3d1c0fa78bb83a44751026ebcf3ad07ff58b2896b2e3",
        "98eebb66bb2f16c9c12400c138c413b35e161a20c21677eb9d70bf4aed6f7592",
    ),
]
"""(arguments of make_phantom, sha256 of the images' bytes, sha256 of the labels' bytes)."""

VOLUMES = [
    (
        {"num_volumes": 2, "seed": 0, "shape": (32, 40), "depth": 16, "supersample": 1},
        "b4583aca15c3995975eb9aa5b432f44bc452bd7655f9e8c6957a809edf6305aa",
        "01a72f0c326d3d754e145effad61d05b39426c7d78c1d926b782607928e6604b",
    ),
    (
        {"num_volumes": 1, "seed": 5, "shape": (32, 40), "depth": 8, "supersample": 2},
        "ece992738760cf2f7060a5362bf07b256f4e31c37488187de37b3efb30b5c6bb",
        "9b3d79db9a87605bc00d0da9edced2a5d249a5cdd9e6416dfca1d32afae3139b",
    ),
]
"""(arguments of make_phantom_volume, sha256 of the volumes' bytes, sha256 of the labels' bytes)."""


def sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


def test_the_versions_that_the_hashes_belong_to():
    assert PHANTOM_VERSION == 1 and PHANTOM_VOLUME_VERSION == 1


@pytest.mark.parametrize("kwargs, images_sha, labels_sha", SLICES, ids=lambda v: str(v)[:40])
def test_slices_are_byte_identical(kwargs, images_sha, labels_sha):
    images, labels = make_phantom(**kwargs)
    assert images.dtype == labels.dtype == torch.uint8 and images.is_contiguous()
    assert (sha256(images), sha256(labels)) == (images_sha, labels_sha)


@pytest.mark.parametrize("kwargs, volumes_sha, labels_sha", VOLUMES, ids=lambda v: str(v)[:40])
def test_volumes_are_byte_identical(kwargs, volumes_sha, labels_sha):
    volumes, labels = make_phantom_volume(**kwargs)
    assert volumes.dtype == labels.dtype == torch.uint8 and volumes.is_contiguous()
    assert (sha256(volumes), sha256(labels)) == (volumes_sha, labels_sha)
