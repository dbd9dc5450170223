"""Every figure of the notebooks, one module per kind of picture.

* :mod:`~tutorial_utils.plotting.overlays` -- slices with their organs: label colours,
  overlays, legends, slice grids, organ presence, Dice box plots (all notebooks);
* :mod:`~tutorial_utils.plotting.costs` -- cost maps, the cost volume, the min-convolution
  figure, the correlation benchmark (notebooks 02, 03);
* :mod:`~tutorial_utils.plotting.fields` -- displacement arrows, the deformed grid, the
  Jacobian determinant (notebooks 02, 03, 05).

Import from here, e.g. ``from tutorial_utils.plotting import show_overlay, show_cost_maps``.
"""

from ._arrays import _as_numpy as _as_numpy
from ._arrays import _feature_centre as _feature_centre
from .costs import (
    plot_correlation_benchmark,
    show_cost_maps,
    show_cost_volume,
    show_min_convolution,
)
from .fields import show_deformation_grid, show_displacement_field, show_jacobian
from .overlays import (
    dice_boxplot,
    label_colours,
    organ_legend,
    organ_presence,
    show_overlay,
    show_slices,
)

__all__ = [
    "dice_boxplot",
    "label_colours",
    "organ_legend",
    "organ_presence",
    "plot_correlation_benchmark",
    "show_cost_maps",
    "show_cost_volume",
    "show_deformation_grid",
    "show_displacement_field",
    "show_jacobian",
    "show_min_convolution",
    "show_overlay",
    "show_slices",
]
