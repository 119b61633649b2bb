"""The wing: generative model families and their shared building blocks.

``generators/blocks/`` holds the building blocks of the MuseTalk 2.0 plan, one small module
each: Engram hashing (used by the engram stage to build the memory bank), pixel MeanFlow
(:mod:`~generators.blocks.pmf`), manifold-constrained hyper-connections
(:mod:`~generators.blocks.mhc`), the Engram module (:mod:`~generators.blocks.engram`), gated
attention processors (:mod:`~generators.blocks.gated_attention`) and DeepSeek sparse
attention with its lightning indexer (:mod:`~generators.blocks.dsa`).

**Import rule.** Modules here import only torch, diffusers / transformers, numpy,
safetensors, pydantic, the standard library and ``models/`` (frozen pretrained wrappers) —
never ``tasks/``, ``storage/``, ``talkforge/``, ``flows/``, Prefect or Ray.
"""
