"""Helpers for the l2r-discrete tutorial on discrete deep learning image registration.

Layers (nothing imports upward):

* building blocks, importing nothing of ours: ``environment``, ``correlation``,
  ``regularisation``, ``transform``, ``metrics``, ``features``, ``models``, ``phantom``
* composing them: ``registration``, ``instance``, ``data``, ``plotting``
* above those: ``train``, ``continuous``, ``widgets``
* on top: ``benchmark``, ``exercises``
"""

__version__ = "0.1.0"
