"""The anatomy check of label names: the phantom fits its names; shuffled names are caught; bad input raises.

The phantom is drawn in the order of ``LABEL_NAMES`` (the real 2019 slices' order), in
radiological display. Relabelling it by a permutation of the organ values is what a wrong
label order would look like; every permutation that moves the liver, the spleen, the left
kidney or the esophagus must be flagged.
"""

from __future__ import annotations

import re
import time
import warnings

import pytest
import torch

from tutorial_utils.organ_check import LabelOrderWarning, anatomy_problems
from tutorial_utils.phantom import LABEL_NAMES, make_phantom

SPLEEN, PANCREAS, LEFT_KIDNEY, GALLBLADDER, ESOPHAGUS, LIVER, STOMACH, DUODENUM = (
    LABEL_NAMES.index(n) for n in ("spleen", "pancreas", "left kidney", "gallbladder", "esophagus", "liver",
                                   "stomach", "duodenum"))
CHECKED = (LIVER, SPLEEN, LEFT_KIDNEY, ESOPHAGUS)
"""The organs whose place or size the check knows well enough to catch any relabelling of them."""


@pytest.fixture(scope="module")
def phantom_labels() -> torch.Tensor:
    """int64 [43, 256, 320]: the phantom's labels (seed 0), drawn once for the module."""
    return make_phantom(43, seed=0)[1].long()


def relabel(labels: torch.Tensor, organ_to_value: dict[int, int]) -> torch.Tensor:
    """Labels with organ value o written as ``organ_to_value[o]`` (others unchanged), by a lookup tensor."""
    lookup = torch.arange(len(LABEL_NAMES))
    for organ, value in organ_to_value.items():
        lookup[organ] = value
    assert sorted(lookup.tolist()) == list(range(len(LABEL_NAMES)))  # a permutation
    return lookup[labels]


def test_the_phantom_fits_its_names_and_the_check_is_fast(phantom_labels):
    assert phantom_labels.shape == (43, 256, 320)
    start = time.perf_counter()
    problems = anatomy_problems(phantom_labels, LABEL_NAMES)
    seconds = time.perf_counter() - start
    assert problems == []
    assert seconds < 1.0, f"{seconds:.2f} s for 43 slices of 256 x 320"


@pytest.mark.parametrize("kwargs", [dict(seed=1), dict(seed=0, misalignment=1)])
def test_other_phantoms_fit_their_names(kwargs):
    """Other patients, and whole-body affine differences (misalignment=1), keep the anatomy."""
    labels = make_phantom(43, **kwargs)[1]
    assert anatomy_problems(labels.long(), LABEL_NAMES) == []
    assert anatomy_problems(labels, LABEL_NAMES) == []  # uint8 as stored, too


@pytest.mark.parametrize("a, b, expected", [
    (LIVER, SPLEEN, [r"label 6 'liver' is the largest organ on 0 of \d+ slices where it appears \(expected most\)",
                     r"label 6 'liver' has its centroid in the image's left half on 0 of",
                     r"label 1 'spleen' has its centroid in the image's right half on 0 of"]),
    (LIVER, STOMACH, [r"label 6 'liver' is the largest organ on 0 of", r"label 6 'liver' has its centroid"]),
    (SPLEEN, LEFT_KIDNEY, [r"label 1 'spleen' lies lateral to \(right of\) label 3 'left kidney' on 0 of \d+ "
                           r"slices where both appear \(expected most\)"]),
    (ESOPHAGUS, PANCREAS, [r"label 5 'esophagus' has a median area of \d+ pixels \(.*% of the image.*"
                           r"\(expected a small organ: under 1 % of the image and under 5 % of the liver's"]),
])
def test_specific_swaps_are_flagged_with_a_reason(phantom_labels, a, b, expected):
    problems = anatomy_problems(relabel(phantom_labels, {a: b, b: a}), LABEL_NAMES)
    assert problems, f"swapping {LABEL_NAMES[a]} and {LABEL_NAMES[b]} went unnoticed"
    for pattern in expected:
        assert any(re.search(pattern, problem) for problem in problems), (pattern, problems)


