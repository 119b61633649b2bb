"""Generate stage: every held-out clip, by every committed checkpoint, in both settings.

Per held-out clip (``tasks.split``) and per model — **every checkpoint the train stage ever
committed**, of every family (``history_of = ("train",)``: the planner passes the whole
history), plus official ``baselines`` (e.g. MuseTalk 1.5's released UNet through its
family's ``load_official``) — the stage writes one video per setting:

- ``self``: the clip re-synthesised from its own audio (what PSNR/SSIM/LPIPS/FVD need);
- ``cross``: the clip's visual conditioning driven by **another held-out clip's audio**
  (its ``partner``: the held-out clip ``B ≠ A`` with the lowest ``sha256(seed:A|B)``, so the
  pairing is deterministic, recorded in every video's ``audio_clip_id`` and changes only if a
  new clip hashes lower). Exactly the audio features (``tasks.features_config.AUDIO_FEATURES`` and
  their ``extra_tensors``) come from the partner; every per-frame feature is cut to the
  shorter clip.

Family-agnostic: the family rebuilds its network from the checkpoint's spec, prepares the clip
(``prepare_clip``) and predicts VAE latents for consecutive frame ranges in order
(``sample``; DualForce carries a cache between calls). What a model reads follows its spec
(``features_for`` / ``extra_tensors_for`` / ``uses_memory_bank_for``): the official MuseTalk 1.5
baseline reads Whisper and the ``vae_latents`` file's ``masked_latents``, and no memory bank.
Latents are decoded by **the VAE that produced the clip's latents** (the ``vae_latents``
file's recorded model) and streamed into an mp4 with **the wav the audio features were
computed from** (``ClipFeatures.audio``, the partner's in ``cross``) muxed in.

**Caching per video.** The item key covers all checkpoints, so a new checkpoint re-plans
every clip; each video is therefore committed under its own key — a hash of the code
version, the generate config, the weights hash, the setting and the hashes of every input
file — and a video already in the store is reused (``ItemContext.record_existing``), not
regenerated. A checkpoint that cannot generate a clip (unloadable, features it lacks) is a
note on the record; the clip fails (typed) only when no video at all could be made.

**Planning imports no torch.** This module holds the stage's contract and planning (which
clips, which partners, which models); the per-video work and the loaded models, VAEs and
banks (one load per worker) are :class:`tasks.generate_work.GenerateWorker`, which
``setup`` builds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from models.registry import fingerprint
from tasks.base import (
    FailureKind,
    ItemContext,
    ItemFailure,
    ItemInputs,
    Record,
    Stage,
    StageConfig,
)
from tasks.generate_config import BaselineWeights, GenerateConfig
from tasks.records import (
    ClipFeatures,
    CommittedHistory,
    FaceTrack,
    GeneratedClip,
    GeneratedVideo,
    NormalizedClip,
    TrainedCheckpoint,
)
from tasks.split import heldout_score, is_heldout

if TYPE_CHECKING:
    from tasks.generate_work import GenerateWorker

PARTNER = "features@partner"


class Generator(BaseModel):
    """One model to generate with: a committed checkpoint or baseline weights."""

    model_config = ConfigDict(frozen=True)

    family: str
    label: str
    sha256: str
    origin: str  # trained / pretrained / random-init
    checkpoint: TrainedCheckpoint | None = None
    baseline: BaselineWeights | None = None


def checkpoint_label(ckpt: TrainedCheckpoint) -> str:
    return f"{ckpt.training_stage}-step{ckpt.steps}-{ckpt.checkpoint.sha256[:12]}"


def cross_partners(item_ids: list[str], seed: int) -> dict[str, str]:
    """Each clip's audio partner: the other clip with the lowest ``sha256(seed:A|B)``."""
    return {
        a: min((b for b in item_ids if b != a), key=lambda b: heldout_score(f"{a}|{b}", seed))
        for a in item_ids
        if len(item_ids) > 1
    }


