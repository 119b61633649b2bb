"""Features stage: per-frame video and audio features of every accepted clip.

Per accepted clip it writes one safetensors file per feature family, each a catalog
artifact carrying shape, dtype and the fingerprint of the weights that made it:

- ``vae_latents.safetensors``: tensor ``latents`` ``(T, C, H/8, W/8)`` (``latent_dtype``),
  normalised as the VAE family's pipelines do (``(mode - shift) * scale``), one row per
  decoded face-crop frame; with ``masked_latents: true`` also ``masked_latents`` (same
  shape): the same crops with their lower half (rows ``H//2:``) blacked out in pixel space
  before encoding, MuseTalk 1.5's masked UNet input (``get_latents_for_unet``) for the
  official ``musetalk15`` baseline;
- ``liveportrait_motion.safetensors``: tensor ``motion`` ``(T, 133)`` (``motion: null``
  disables it) and ``emoca_flame.safetensors``: tensor ``flame`` ``(T, 159)`` (``flame:
  null`` disables it); each from its own official crop of the clip's frames, framed from
  the faces stage's landmarks (see :mod:`tasks.features_video`,
  :mod:`tasks.features_framing`);
- ``reference.safetensors``: DINOv2 ``cls`` ``(D,)``, ``patch_tokens`` ``(N, D)`` and the
  ``image`` of the clip's middle frame (``reference: null`` disables it);
- ``hubert.safetensors``: tensor ``features`` ``(T, 2, D)``, two HuBERT steps per video frame;
- ``sensevoice.safetensors``: ``features`` ``(T_s, 512)`` at ≈16.67 Hz (prompt rows dropped)
  and ``frame_index`` ``(T,)``: two SenseVoice steps per three video frames (rule in
  :mod:`tasks.features_audio`); ``ctc_tokens`` ``(T,)`` int64, the CTC argmax id of each
  frame's row (Engram keys; vocabulary size in the ``ctc_vocab_size`` metadata); language /
  emotion / event tags and the transcript go to the ``speech`` catalog table
  (``sensevoice: null`` disables it).
- ``whisper.safetensors`` (only with ``whisper:`` set: MuseTalk 1.5's audio input):
  ``features`` ``(T, 2, L+1, D)``, every Whisper encoder hidden state, two 50 Hz steps per
  video frame by the HuBERT rule below (see :mod:`models.whisper`).

**Alignment rule.** HuBERT emits ``T_a = floor((N - 400) / 320) + 1`` steps for ``N`` samples
at 16 kHz; step ``k`` sees samples ``[320k, 320k + 400)`` (50 Hz). Video frame ``i`` of a
25 fps clip spans ``[40i, 40i + 40)`` ms and gets steps ``2i`` and ``2i + 1`` (their windows
are centred at ``40i + 12.5`` and ``40i + 32.5`` ms, both inside the frame). A clip of exactly
``T`` frames has ``N = 640T`` samples and hence ``T_a = 2T - 1``: the missing tail step(s)
(any index ``≥ T_a``) repeat the last step; surplus audio steps are dropped. The clip is
``MISALIGNED`` when ``|T_a · fps / 50 - T| > max_misalignment_frames`` (``|T_a/2 - T|`` at
25 fps). At any other frame rate the two steps of frame ``i`` sit at 50 Hz positions
``(2i + j) · 25 / fps`` (``j = 0, 1``), linearly interpolated and clamped to the last step,
which reduces exactly to the rule above at 25 fps.

Crops are decoded as a stream in chunks of ``resources.batch_size`` frames, so a clip is
never held in memory as pixels; long audio runs through HuBERT in overlapping windows.

This module is what planning needs (the stage class, its models and pools) and imports no
model library: the per-clip work is :mod:`tasks.features_extract` and the models run in
the workers of :mod:`tasks.features_workers`, both imported when a stage worker sets up.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from models.registry import ModelSpec, fingerprint
from tasks.base import ItemContext, ItemInputs, Resources, Stage, StageConfig
from tasks.features_config import FeaturesConfig
from tasks.pools import PoolSpec, build_worker, complete_pools
from tasks.records import ClipFeatures

if TYPE_CHECKING:
    from tasks.features_extract import ClipExtractor

WORKERS_MODULE = "tasks.features_workers"  # the extractor classes the pools' factories name


class FeaturesStage(Stage[FeaturesConfig]):
    """Face-crop VAE latents + frame-aligned HuBERT features for each accepted clip."""

    name: ClassVar[str] = "features"
    # 3: the record names its audio; 4: LivePortrait and EMOCA on their official framing;
    # 5: SenseVoice CTC tokens per frame
    code_version: ClassVar[str] = "5"
    requires: ClassVar[tuple[str, ...]] = ("download", "faces", "quality")
    config_type: ClassVar[type[StageConfig]] = FeaturesConfig

    extractor: ClipExtractor | None = None

    def model_specs(self) -> list[Any]:
        cfg = self.config
        specs = (cfg.vae, cfg.hubert, cfg.motion, cfg.flame, cfg.reference, cfg.sensevoice,
                 cfg.whisper)  # fmt: skip
        return [s for s in specs if s is not None]

    def pool_specs(self) -> list[PoolSpec]:
        """One pool per enabled extractor; remote when ``pools.placement`` is ``own_pools``.

        Each factory names its worker class in :data:`WORKERS_MODULE` by import path
        (:func:`tasks.pools.build_worker`), so listing the pools imports no model library."""
        cfg = self.config
        remote = cfg.pools.placement == "own_pools"

        def spec(name: str, worker: str, model: ModelSpec, **extra: Any) -> PoolSpec:
            res: Resources = getattr(cfg.pools, name)
            use_gpu = (res if remote else cfg.resources).num_gpus > 0
            factory = partial(
                build_worker, f"{WORKERS_MODULE}:{worker}", model, self.env.data_root, use_gpu,
                cfg.amp_dtype, res.batch_size, **extra,
            )  # fmt: skip
            return PoolSpec(name, factory, res, remote)

        specs = [
            spec("vae_latents", "VaeWorker", cfg.vae),
            spec(
                "hubert", "HubertWorker", cfg.hubert, layer=cfg.hubert_layer,
                window_s=cfg.hubert_window_s, context_s=cfg.hubert_context_s,
            ),
        ]  # fmt: skip
        if cfg.motion is not None:
            specs.append(spec("liveportrait_motion", "MotionWorker", cfg.motion))
        if cfg.flame is not None:
            specs.append(spec("emoca_flame", "FlameWorker", cfg.flame))
        if cfg.reference is not None:
            specs.append(spec("reference", "ReferenceWorker", cfg.reference))
        if cfg.sensevoice is not None:
            specs.append(spec("sensevoice", "SenseVoiceWorker", cfg.sensevoice))
        if cfg.whisper is not None:
            specs.append(spec("whisper", "WhisperWorker", cfg.whisper))
        return specs

    def setup(self) -> None:
        """Build the in-process pools (the executor attached the remote ones), fingerprint
        the models and load the per-clip work: the stage's first import of torch."""
        from tasks.features_extract import ClipExtractor

        root = Path(self.env.data_root)
        self.pools = complete_pools(self.pool_specs(), self.pools)
        prints = {
            s.family: self.env.model_fingerprints.get(s.family) or fingerprint(s, root)
            for s in self.model_specs()
        }
        self.extractor = ClipExtractor(self.config, self.pools, prints)

    def process(self, inputs: ItemInputs, ctx: ItemContext) -> ClipFeatures:
        if self.extractor is None:
            self.setup()
        assert self.extractor is not None
        return self.extractor.extract(inputs, ctx)
