"""The ``dualforce`` family (causal video + 3D-structure diffusion forcing, issue 12).

``config`` holds the typed config and spec (no torch); ``family``
(:class:`~generators.dualforce.family.DualForceFamily`) is registered when imported. The
package imports neither: :mod:`generators.registry` reads ``config`` to validate a train
section and imports ``family`` on the first lookup of the family.
"""