class GenerateStage(Stage[GenerateConfig]):
    """Held-out clips only: one mp4 per model and setting (face crops + driving audio)."""

    name: ClassVar[str] = "generate"
    code_version: ClassVar[str] = "3"  # 3: every checkpoint, self + cross settings
    requires: ClassVar[tuple[str, ...]] = ("download", "faces", "features", "engram", "train")
    config_type: ClassVar[type[StageConfig]] = GenerateConfig
    uses_split: ClassVar[bool] = True
    history_of: ClassVar[tuple[str, ...]] = ("train",)
    partner_inputs: ClassVar[tuple[str, ...]] = ("features",)

    def __init__(self, config: GenerateConfig, env: Any):
        super().__init__(config, env)
        self.worker: GenerateWorker | None = None  # built by setup()

    def accepts(self, item_id: str, shared: dict[str, Record]) -> bool:
        return is_heldout(item_id, self.env)

    def partners(self, item_ids: list[str]) -> dict[str, str]:
        if "cross" not in self.config.settings:
            return {}
        return cross_partners(item_ids, self.env.split_seed)

    def model_specs(self) -> list[Any]:
        return [b.weights for b in self.config.baselines]

    def setup(self) -> None:
        from tasks.generate_work import GenerateWorker  # torch, the families, the VAE

        root = Path(self.env.data_root)
        self.worker = GenerateWorker(self.config, root, self.name, self.code_version)

    def teardown(self) -> None:
        self.worker = None

    # ------------------------------------------------------------------ which models

    def generators(self, inputs: ItemInputs) -> list[Generator]:
        """The committed checkpoints (deduplicated by weights, oldest first) and baselines."""
        if self.config.checkpoints == "current":
            ckpts = [inputs.get("train", TrainedCheckpoint)]
        else:
            history = inputs.get("train@history", CommittedHistory)
            ckpts = [r for r in history.records() if isinstance(r, TrainedCheckpoint)]
        out: dict[str, Generator] = {}
        for c in ckpts:
            out.setdefault(
                c.checkpoint.sha256,
                Generator(family=c.family, label=checkpoint_label(c), sha256=c.checkpoint.sha256,
                          origin="trained", checkpoint=c),
            )  # fmt: skip
        root = Path(self.env.data_root)
        for b in self.config.baselines:
            fp = fingerprint(b.weights, root)
            out.setdefault(
                fp.sha256,
                Generator(family=b.family, label=b.name, sha256=fp.sha256, origin=fp.origin,
                          baseline=b),
            )  # fmt: skip
        return list(out.values())

    # ------------------------------------------------------------------ process

    def process(self, inputs: ItemInputs, ctx: ItemContext) -> GeneratedClip:
        if self.worker is None:
            self.setup()
        assert self.worker is not None
        clip = inputs.get("download", NormalizedClip)
        face = inputs.get("faces", FaceTrack)
        feats = inputs.get("features", ClipFeatures)
        partner = inputs.records.get(PARTNER)
        fps = float(face.fps or clip.fps)
        videos: list[GeneratedVideo] = []
        notes: list[str] = []
        failures: list[ItemFailure] = []
        for gen in self.generators(inputs):
            for setting in self.config.settings:
                driver = feats if setting == "self" else partner
                if not isinstance(driver, ClipFeatures):
                    notes.append(f"{gen.label}/cross: no other held-out clip for its audio")
                    continue
                try:
                    video = self.worker.video(inputs, ctx, gen, setting, feats, driver, fps)
                except ItemFailure as exc:
                    failures.append(exc)
                    notes.append(f"{gen.label}/{setting}: {exc.kind}: {exc.message}")
                    continue
                videos.append(video)
        if not videos:
            if failures:
                raise failures[0]
            raise ItemFailure(FailureKind.MODEL, f"{feats.clip_id}: nothing generated: {notes}")
        return GeneratedClip(clip_id=feats.clip_id, fps=fps, videos=videos, notes=notes)
