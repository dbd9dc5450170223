"""The 3D outlook of notebook 05: the 2D building blocks one dimension up.

Volumes [B, C, Z, Y, X]; cost volumes [B, D**3, d, h, w] with channel ``k = (i*D + j)*D + l``
holding ``(dz, dy, dx) = (i - r, j - r, l - r)``; displacements [B, 3, Z, Y, X] (dz, dy, dx) in
voxels. One module per idea, mirroring the 2D modules; import from them directly, e.g.
``from tutorial_utils.three_d.correlation import correlation3d``:

* :mod:`~tutorial_utils.three_d.correlation` -- the dense 3D cost volume and its arg-min;
* :mod:`~tutorial_utils.three_d.regularisation` -- min-convolution over the displacements,
  mean field over the volume, soft arg-min (for the full cube or any set of displacements);
* :mod:`~tutorial_utils.three_d.transform` -- warping volumes and label volumes, resizing fields;
* :mod:`~tutorial_utils.three_d.features` -- 3D intensity features and MIND-SSC;
* :mod:`~tutorial_utils.three_d.metrics` -- Jacobian determinant and folding of 3D fields;
* :mod:`~tutorial_utils.three_d.registration` -- ``register_volumes`` and its settings (``DEFAULTS_3D``);
* :mod:`~tutorial_utils.three_d.sparse` -- the pdd_net variant: control points, a sampled
  displacement cube, ``register_volumes_sparse``.

These modules use the 2D building blocks and :mod:`tutorial_utils.checks` (and
:mod:`tutorial_utils.registration` for what the 2D and 3D pipelines share); nothing of the 2D
core imports them.
"""
