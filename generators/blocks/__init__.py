"""Shared building blocks of the model families, one small module each.

- :mod:`generators.blocks.engram_hash`: Engram n-gram hashing, bank lookup and bank I/O
  (used by the engram stage to build the memory bank and by families to read it).

Further blocks (pMF, mHC hyper-connections, the Engram module, gated attention, the DSA
sparse indexer) live beside it; see each module's docstring for its contract.
"""
