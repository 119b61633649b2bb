"""Shared building blocks of the model families, one small module each.

- :mod:`~generators.blocks.config`: the blocks' hyper-parameters (Engram, pMF) as pydantic
  models without torch, for family configs to embed;
- :mod:`~generators.blocks.engram_hash`: Engram n-gram hashing, bank lookup and bank I/O
  (the engram stage builds the memory bank with it; families read it);
- :mod:`~generators.blocks.engram`: the Engram module (hashed-n-gram lookup, context gate,
  ShortConv), initialised from the memory bank;
- :mod:`~generators.blocks.pmf`: pixel MeanFlow objective (``torch.func.jvp``), time sampler,
  one-step sampler;
- :mod:`~generators.blocks.mhc`: manifold-constrained hyper-connections (Sinkhorn-Knopp);
- :mod:`~generators.blocks.gated_attention`: gated attention as a diffusers processor;
- :mod:`~generators.blocks.dsa`: DeepSeek sparse attention (lightning indexer, top-k).

Families use these modules themselves (``tests/test_blocks_*`` test them; the assembled
MuseTalk 2.0 network's tests check it is built from them).
"""
