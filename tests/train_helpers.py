"""Test helpers for train / generate / evaluate: small real clips, features and a bank.

Everything goes through the real code paths: a tiny random FLUX.1-layout VAE built by the
registry and loaded with ``AutoencoderKL.from_pretrained``, latents from ``encode_frames``
of real face crops (skimage's astronaut), the real engram stage for the bank, and the store
for every artifact. HuBERT features are random (no model is needed to shape-test them).
Heavy imports (diffusers, scikit-learn) are local to the helpers that need them, so the
evaluate tests stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file
from skimage.data import astronaut
from skimage.transform import resize

from models.fingerprint import ModelFingerprint
from storage.store import ArtifactStore
from tasks.base import AggregateInputs, ItemContext, ItemInputs, StageEnv
from tasks.media import VideoWriter, write_wav
from tasks.records import ClipFeatures, FaceTrack, FeatureFile, MemoryBank, NormalizedClip
from tasks.split import heldout_score

SR = 16_000
AUDIO_DIM = 32
HOLDOUT = 0.5


def make_env(tmp_path: Path) -> StageEnv:
    return StageEnv(
        data_root=str(tmp_path),
        store_uri=str(tmp_path / "store"),
        run_id="t",
        holdout_fraction=HOLDOUT,
        split_seed=0,
    )


def split_ids(n_train: int, n_heldout: int, prefix: str = "clip") -> tuple[list[str], list[str]]:
    """Clip ids that the real split puts on each side at ``HOLDOUT`` with seed 0."""
    train, held = [], []
    i = 0
    while len(train) < n_train or len(held) < n_heldout:
        cid = f"{prefix}{i:03d}"
        side = held if heldout_score(cid, 0) < HOLDOUT else train
        if len(side) < (n_heldout if side is held else n_train):
            side.append(cid)
        i += 1
    return train, held


def face_frames(num_frames: int, size_px: int, seed: int = 0) -> np.ndarray:
    """``(T, size, size, 3)`` uint8 crops of a real face, jittered per frame."""
    face = astronaut()[20:220, 140:340]
    rng = np.random.default_rng(seed)
    out = np.empty((num_frames, size_px, size_px, 3), np.uint8)
    for i in range(num_frames):
        dy, dx = rng.integers(0, 16, size=2)
        crop = face[dy : dy + 184, dx : dx + 184]
        out[i] = (resize(crop, (size_px, size_px), anti_aliasing=True) * 255).astype(np.uint8)
    return out


def tiny_vae(tmp_path: Path):
    """Build (once) and load the tiny random FLUX.1 VAE; returns (vae, fingerprint)."""
    from models.registry import ModelSpec, ensure_model, fingerprint
    from models.vae import load_vae

    spec = ModelSpec(family="vae-flux1", source="models/vae-tiny", tiny_random=True)
    path = ensure_model(spec, tmp_path)
    return load_vae(path), fingerprint(spec, tmp_path)


def hubert_fingerprint() -> ModelFingerprint:
    """HuBERT features here are random numbers; say so in their fingerprint."""
    return ModelFingerprint(
        name="hubert", source="random", resolved_path="", sha256="0" * 64, origin="random-init"
    )


@dataclass
class ClipFixture:
    clip_id: str
    frames: np.ndarray  # what the crops video was written from
    inputs: ItemInputs  # download / faces / features records


def commit_clip(
    tmp_path: Path,
    env: StageEnv,
    vae,
    vae_fp,
    clip_id: str,
    num_frames: int,
    size_px: int,
    fps: float = 25.0,
    seed: int = 0,
) -> ClipFixture:
    """Commit download, faces and features outputs for one synthetic-but-real clip."""
    store = ArtifactStore(env.store_uri)
    work = tmp_path / f"src-{clip_id}"
    work.mkdir(parents=True, exist_ok=True)
    frames = face_frames(num_frames, size_px, seed)
    rng = np.random.default_rng(seed)
    wav = work / "audio.wav"
    write_wav(wav, 0.2 * rng.standard_normal(round(num_frames / fps * SR)), SR)
    crops = work / "crops.mp4"
    with VideoWriter(crops, size_px, size_px, fps) as w:
        w.write(frames)
    video = work / "clip.mp4"
    with VideoWriter(video, size_px, size_px, fps, audio=wav) as w:
        w.write(frames)
    boxes = work / "boxes.parquet"
    # the crops are the whole frame: identity source -> crop affine, face box in the middle
    n, s = num_frames, float(size_px)
    cols = {"frame": np.arange(n), "x1": [0.2 * s] * n, "y1": [0.15 * s] * n,
            "x2": [0.8 * s] * n, "y2": [0.75 * s] * n, "m00": [1.0] * n, "m01": [0.0] * n,
            "m02": [0.0] * n, "m10": [0.0] * n, "m11": [1.0] * n, "m12": [0.0] * n}  # fmt: skip
    pq.write_table(pa.table(cols), boxes)

    key = "k" * 40
    dctx = ItemContext(store, "download", clip_id, key)
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
        video=dctx.commit(video, "clip.mp4", "video"),
        audio=dctx.commit(wav, "audio.wav", "audio"),
    )
    fctx = ItemContext(store, "faces", clip_id, key)
    face = FaceTrack(
        clip_id=clip_id,
        fps=fps,
        num_frames=num_frames,
        crop_size_px=size_px,
        crops=fctx.commit(crops, "crops.mp4", "video"),
        boxes=fctx.commit(boxes, "boxes.parquet", "table"),
        detector="synthetic",
        detected_frames=num_frames,
        tracked_frames=0,
        lost_frames=0,
        median_face_size_px=float(size_px),
        min_face_size_px=float(size_px),
        max_faces_in_frame=1,
        max_second_face_ratio=0.0,
    )
    from models.vae import encode_frames

    latents = encode_frames(vae, frames, batch_size=16).to(torch.float16)
    hubert = torch.from_numpy(rng.standard_normal((num_frames, 2, AUDIO_DIM)).astype(np.float16))
    lat_path, hub_path = work / "vae_latents.safetensors", work / "hubert.safetensors"
    save_file({"latents": latents.contiguous()}, str(lat_path))
    save_file({"features": hubert.contiguous()}, str(hub_path))
    xctx = ItemContext(store, "features", clip_id, key)
    feats = ClipFeatures(
        clip_id=clip_id,
        fps=fps,
        num_frames=num_frames,
        files=[
            FeatureFile(
                family="vae_latents",
                artifact=xctx.commit(lat_path, "vae_latents.safetensors", "features"),
                shape=list(latents.shape),
                dtype="float16",
                frame_rate_hz=fps,
                model=vae_fp,
            ),
            FeatureFile(
                family="hubert",
                artifact=xctx.commit(hub_path, "hubert.safetensors", "features"),
                shape=list(hubert.shape),
                dtype="float16",
                frame_rate_hz=fps,
                model=hubert_fingerprint(),
            ),
        ],
        audio=clip.audio,
        audio_source="original",
    )
    inputs = ItemInputs(
        item_id=clip_id, records={"download": clip, "faces": face, "features": feats}
    )
    return ClipFixture(clip_id, frames, inputs)


def build_bank(env: StageEnv, clips: list[ClipFixture]) -> MemoryBank:
    """Run the real engram stage on the training clips (small tables)."""
    from tasks.engram import EngramStage
    from tasks.engram_config import EngramConfig

    stage = EngramStage(
        EngramConfig(codebook_size=4, num_heads=2, table_size=31, kmeans_iters=20), env
    )
    stage.setup()
    ctx = ItemContext(env.store(), "engram", "engram", "e" * 40)
    items = [c.inputs for c in clips if stage.accepts(c.clip_id, {})]
    try:
        return stage.process(AggregateInputs(item_id="engram", items=items), ctx)
    finally:
        ctx.close()


def train_inputs(clips: list[ClipFixture], bank: MemoryBank) -> AggregateInputs:
    items = [
        ItemInputs(item_id=c.clip_id, records={"features": c.inputs.records["features"]})
        for c in clips
    ]
    return AggregateInputs(item_id="train", items=items, shared={"engram": bank})
