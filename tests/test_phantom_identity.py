"""The phantom's bytes do not change: small slices and volumes against recorded SHA-256 hashes.

The label hashes of version 1 were recorded from the pre-split implementation (the single
module ``tutorial_utils/phantom.py``), before it became the ``tutorial_utils.phantom``
subpackage: they are the independent reference that a refactoring must reproduce. Version 2
numbers the organs as the real slices do (1 spleen, 2 pancreas, 3 left kidney, 4 gallbladder,
5 esophagus, 6 liver, 7 stomach, 8 duodenum; version 1 had 1 spleen, 2 left kidney,
3 gallbladder, 4 esophagus, 5 liver, 6 stomach, 7 pancreas, 8 duodenum): its labels, mapped back
to the old numbers, must give exactly the version-1 bytes, so the anatomy is unchanged. The
volumes' grey values are those of version 1; the slices' grey values are new in version 2 (each
patient's own contrast, texture and noise level) and were recorded with
``ATEN_CPU_CAPABILITY=default`` and ``avx2`` alike. A deliberate change of the output bumps the
version and records new hashes.
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
        "bed1c1c3c2df458016ca4ffcc2f1a3e3c659825615ab437bd6578544efc8a353",
        "ce68c954915a552dd57825aeaebb04ec3d50e4a2d4f5650f7820465a8cc11aff",
    ),
    (
        {"num_slices": 6, "seed": 3, "shape": (64, 80), "misalignment": 3.0},
        "fbe8ea082cd5710e050e519195b7ca25c29cc8733d6e3d15608dc8d8c4f4144a",
        "98eebb66bb2f16c9c12400c138c413b35e161a20c21677eb9d70bf4aed6f7592",
    ),
]
"""(arguments of make_phantom, sha256 of the images' bytes (version 2), sha256 of the labels' bytes
in the version-1 numbering)."""

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
"""(arguments of make_phantom_volume, sha256 of the volumes' bytes, sha256 of the labels' bytes in the
version-1 numbering)."""

TO_VERSION_1 = torch.tensor([0, 1, 7, 2, 3, 4, 5, 6, 8], dtype=torch.uint8)
"""Label value of version 2 -> the same organ's value in version 1 (pancreas 2 -> 7, left kidney 3 -> 2, ...)."""


def sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


def test_the_versions_that_the_hashes_belong_to():
    assert PHANTOM_VERSION == 2 and PHANTOM_VOLUME_VERSION == 2


@pytest.mark.parametrize("kwargs, images_sha, labels_sha", SLICES, ids=lambda v: str(v)[:40])
def test_slices_are_byte_identical(kwargs, images_sha, labels_sha):
    images, labels = make_phantom(**kwargs)
    assert images.dtype == labels.dtype == torch.uint8 and images.is_contiguous()
    assert (sha256(images), sha256(TO_VERSION_1[labels.long()])) == (images_sha, labels_sha)


@pytest.mark.parametrize("kwargs, volumes_sha, labels_sha", VOLUMES, ids=lambda v: str(v)[:40])
def test_volumes_are_byte_identical(kwargs, volumes_sha, labels_sha):
    volumes, labels = make_phantom_volume(**kwargs)
    assert volumes.dtype == labels.dtype == torch.uint8 and volumes.is_contiguous()
    assert (sha256(volumes), sha256(TO_VERSION_1[labels.long()])) == (volumes_sha, labels_sha)
