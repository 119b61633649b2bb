"""Test helpers for the features and engram stages: real tiny media committed to a store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file
from skimage.data import astronaut
from skimage.transform import resize

from models.fingerprint import ModelFingerprint
from models.registry import fingerprint
from storage.store import ArtifactStore
from tasks.base import ItemContext, ItemInputs, Record, Resources, StageEnv
from tasks.features import FeaturesStage
from tasks.features_config import FeaturesConfig
from tasks.media import VideoWriter, write_wav
from tasks.records import (
    ClipFeatures,
    FaceTrack,
    FeatureFile,
    NormalizedClip,
    QualityVerdict,
    RuleResult,
)

SR = 16_000


def env_for(tmp_path: Path, **kw) -> StageEnv:
    return StageEnv(data_root=str(tmp_path), store_uri=str(tmp_path / "store"), run_id="t", **kw)


def face_frames(num_frames: int, size_px: int, seed: int = 0) -> np.ndarray:
    """``(T, size, size, 3)`` uint8 crops of the astronaut's face, jittered per frame."""
    face = astronaut()[20:220, 140:340]  # 200x200 around the face
    rng = np.random.default_rng(seed)
    out = np.empty((num_frames, size_px, size_px, 3), np.uint8)
    for i in range(num_frames):
        dy, dx = rng.integers(0, 16, size=2)
        crop = face[dy : dy + 184, dx : dx + 184]
        out[i] = (resize(crop, (size_px, size_px), anti_aliasing=True) * 255).astype(np.uint8)
    return out


