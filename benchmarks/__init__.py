"""Benchmarks of the tutorial's building blocks, one script each (run from anywhere after
``pip install -e .``, or from the repository root):

    python -m benchmarks.correlation [--json PATH] ...   the correlation layer (notebook 02)
    python -m benchmarks.training [--json PATH] ...      training pairs per second (notebook 04)
    python -m benchmarks.three_d [--json PATH] ...       3D cost volumes, dense and sparse (notebook 05)
    python -m benchmarks                                 lists them

Each prints a table and, with ``--json PATH``, writes its results (``benchmark-results/`` is
git-ignored). The shared clock, memory meter and command line are in :mod:`benchmarks.timing`.
"""
