"""Helpers for the l2r-discrete tutorial on discrete deep learning image registration.

Layers (nothing imports upward):

* the foundation, importing nothing of ours: ``checks`` (the shared input checks)
* building blocks, importing only ``checks``: ``environment``, ``correlation``,
  ``regularisation``, ``transform``, ``metrics``, ``features``, ``models``, ``phantom``
* composing them: ``registration``, ``instance``, ``data``, ``plotting``
* above those: ``train``, ``continuous``, ``widgets``
* on top: ``benchmark``, ``exercises``
"""

__version__ = "0.1.0"
