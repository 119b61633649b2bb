"""The ``musetalk2`` family: MuseTalk 2.0 (pMF one-step latent inpainting UNet, issue 10).

Modules: ``config`` (typed config, stage presets, spec; no torch), ``family``
(:class:`~generators.musetalk2.family.Musetalk2Family`, registered when imported),
``network`` (adapter → UNet → heads), ``levels`` (mHC / Engram / DSA inside the UNet's
levels), ``audio`` (tokens and their position encoding), ``sampling`` (weighted windows,
IFS, DMS), ``data`` (feature cache → batches), ``losses`` (pixel terms through frozen
models), ``transfer`` (Phase 9). The package imports none of them: :mod:`generators.registry`
reads ``config`` to validate a train section and imports ``family`` on the first lookup.
"""
