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
Loaded models, VAEs and banks are cached on the stage instance: one load per worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from generators import registry
from generators.blocks.engram_hash import read_bank
from generators.family import DataLayout, ModelFamily
from generators.io import read_tensor
from models.registry import ModelUnavailableError, ensure_model, fingerprint
from models.vae import decode_latents, latent_stride, load_vae
from tasks.base import (
    FailureKind,
    ItemContext,
    ItemFailure,
    ItemInputs,
    Record,
    Stage,
    StageConfig,
    stable_hash,
)
from tasks.features_config import AUDIO_FEATURES
from tasks.generate_config import BaselineWeights, GenerateConfig
from tasks.media import VideoWriter
from tasks.records import (
    ClipFeatures,
    CommittedHistory,
    FaceTrack,
    GeneratedClip,
    GeneratedVideo,
    MemoryBank,
    NormalizedClip,
    TrainedCheckpoint,
)
from tasks.split import heldout_score, is_heldout

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
        self.device = torch.device("cpu")
        self._models: dict[str, tuple[ModelFamily, Any, torch.nn.Module]] = {}
        self._vaes: dict[str, Any] = {}
        self._banks: dict[str, dict[str, torch.Tensor]] = {}

    def accepts(self, item_id: str, shared: dict[str, Record]) -> bool:
        return is_heldout(item_id, self.env)

    def partners(self, item_ids: list[str]) -> dict[str, str]:
        if "cross" not in self.config.settings:
            return {}
        return cross_partners(item_ids, self.env.split_seed)

    def model_specs(self) -> list[Any]:
        return [b.weights for b in self.config.baselines]

    def setup(self) -> None:
        want_gpu = self.config.resources.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if want_gpu else "cpu")

    def teardown(self) -> None:
        self._models.clear()
        self._vaes.clear()
        self._banks.clear()

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

    def _model(
        self, gen: Generator, layout: DataLayout, ctx: ItemContext
    ) -> tuple[ModelFamily, Any, torch.nn.Module]:
        key = f"{gen.sha256}:{layout.model_dump_json()}" if gen.baseline else gen.sha256
        if key not in self._models:
            try:
                family = registry.get(gen.family)()
                if gen.checkpoint is not None:
                    spec = family.parse_spec(gen.checkpoint.model_config_json)
                    model = family.load_model(ctx.local_path(gen.checkpoint.checkpoint), spec)
                else:
                    assert gen.baseline is not None
                    path = ensure_model(gen.baseline.weights, Path(self.env.data_root))
                    spec, model = family.load_official(path, layout)  # type: ignore[attr-defined]
            except Exception as exc:  # unknown family, bad spec JSON, bad weights, no loader
                raise ItemFailure(
                    FailureKind.MODEL, f"cannot load the {gen.family} model {gen.label}: {exc}"
                ) from exc
            self._models[key] = (family, spec, model.to(self.device).eval())
        return self._models[key]

    def _vae(self, feats: ClipFeatures) -> Any:
        model = feats.file("vae_latents").model
        where = model.resolved_path or model.source
        key = f"{where}@{model.sha256}"
        if key not in self._vaes:
            try:
                self._vaes[key] = load_vae(where, device=self.device)  # fp32: Flux VAE upcasts
            except ModelUnavailableError as exc:
                raise ItemFailure(FailureKind.MODEL, f"generate: {exc}") from exc
        return self._vaes[key]

    def _bank(self, bank: MemoryBank, ctx: ItemContext) -> dict[str, torch.Tensor]:
        key = bank.bank.sha256
        if key not in self._banks:
            try:
                self._banks[key] = read_bank(ctx.local_path(bank.bank))
            except (ValueError, OSError) as exc:
                raise ItemFailure(FailureKind.MODEL, f"generate: bad memory bank: {exc}") from exc
        return self._banks[key]

    # ------------------------------------------------------------------ process

    def process(self, inputs: ItemInputs, ctx: ItemContext) -> GeneratedClip:
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
                    video = self._video(inputs, ctx, gen, setting, feats, driver, fps)
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

    def _tensors(
        self, family: ModelFamily, spec: Any, feats: ClipFeatures, driver: ClipFeatures,
        ctx: ItemContext,
    ) -> tuple[dict[str, torch.Tensor], list[str]]:  # fmt: skip
        """The family's inputs (audio ones from ``driver``), per-frame ones cut to one length,
        and the sha256 of every file read."""
        wanted = family.features_for(spec)
        extra = family.extra_tensors_for(spec)
        tensors: dict[str, torch.Tensor] = {}
        hashes: list[str] = []
        try:
            for f, name in sorted(wanted.items()):
                source = driver if f in AUDIO_FEATURES else feats
                ff = source.file(f)
                path = ctx.local_path(ff.artifact)
                hashes.append(ff.artifact.sha256)
                tensors[f] = read_tensor(path, name)
                for t in extra.get(f, ()):
                    tensors[f"{f}/{t}"] = read_tensor(path, t)
        except KeyError as exc:
            raise ItemFailure(FailureKind.FORMAT, f"generate: {exc.args[0]}") from exc
        except Exception as exc:  # safetensors raises several types for bad files
            raise ItemFailure(FailureKind.FORMAT, f"generate: unreadable features: {exc}") from exc
        per_frame = [f for f in wanted if f not in family.clip_features | family.row_features]
        lengths = {f: int(tensors[f].shape[0]) if tensors[f].ndim else 0 for f in per_frame}
        own = {n for f, n in lengths.items() if f not in AUDIO_FEATURES}
        heard = {n for f, n in lengths.items() if f in AUDIO_FEATURES}
        if 0 in lengths.values() or len(own) > 1 or len(heard) > 1:
            raise ItemFailure(FailureKind.MISALIGNED, f"{feats.clip_id}: frames {lengths}")
        if driver is feats and own != heard and own and heard:
            raise ItemFailure(FailureKind.MISALIGNED, f"{feats.clip_id}: frames {lengths}")
        n = min(lengths.values(), default=0)
        for f in per_frame:
            full = tensors[f].shape[0]
            tensors[f] = tensors[f][:n]
            for t in extra.get(f, ()):
                key = f"{f}/{t}"
                if tensors[key].ndim and tensors[key].shape[0] == full:
                    tensors[key] = tensors[key][:n]
        return tensors, hashes

    def _video(
        self,
        inputs: ItemInputs,
        ctx: ItemContext,
        gen: Generator,
        setting: Literal["self", "cross"],
        feats: ClipFeatures,
        driver: ClipFeatures,
        fps: float,
    ) -> GeneratedVideo:
        cfg = self.config
        try:
            family_cls = registry.get(gen.family)
        except KeyError as exc:
            raise ItemFailure(FailureKind.MODEL, f"{gen.label}: {exc.args[0]}") from exc
        if gen.checkpoint is not None and not ctx.store.exists(gen.checkpoint.checkpoint.uri):
            raise ItemFailure(FailureKind.MODEL, f"checkpoint file of {gen.label} is gone")
        layout = DataLayout(
            shapes={
                f.family: list(f.shape if f.family in family_cls.clip_features else f.shape[1:])
                for f in feats.files
            }
        )
        family, spec, model = self._model(gen, layout, ctx)
        # per spec: an official baseline may read no bank where the family's checkpoints do
        use_bank = family.uses_memory_bank_for(spec)
        bank_rec = inputs.get("engram", MemoryBank) if use_bank else None
        tensors, hashes = self._tensors(family, spec, feats, driver, ctx)
        num_frames = next(
            int(t.shape[0]) for f, t in tensors.items()
            if "/" not in f and f not in family.clip_features | family.row_features
        )  # fmt: skip
        params = cfg.model_dump(mode="json", include={"batch_size", "crf", "reference_frame"})
        video_key = stable_hash(
            {"code": self.code_version, "params": params, "weights": gen.sha256,
             "setting": setting, "inputs": hashes, "audio": driver.audio.sha256,
             "bank": bank_rec.bank.sha256 if bank_rec else ""}
        )  # fmt: skip
        name = f"{setting}-{gen.sha256[:16]}.mp4"
        audio = driver.audio
        ref = ctx.store.describe(self.name, feats.clip_id, video_key, name, "video")
        if ref is not None:
            ctx.record_existing(ref)
        else:
            bank = self._bank(bank_rec, ctx) if bank_rec is not None else None
            try:
                prepared = family.prepare_clip(spec, tensors, bank, cfg.reference_frame)
            except ValueError as exc:
                raise ItemFailure(FailureKind.MODEL, f"{feats.clip_id}: {exc}") from exc
            out = ctx.scratch / name
            self._render(
                family, model, prepared, num_frames, feats, ctx.local_path(audio), out, fps
            )
            ref = ctx.commit(out, name, kind="video", owner=(feats.clip_id, video_key))
        return GeneratedVideo(
            family=gen.family,
            checkpoint=gen.label,
            checkpoint_sha256=gen.sha256,
            generator_origin=gen.origin,
            setting=setting,
            audio_clip_id=driver.clip_id,
            audio=audio,
            video=ref,
            num_frames=num_frames,
        )

    def _render(
        self,
        family: ModelFamily,
        model: torch.nn.Module,
        prepared: Any,
        num_frames: int,
        feats: ClipFeatures,
        wav: Path,
        out: Path,
        fps: float,
    ) -> None:
        """Sample consecutive frame ranges in order, decode, stream into ``out`` with ``wav``."""
        vae = self._vae(feats)
        stride = latent_stride(vae)
        batch = self.config.batch_size
        writer: VideoWriter | None = None
        try:
            with torch.inference_mode():
                for start in range(0, num_frames, batch):
                    idx = torch.arange(start, min(start + batch, num_frames))
                    pred = family.sample(model, prepared, idx)
                    frames = decode_latents(vae, pred.float().cpu(), batch_size=batch)
                    expected = (pred.shape[-2] * stride, pred.shape[-1] * stride)
                    if frames.shape[1:3] != expected:
                        raise ItemFailure(
                            FailureKind.MODEL,
                            f"generate: VAE decodes {frames.shape[1:3]}, expected {expected}",
                        )
                    if writer is None:
                        h, w = frames.shape[1:3]
                        writer = VideoWriter(out, w, h, fps, audio=wav, crf=self.config.crf)
                    writer.write(frames)
        except BaseException:
            if writer is not None:
                writer.abandon()
            raise
        if writer is not None:
            writer.close()
