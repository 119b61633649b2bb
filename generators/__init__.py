"""The wing: generative model families behind one registry, and their shared building blocks.

Layout::

    generators/
      family.py      the contract every family implements (ModelFamily, FeatureClip, ...)
      family_config.py  its torch-free part: the FamilyConfig and ModelSpec bases, and the
                     plain values (FeatureClip, DataLayout, TrainingAssets)
      registry.py    register / look up families; the train stage's config union
      blocks/        shared building blocks, one small module each (engram_hash, pmf, mhc, ...)
      musetalk15/    the MuseTalk 1.5 baseline: latent UNet, one-step regression
      musetalk2/     MuseTalk 2.0: pMF one-step inpainting UNet with mHC, Engram, gates, DSA
      dualforce/     DualForce: causal video + 3D-structure diffusion forcing
      <family>/      one package per further family

**Import rule.** Modules here import only torch, diffusers / transformers, numpy,
safetensors, pydantic, the standard library and ``models/`` (frozen pretrained wrappers) —
never ``tasks/``, ``storage/``, ``talkforge/``, ``flows/``, Prefect or Ray
(``tests/test_generators_registry.py`` scans every module for it). The stages in ``tasks/``
read catalog records and feature files, then hand the wing plain tensors and local paths.

**How a family plugs in** (three steps):

1. A config class in the package's ``config`` module, which imports no torch (pipeline
   configs are validated without it): a subclass of
   :class:`generators.family_config.FamilyConfig` whose ``family`` field is a
   ``Literal["<name>"]`` with that default, plus the family's own fields (all typed,
   validated, ``extra="forbid"``). The train stage merges it with its own fields
   (``tasks.train_config.TrainStageConfig``: steps, batch_size, learning_rate, the
   optimizer and schedule, trainable/frozen patterns, init_from, resources, ...), so a
   family field must not reuse one of those names (``registry.config_union`` refuses a
   clash). Users select it as ``train: {family: <name>, ...}``; ``musetalk15`` is the default.
   Frozen models its losses need (``asset_specs()``, by config) are declared here too: the
   train stage fingerprints them when it plans, without importing the family.
2. A spec class (subclass of :class:`generators.family_config.ModelSpec`): everything
   needed to rebuild the network from JSON (stored in the checkpoint record and in the
   weights' safetensors header). Specs are data, never pickles.
3. A :class:`generators.family.ModelFamily` subclass, decorated with
   :func:`generators.registry.register`, implementing the small surface the stages call:

   - ``make_spec(layout)``: the spec for the training data's per-frame feature shapes;
   - ``build(spec)``: a freshly initialised ``torch.nn.Module``;
   - ``load_training_data(spec, clips, bank_path)``, ``training_batch(...)`` and
     ``training_step(model, batch) -> {"loss": ..., other named terms}``;
   - ``prepare_clip(spec, features, bank, reference_frame)`` and
     ``sample(model, clip, frames)``: predicted VAE latents for a clip's frames.

   Class attributes declare ``features`` (feature family -> tensor name, e.g.
   ``{"vae_latents": "latents", "hubert": "features"}``: the stages check and read exactly
   these) and ``uses_memory_bank``. Weights I/O (``save_weights`` / ``load_model``, strict
   safetensors with the spec in the header) is inherited.
   Then add the family to ``registry.BUILTINS``: its name and the import paths of its
   config class and of its ``@register``-ed family class (imported on first lookup; the
   package's ``__init__`` imports neither).

The musetalk15 package is the worked example (``generators/musetalk15/config.py``,
``family.py``).

The ``train`` stage builds the manifest and runs the ranks, ``generate`` loads the
checkpoint and decodes latents through the VAE, ``engram`` builds the memory bank with
:mod:`generators.blocks.engram_hash`: none of them knows which family runs.
"""