def speechlike_wave(num_samples: int, seed: int = 0) -> np.ndarray:
    """Harmonic tones whose pitch and loudness change every 80 ms, plus a little noise."""
    rng = np.random.default_rng(seed)
    seg = 1280
    f0 = np.repeat(rng.uniform(90, 260, size=num_samples // seg + 1), seg)[:num_samples]
    amp = np.repeat(rng.uniform(0.05, 0.4, size=num_samples // seg + 1), seg)[:num_samples]
    phase = 2 * np.pi * np.cumsum(f0) / SR
    wave = sum(np.sin(h * phase) / h for h in (1, 2, 3, 5)) * amp
    return (wave + 0.01 * rng.standard_normal(num_samples)).astype(np.float32)


def commit_clip(
    tmp_path: Path,
    clip_id: str,
    num_frames: int = 16,
    size_px: int = 64,
    fps: float = 25.0,
    audio_samples: int | None = None,
    seed: int = 0,
) -> ItemInputs:
    """Commit download/faces/quality outputs for a synthetic clip; return the features inputs.

    Audio defaults to exactly ``num_frames / fps`` seconds at 16 kHz.
    """
    n_audio = audio_samples if audio_samples is not None else round(num_frames / fps * SR)
    work = tmp_path / f"work-{clip_id}"
    work.mkdir(parents=True, exist_ok=True)
    wav = work / "audio.wav"
    write_wav(wav, speechlike_wave(n_audio, seed), SR)
    crops = work / "crops.mp4"
    with VideoWriter(crops, size_px, size_px, fps) as w:
        w.write(face_frames(num_frames, size_px, seed))
    return commit_media(tmp_path, clip_id, crops, wav, num_frames, fps, size_px)


def face_track_columns(num_frames: int, size_px: int) -> dict[str, np.ndarray]:
    """``boxes.parquet`` columns of a centred face (see :func:`commit_media`)."""
    from tasks.faces_align import ARCFACE_TEMPLATE_112
    from tasks.quality_measures import LANDMARK_COLUMNS

    side, centre = 0.55 * size_px, size_px / 2
    points = ((ARCFACE_TEMPLATE_112 - 56.0) * side / 112 + centre).ravel()
    lm = np.tile(points, (num_frames, 1))
    lm[1::2] = np.nan  # landmarks only where the detector ran
    cols = {"frame": np.arange(num_frames)}
    for name, value in zip(("x1", "y1", "x2", "y2"), (-1, -1, 1, 1), strict=True):
        cols[name] = np.full(num_frames, centre + value * side / 2)
    cols.update({c: lm[:, i] for i, c in enumerate(LANDMARK_COLUMNS)})
    return cols


def commit_media(
    tmp_path: Path,
    clip_id: str,
    crops: Path,
    wav: Path,
    num_frames: int,
    fps: float,
    size_px: int,
) -> ItemInputs:
    """Commit an existing crops mp4 and 16 kHz wav as download/faces/quality outputs.

    The crops double as the clip's video; the face track places a face of 0.55 × the frame
    at its centre with the ArcFace template's 5 landmarks, detected on every other frame.
    """
    store = ArtifactStore(str(tmp_path / "store"))
    boxes = crops.with_name(f"{clip_id}-boxes.parquet")
    pq.write_table(pa.table(face_track_columns(num_frames, size_px)), boxes)
    dl = ItemContext(store, "download", clip_id, "d" * 40)
    clip = NormalizedClip(
        clip_id=clip_id,
        dataset="sample",
        source_id=clip_id,
        start_s=0.0,
        end_s=num_frames / fps,
        duration_s=num_frames / fps,
        fps=fps,
        num_frames=num_frames,
        width=size_px,
        height=size_px,
        audio_sample_rate_hz=SR,
        audio_channels=1,
        video=dl.commit(crops, "clip.mp4", "video"),
        audio=dl.commit(wav, "audio.wav", "audio"),
    )
    fc = ItemContext(store, "faces", clip_id, "f" * 40)
    face = FaceTrack(
        clip_id=clip_id,
        fps=fps,
        num_frames=num_frames,
        crop_size_px=size_px,
        crops=fc.commit(crops, "crops.mp4", "video"),
        boxes=fc.commit(boxes, "boxes.parquet", "table"),
        detector="synthetic",
        detected_frames=num_frames,
        tracked_frames=0,
        lost_frames=0,
        median_face_size_px=float(size_px),
        min_face_size_px=float(size_px),
        max_faces_in_frame=1,
        max_second_face_ratio=0.0,
    )
    verdict = QualityVerdict(
        clip_id=clip_id,
        accepted=True,
        rules=[RuleResult(rule="min_frames", value=num_frames, threshold=1, passed=True)],
    )
    dl.close()
    fc.close()
    return ItemInputs(
        item_id=clip_id, records={"download": clip, "faces": face, "quality": verdict}
    )


def synthetic_features(
    tmp_path: Path,
    clip_id: str,
    audio: np.ndarray,
    latents: np.ndarray,
    fps: float = 25.0,
) -> ClipFeatures:
    """Commit hand-made ``(T, 2, D)`` audio and ``(T, C, h, w)`` latents as features output."""
    store = ArtifactStore(str(tmp_path / "store"))
    ctx = ItemContext(store, "features", clip_id, "e" * 40)
    fp = ModelFingerprint(
        name="synthetic", source="test", resolved_path="", sha256="0" * 64, origin="random-init"
    )
    lat_path = ctx.scratch / "vae_latents.safetensors"
    save_file({"latents": torch.from_numpy(np.ascontiguousarray(latents)).half()}, str(lat_path))
    hub_path = ctx.scratch / "hubert.safetensors"
    save_file({"features": torch.from_numpy(np.ascontiguousarray(audio)).half()}, str(hub_path))
    files = [
        FeatureFile(
            family="vae_latents",
            artifact=ctx.commit(lat_path, "vae_latents.safetensors", "features"),
            shape=list(latents.shape),
            dtype="float16",
            frame_rate_hz=fps,
            model=fp,
        ),
        FeatureFile(
            family="hubert",
            artifact=ctx.commit(hub_path, "hubert.safetensors", "features"),
            shape=list(audio.shape),
            dtype="float16",
            frame_rate_hz=fps,
            model=fp,
        ),
    ]
    wav = ctx.scratch / "audio.wav"
    write_wav(wav, np.zeros(round(latents.shape[0] / fps * SR)), SR)
    audio_ref = ctx.commit(wav, "audio.wav", "audio")
    ctx.close()
    return ClipFeatures(
        clip_id=clip_id,
        fps=fps,
        num_frames=latents.shape[0],
        files=files,
        audio=audio_ref,
        audio_source="original",
    )


def make_features_stage(tmp_path: Path, **cfg) -> FeaturesStage:
    """A set-up features stage with tiny models under ``tmp_path`` and engine-style prints."""
    cfg.setdefault("resources", Resources(batch_size=6))
    config = FeaturesConfig(**cfg)
    probe = FeaturesStage(config, env_for(tmp_path))
    prints = {s.family: fingerprint(s, tmp_path) for s in probe.model_specs()}
    stage = FeaturesStage(config, env_for(tmp_path, model_fingerprints=prints))
    stage.setup()
    return stage


def run_item(
    stage: FeaturesStage, tmp_path: Path, inputs: ItemInputs
) -> tuple[Record, ItemContext]:
    """Process one item in-process as the engine would; returns the record and its context."""
    ctx = ItemContext(ArtifactStore(str(tmp_path / "store")), stage.name, inputs.item_id, "k" * 40)
    try:
        return stage.process(inputs, ctx), ctx
    finally:
        ctx.close()
