"""The ``dualforce`` family (causal video + 3D-structure diffusion forcing, issue 12).

Importing the package registers :class:`~generators.dualforce.family.DualForceFamily`.
"""

from generators.dualforce.config import DualForceConfig, DualForceSpec
from generators.dualforce.family import DualForceFamily

__all__ = ["DualForceConfig", "DualForceFamily", "DualForceSpec"]
