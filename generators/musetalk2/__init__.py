"""The ``musetalk2`` family: MuseTalk 2.0 (pMF one-step latent inpainting UNet, issue 10).

Importing the package registers :class:`~generators.musetalk2.family.Musetalk2Family`.
Modules: ``config`` (typed config, stage presets, spec), ``network`` (adapter → UNet →
heads), ``levels`` (mHC / Engram / DSA inside the UNet's levels), ``audio`` (tokens and
their position encoding), ``sampling`` (weighted windows, IFS, DMS), ``data`` (feature
cache → batches), ``losses`` (pixel terms through frozen models), ``transfer`` (Phase 9).
"""

from generators.musetalk2.config import Musetalk2Config, Musetalk2Spec
from generators.musetalk2.family import Musetalk2Family

__all__ = ["Musetalk2Config", "Musetalk2Family", "Musetalk2Spec"]
