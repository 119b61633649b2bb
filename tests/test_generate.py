"""Generate stage: held-out clips → generated.mp4 (right frames, fps, audio), cached models."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from generators import registry
from generators.musetalk15.model import make_spec
from models.vae import decode_latents
from tasks.base import FailureKind, ItemContext, ItemFailure, ItemInputs
from tasks.evaluate import EvaluateConfig, EvaluateStage
from tasks.generate import GenerateConfig, GenerateStage
from tasks.media import VideoWriter, count_frames, iter_frames, probe, read_wav, write_wav
from tasks.records import ClipMetrics, GeneratedClip, TrainedCheckpoint
from tests.train_helpers import (
    AUDIO_DIM,
    build_bank,
    commit_clip,
    make_env,
    split_ids,
    tiny_vae,
)

T = 16
SIZE = 64  # 8×8 latents


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    env = make_env(tmp)
    vae, vae_fp = tiny_vae(tmp)
    train_ids, held_ids = split_ids(2, 2)
    train = [
        commit_clip(tmp, env, vae, vae_fp, c, T, SIZE, seed=i) for i, c in enumerate(train_ids)
    ]
    held = [
        commit_clip(tmp, env, vae, vae_fp, c, T, SIZE, seed=10 + i) for i, c in enumerate(held_ids)
    ]
    bank = build_bank(env, train)
    return {"tmp": tmp, "env": env, "vae": vae, "train": train, "held": held, "bank": bank}


def _checkpoint(world, name: str, zero_output: bool = False) -> TrainedCheckpoint:
    family = registry.get("musetalk15")()
    spec = make_spec(16, AUDIO_DIM, SIZE // 8, tiny=True)
    torch.manual_seed(0)
    unet = family.build(spec)
    if zero_output:
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
    path = world["tmp"] / f"{name}.safetensors"
    family.save_weights(path, unet, spec)
    ctx = ItemContext(world["env"].store(), "train", "train", name.ljust(40, "x"))
    return TrainedCheckpoint(
        family="musetalk15",
        checkpoint=ctx.commit(path, "model.safetensors", "checkpoint"),
        model_config_json=spec.to_json(),
        steps=0,
        num_processes=1,
        train_clips=[c.clip_id for c in world["train"]],
        resumed_from_step=0,
        history=[],
    )


def _inputs(world, clip, ckpt) -> ItemInputs:
    return ItemInputs(
        item_id=clip.clip_id,
        records=dict(clip.inputs.records),
        shared={"engram": world["bank"], "train": ckpt},
    )


def _generate(stage, world, clip, ckpt) -> GeneratedClip:
    ctx = ItemContext(world["env"].store(), "generate", clip.clip_id, "g" * 40)
    try:
        return stage.process(_inputs(world, clip, ckpt), ctx)
    finally:
        ctx.close()


def test_generate_writes_mp4_with_frames_fps_and_audio_and_caches_models(world):
    ckpt = _checkpoint(world, "rand")
    stage = GenerateStage(GenerateConfig(batch_size=8), world["env"])
    stage.setup()
    assert all(stage.accepts(c.clip_id, {}) for c in world["held"])
    assert not any(stage.accepts(c.clip_id, {}) for c in world["train"])

    recs = [_generate(stage, world, clip, ckpt) for clip in world["held"]]
    for clip, rec in zip(world["held"], recs, strict=True):
        assert isinstance(rec, GeneratedClip)
        path = world["env"].store().local_path(rec.video.uri, world["tmp"])
        info = probe(path)
        assert (rec.num_frames, rec.fps, rec.crop_size_px) == (T, 25.0, SIZE)
        assert count_frames(path) == T
        assert info.fps == pytest.approx(25.0)
        assert (info.width, info.height) == (SIZE, SIZE)
        assert info.has_audio and info.audio_sample_rate_hz is not None
        assert rec.clip_id == clip.clip_id
    # one model, one VAE, one bank loaded for both clips
    assert len(stage._models) == len(stage._vaes) == len(stage._banks) == 1

    # generate → evaluate end to end on the first clip
    clip, rec = world["held"][0], recs[0]
    ev = EvaluateStage(EvaluateConfig(metrics=["psnr_db", "ssim"]), world["env"])
    ctx = ItemContext(world["env"].store(), "evaluate", clip.clip_id, "e" * 40)
    metrics = ev.process(
        ItemInputs(
            item_id=clip.clip_id,
            records={
                "faces": clip.inputs.records["faces"],
                "features": clip.inputs.records["features"],
                "generate": rec,
            },
            shared={"train": ckpt},
        ),
        ctx,
    )
    assert isinstance(metrics, ClipMetrics) and metrics.num_frames == T
    assert np.isfinite(metrics.psnr_db) and 0.0 < metrics.psnr_db < 60.0
    assert -1.0 <= metrics.ssim <= 1.0


def test_generated_frames_are_the_vae_decode_of_the_prediction(world):
    """A UNet whose output layer is zero predicts zero latents: every frame is decode(0)."""
    stage = GenerateStage(GenerateConfig(batch_size=8), world["env"])
    stage.setup()
    clip = world["held"][0]
    rec = _generate(stage, world, clip, _checkpoint(world, "zero", zero_output=True))
    path = world["env"].store().local_path(rec.video.uri, world["tmp"])
    frames = np.concatenate(list(iter_frames(path, SIZE, SIZE)))
    expected = decode_latents(world["vae"], torch.zeros(1, 16, SIZE // 8, SIZE // 8))
    # the same frames through the same encoder settings, without the model in between
    ref_path = world["tmp"] / "decode-of-zero.mp4"
    with VideoWriter(ref_path, SIZE, SIZE, 25.0) as vw:
        vw.write(np.repeat(expected, T, axis=0))
    ref = np.concatenate(list(iter_frames(ref_path, SIZE, SIZE)))
    assert frames.shape == ref.shape == (T, SIZE, SIZE, 3)
    assert np.abs(frames.astype(np.int16) - ref.astype(np.int16)).mean() < 1.0
    # and it is not just any image: a real face crop is far from it
    face = clip.frames.astype(np.int16)
    assert np.abs(frames.astype(np.int16) - face).mean() > 10.0


def test_features_that_do_not_fit_the_checkpoint_fail_typed(world, tmp_path):
    vae, vae_fp = tiny_vae(world["tmp"])
    _, held = split_ids(0, 3)
    big = commit_clip(world["tmp"], world["env"], vae, vae_fp, held[2], 12, 2 * SIZE, seed=5)
    stage = GenerateStage(GenerateConfig(), world["env"])
    stage.setup()
    with pytest.raises(ItemFailure) as exc:
        _generate(stage, world, big, _checkpoint(world, "rand"))
    assert exc.value.kind == FailureKind.MODEL
    assert "do not fit" in exc.value.message


def _decoded_audio(path) -> np.ndarray:
    out = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1", "-ar", "16000", "-"],
        capture_output=True,
        check=True,
    ).stdout
    return np.frombuffer(out, "<i2").astype(np.float64) / 32767.0


def _best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 800) -> float:
    """Largest normalised correlation of ``a`` and ``b`` over lags within ±``max_lag``."""
    best = 0.0
    for lag in range(-max_lag, max_lag + 1, 4):
        x, y = (a[lag:], b) if lag >= 0 else (a, b[-lag:])
        n = min(len(x), len(y))
        x, y = x[:n] - x[:n].mean(), y[:n] - y[:n].mean()
        best = max(best, float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12)))
    return best


def test_generated_video_carries_the_audio_its_features_were_computed_from(world, tmp_path):
    """The quality stage re-aligned this clip (audio delayed by 200 ms): the features record
    names the re-aligned wav, and generate must mux that one, not the clip's original."""
    clip = world["held"][0]
    store = world["env"].store()
    original_ref = clip.inputs.records["download"].audio
    original, rate = read_wav(store.local_path(original_ref.uri, tmp_path))
    shift = rate // 5
    aligned = np.concatenate([np.zeros(shift), original[:-shift]])
    wav = tmp_path / "audio_aligned.wav"
    write_wav(wav, aligned, rate)
    qctx = ItemContext(store, "quality", clip.clip_id, "q" * 40)
    aligned_ref = qctx.commit(wav, "audio_aligned.wav", "audio")
    feats = clip.inputs.records["features"].model_copy(
        update={"audio": aligned_ref, "audio_source": "aligned"}
    )
    records = {**clip.inputs.records, "features": feats}
    stage = GenerateStage(GenerateConfig(batch_size=8), world["env"])
    stage.setup()
    ctx = ItemContext(store, "generate", clip.clip_id, "h" * 40)
    inputs = ItemInputs(
        item_id=clip.clip_id,
        records=records,
        shared={"engram": world["bank"], "train": _checkpoint(world, "rand")},
    )
    rec = stage.process(inputs, ctx)
    muxed = _decoded_audio(store.local_path(rec.video.uri, tmp_path))
    assert _best_correlation(muxed, aligned) > 0.8
    assert _best_correlation(muxed, original) < 0.3


def test_checkpoint_of_an_unregistered_family_fails_typed(world):
    ckpt = _checkpoint(world, "rand").model_copy(update={"family": "nope"})
    stage = GenerateStage(GenerateConfig(), world["env"])
    stage.setup()
    with pytest.raises(ItemFailure) as exc:
        _generate(stage, world, world["held"][0], ckpt)
    assert exc.value.kind == FailureKind.MODEL
    assert "unknown model family 'nope'" in exc.value.message
