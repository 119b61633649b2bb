"""Shared building blocks of the model families, one small module each.

- :mod:`generators.blocks.engram_hash`: Engram n-gram hashing and bank lookup (used by the
  engram stage to build the memory bank and by the train/generate stages to read it).
- :mod:`generators.blocks.pmf`: the pixel MeanFlow objective and one-step sampler.
- :mod:`generators.blocks.mhc`: manifold-constrained hyper-connections (Sinkhorn–Knopp).
- :mod:`generators.blocks.engram`: the Engram memory module (hashed n-gram lookup, gate).
- :mod:`generators.blocks.gated_attention`: sigmoid-gated diffusers attention processors.
- :mod:`generators.blocks.dsa`: lightning indexer and top-k sparse temporal attention.
"""
