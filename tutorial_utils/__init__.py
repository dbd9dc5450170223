"""Helpers for the l2r-discrete tutorial on discrete deep learning image registration.

The map of the modules, one line each, is in CONTRIBUTING.md. Layers (nothing imports upward):

* the foundation: ``checks`` (the shared input checks), ``offsets`` (the displacement of
  each cost-volume channel)
* building blocks, importing only the foundation: ``environment``, ``features``, ``correlation``,
  ``regularisation``, ``transform``, ``metrics``, ``organ_check``, ``models``, ``phantom``
* composing them: ``prealign``, ``registration``, ``instance``, ``data_files``, ``data``, ``scans``,
  ``plotting``, ``losses``, ``regularisation_fast``, ``evaluation``, ``explorer``, ``three_d``
  (the 3D outlook of notebook 05)
* above those: ``training``, ``train``, ``pipeline_2019``, ``continuous``, ``widgets``,
  ``register``, ``compare``
* on top: ``exercises``

The benchmarks live outside the package, in ``benchmarks/``.
"""

__version__ = "0.1.0"