def _permutations_moving_a_checked_organ(count: int, seed: int) -> list[dict[int, int]]:
    generator = torch.Generator().manual_seed(seed)
    found = []
    while len(found) < count:
        values = (torch.randperm(8, generator=generator) + 1).tolist()
        mapping = dict(zip(range(1, 9), values))
        if any(mapping[organ] != organ for organ in CHECKED):
            found.append(mapping)
    return found


def test_random_permutations_that_move_a_checked_organ_are_flagged(phantom_labels):
    """~100 seeded relabellings, each moving the liver, spleen, left kidney or esophagus."""
    missed = []
    for mapping in _permutations_moving_a_checked_organ(100, seed=0):
        if not anatomy_problems(relabel(phantom_labels, mapping), LABEL_NAMES):
            missed.append({LABEL_NAMES[o]: LABEL_NAMES[v] for o, v in mapping.items() if o != v})
    assert not missed, f"{len(missed)} relabellings went unnoticed, e.g. {missed[:3]}"


def test_permutations_of_unchecked_organs_only_may_pass(phantom_labels):
    """Pancreas <-> duodenum: no rule tells them apart by place alone, and the check says nothing."""
    assert anatomy_problems(relabel(phantom_labels, {PANCREAS: DUODENUM, DUODENUM: PANCREAS}), LABEL_NAMES) == []


def test_majority_rules_are_robust_to_a_few_odd_slices(phantom_labels):
    """Liver and spleen swapped on 5 of 43 slices (as if mislabelled there): still no problem."""
    labels = phantom_labels.clone()
    labels[:5] = relabel(phantom_labels[:5], {LIVER: SPLEEN, SPLEEN: LIVER})
    assert anatomy_problems(labels, LABEL_NAMES) == []


def test_rules_apply_only_to_named_organs():
    """A label map whose organs are not named after these organs has nothing to contradict."""
    labels = torch.zeros(3, 8, 8, dtype=torch.long)
    labels[:, :2, 6:] = 1  # a small organ on the right
    labels[:, 2:, :] = 2  # a large one everywhere
    assert anatomy_problems(labels, ["background", "a", "b"]) == []
    assert anatomy_problems(labels, ["background", "Liver ", "b"])[0].startswith(
        "label 1 'Liver ' is the largest organ on 0 of 3 slices")  # names compared without case and spaces


def test_a_name_given_twice_is_a_problem():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    assert anatomy_problems(labels, ["background", "liver", "liver"]) == [
        "the name 'liver' is given to labels 1 and 2 (expected one label per organ)"]


def test_an_organ_absent_everywhere_is_not_judged():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, 2:6, :3] = LIVER  # only a liver, on the image's left
    assert anatomy_problems(labels, LABEL_NAMES) == []


@pytest.mark.parametrize("labels, names, error, match", [
    (torch.zeros(4, 5, dtype=torch.long), LABEL_NAMES, ValueError, r"labels must be an integer label map \[N, H, W\]"),
    (torch.zeros(1, 2, 4, 5, dtype=torch.long), LABEL_NAMES, ValueError, r"\[N, H, W\], got .*\[1, 2, 4, 5\]"),
    (torch.zeros(2, 4, 5), LABEL_NAMES, ValueError, r"labels must hold integers"),
    (torch.zeros(2, 4, 5, dtype=torch.bool), LABEL_NAMES, ValueError, r"labels must hold integers"),
    ([[[0, 1]]], LABEL_NAMES, TypeError, r"labels must be a torch\.Tensor"),
    (torch.full((2, 4, 5), 9), LABEL_NAMES, ValueError, r"labels must hold values 0\.\.8, got values from 9 to 9"),
    (torch.zeros(2, 4, 5, dtype=torch.long), "background liver", TypeError, r"label_names must be a sequence"),
    (torch.zeros(2, 4, 5, dtype=torch.long), ["background", 1], TypeError, r"label_names must hold strings"),
    (torch.zeros(2, 4, 5, dtype=torch.long), ["background"], ValueError, r"at least one organ"),
])
def test_bad_input_raises_clearly(labels, names, error, match):
    with pytest.raises(error, match=match):
        anatomy_problems(labels, names)


def test_the_warning_class_is_a_user_warning():
    assert issubclass(LabelOrderWarning, UserWarning)
    with pytest.warns(LabelOrderWarning, match="label order"):
        warnings.warn("label order", LabelOrderWarning, stacklevel=1)
