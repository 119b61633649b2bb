"""Features stage end to end on a tiny real mp4 + wav, with tiny random VAE and HuBERT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from models.hubert import align_audio_steps
from models.vae import decode_latents
from storage.store import ArtifactStore
from tasks.base import FailureKind, ItemFailure
from tests.features_helpers import commit_clip, commit_media, make_features_stage, run_item


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """One set-up stage (tiny models built once); each test commits into its own store."""
    return make_features_stage(tmp_path_factory.mktemp("features-models"))


def read(path: str, name: str) -> tuple[torch.Tensor, dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(name), f.metadata()


def test_features_stage_writes_aligned_latents_and_hubert(stage, tmp_path):
    inputs = commit_clip(tmp_path, "clip-a", num_frames=16, size_px=64)
    rec, ctx = run_item(stage, tmp_path, inputs)
    assert rec.num_frames == 16 and rec.fps == 25.0
    assert (rec.audio, rec.audio_source) == (inputs.records["download"].audio, "original")
    assert {a.name for a in ctx.artifacts} == {
        "vae_latents.safetensors",
        "hubert.safetensors",
        "liveportrait_motion.safetensors",
        "emoca_flame.safetensors",
        "reference.safetensors",
        "sensevoice.safetensors",
    }

    lat_file = rec.file("vae_latents")
    lat, meta = read(ArtifactStore(str(tmp_path / "store"))._path(lat_file.artifact.uri), "latents")
    assert lat.shape == (16, 16, 8, 8) and lat.dtype == torch.float16
    assert lat_file.shape == [16, 16, 8, 8] and lat_file.dtype == "float16"
    assert lat_file.model == stage.env.model_fingerprints["vae-flux1"]
    assert lat_file.model.origin == "random-init"
    assert meta["model_sha256"] == lat_file.model.sha256 and float(meta["fps"]) == 25.0
    assert torch.isfinite(lat.float()).all() and lat.float().std() > 0

    hub_file = rec.file("hubert")
    feats, hmeta = read(
        ArtifactStore(str(tmp_path / "store"))._path(hub_file.artifact.uri), "features"
    )
    assert feats.shape == (16, 2, 32) and hub_file.shape == [16, 2, 32]
    assert hmeta["model_sha256"] == stage.env.model_fingerprints["hubert"].sha256
    # 16 frames = 10240 samples -> 31 steps: the 32nd (frame 15, step 1) repeats step 30
    assert torch.equal(feats[15, 1], feats[15, 0])
    assert not torch.equal(feats[14, 1], feats[14, 0])

    # latents decode back to frames of the crop size (the generate stage's path)
    frames = decode_latents(stage.pools["vae_latents"].worker.vae, lat.float())
    assert frames.shape == (16, 64, 64, 3) and frames.dtype == np.uint8

    rows = rec.stats_rows()["features"]
    assert {r["family"] for r in rows} == {
        "vae_latents",
        "hubert",
        "liveportrait_motion",
        "emoca_flame",
        "reference",
        "sensevoice",
    }


def test_motion_and_flame_come_from_their_official_crops_of_the_clip(stage, tmp_path):
    """Stored motion / FLAME rows equal direct model calls on the clip's frames cut with each
    extractor's framing of the face track (chunked decoding keeps frames and affines in step)."""
    from models.emoca import extract_flame
    from models.liveportrait import extract_motion
    from tasks.features_framing import cut_crops, framing_affines
    from tasks.media import iter_frames
    from tasks.quality_measures import landmarks, read_boxes

    inputs = commit_clip(tmp_path, "clip-m", num_frames=10, size_px=64, seed=5)
    rec, _ = run_item(stage, tmp_path, inputs)
    store = ArtifactStore(str(tmp_path / "store"))
    motion, mmeta = read(store._path(rec.file("liveportrait_motion").artifact.uri), "motion")
    flame, fmeta = read(store._path(rec.file("emoca_flame").artifact.uri), "flame")
    assert motion.shape == (10, 133) and flame.shape == (10, 159)
    assert rec.file("emoca_flame").model.origin == "random-init"
    assert mmeta["model_sha256"] == stage.env.model_fingerprints["liveportrait-motion"].sha256
    assert fmeta["model_sha256"] == stage.env.model_fingerprints["emoca"].sha256
    assert "pitch:1" in mmeta["layout"] and "expression:50" in fmeta["layout"]
    assert "official crop" in mmeta["input"] and "official crop" in fmeta["input"]
    clip = Path(store._path(inputs.records["download"].video.uri))
    frames = np.concatenate(list(iter_frames(clip, 64, 64)))
    boxes = read_boxes(Path(store._path(inputs.records["faces"].boxes.uri)))
    window = stage.config.framing_window_frames
    affines = framing_affines(landmarks(boxes), ["liveportrait_motion", "emoca_flame"], window)
    motion_model = stage.pools["liveportrait_motion"].worker.model
    direct = extract_motion(motion_model, cut_crops(frames, affines["liveportrait_motion"], 256))
    np.testing.assert_allclose(motion.numpy(), direct, atol=1e-5)
    flame_model = stage.pools["emoca_flame"].worker.model
    direct = extract_flame(flame_model, cut_crops(frames, affines["emoca_flame"], 224))
    np.testing.assert_allclose(flame.numpy(), direct, atol=1e-4)


def test_a_track_without_landmarks_cannot_be_framed(stage, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.base import ItemContext
    from tests.features_helpers import face_track_columns

    inputs = commit_clip(tmp_path, "clip-nolm", num_frames=6, size_px=64)
    cols = face_track_columns(6, 64)
    cols.update({k: np.full(6, np.nan) for k in cols if k.startswith("lm_")})
    path = tmp_path / "nolm.parquet"
    pq.write_table(pa.table(cols), path)
    ctx = ItemContext(ArtifactStore(str(tmp_path / "store")), "faces", "clip-nolm", "g" * 40)
    face = inputs.records["faces"].model_copy(
        update={"boxes": ctx.commit(path, "b.parquet", "table")}
    )
    inputs.records["faces"] = face
    with pytest.raises(ItemFailure) as err:
        run_item(stage, tmp_path, inputs)
    assert err.value.kind == FailureKind.NO_FACE and "cannot frame" in err.value.message


def test_features_stage_matches_direct_model_calls(tmp_path):
    """The stored hubert rows are exactly steps (2i, 2i+1) of a direct HuBERT pass."""
    from models.hubert import extract_hubert
    from tasks.media import read_wav

    stage = make_features_stage(tmp_path, latent_dtype="float32", hubert_dtype="float32")
    inputs = commit_clip(tmp_path, "clip-b", num_frames=12, size_px=64, seed=3)
    rec, _ = run_item(stage, tmp_path, inputs)
    store = ArtifactStore(str(tmp_path / "store"))
    feats, _ = read(store._path(rec.file("hubert").artifact.uri), "features")
    wave, _ = read_wav(Path(store._path(inputs.records["download"].audio.uri)))
    hub = stage.pools["hubert"].worker
    (direct,) = extract_hubert(hub.model, hub.feature_extractor, [wave], layer=-1)
    assert direct.shape[0] == 23
    for i in range(12):
        for j in range(2):
            np.testing.assert_allclose(feats[i, j].numpy(), direct[min(2 * i + j, 22)], atol=1e-6)


def test_misaligned_audio_is_a_typed_failure(stage, tmp_path):
    # 16 video frames but 1.0 s of audio (49 steps ~ 24.5 frames)
    inputs = commit_clip(tmp_path, "clip-long", num_frames=16, audio_samples=16_000)
    with pytest.raises(ItemFailure) as err:
        run_item(stage, tmp_path, inputs)
    assert err.value.kind == FailureKind.MISALIGNED
    # within tolerance (one frame of extra audio) is accepted and trimmed
    ok = commit_clip(tmp_path, "clip-ok", num_frames=16, audio_samples=16 * 640 + 640)
    rec, _ = run_item(stage, tmp_path, ok)
    assert rec.file("hubert").shape[0] == 16


def test_wrong_sample_rate_is_a_format_failure(stage, tmp_path):
    from tasks.media import write_wav

    inputs = commit_clip(tmp_path, "clip-sr", num_frames=8)
    wav_path = Path(
        ArtifactStore(str(tmp_path / "store"))._path(inputs.records["download"].audio.uri)
    )
    write_wav(wav_path, np.zeros(8 * 320), 8_000)
    with pytest.raises(ItemFailure) as err:
        run_item(stage, tmp_path, inputs)
    assert err.value.kind == FailureKind.FORMAT


def test_align_audio_steps_rule():
    feats = np.arange(7, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)  # 7 steps
    out = align_audio_steps(feats, num_frames=4, fps=25.0)
    assert out.shape == (4, 2, 3)
    assert out[:, :, 0].tolist() == [[0, 1], [2, 3], [4, 5], [6, 6]]
    # 50 fps video: one step per frame, duplicated at half-step positions (interpolated)
    out50 = align_audio_steps(feats, num_frames=3, fps=50.0)
    assert out50[:, :, 0].tolist() == [[0, 0.5], [1, 1.5], [2, 2.5]]


FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "clips"


@pytest.mark.skipif(not (FIXTURES / "face_1.mp4").exists(), reason="shared fixtures absent")
def test_real_talking_face_clip_is_aligned(stage, tmp_path):
    """One second of a real 30 fps clip at 25 fps / 16 kHz, as the download stage makes it."""
    from tasks.media import count_frames, run_ffmpeg

    src = FIXTURES / "face_1.mp4"
    crops, wav = tmp_path / "crops.mp4", tmp_path / "audio.wav"
    cut = ["-ss", "1", "-t", "1", "-i", str(src)]
    video = ["-vf", "fps=25,scale=64:64", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-an"]
    run_ffmpeg([*cut, *video, str(crops)], "crops")
    run_ffmpeg([*cut, "-vn", "-ac", "1", "-ar", "16000", "-c:a", "pcm_s16le", str(wav)], "audio")
    n = count_frames(crops)
    assert abs(n - 25) <= 1
    inputs = commit_media(tmp_path, "face-1", crops, wav, n, 25.0, 64)
    rec, _ = run_item(stage, tmp_path, inputs)
    assert rec.num_frames == n
    assert rec.file("vae_latents").shape == [n, 16, 8, 8]
    assert rec.file("hubert").shape == [n, 2, 32]


def test_realigned_audio_from_quality_is_what_hubert_reads(stage, tmp_path):
    from models.hubert import extract_hubert
    from tasks.base import ItemContext, ItemInputs
    from tasks.media import read_wav, write_wav
    from tasks.records import QualityVerdict

    inputs = commit_clip(tmp_path, "clip-r", num_frames=12, size_px=64, seed=7)
    store = ArtifactStore(str(tmp_path / "store"))
    wave, rate = read_wav(Path(store._path(inputs.records["download"].audio.uri)))
    shifted = np.concatenate([np.zeros(3200, np.float32), wave[:-3200]])  # 200 ms later
    qctx = ItemContext(store, "quality", "clip-r", "q" * 40)
    wav = qctx.scratch / "audio_aligned.wav"
    write_wav(wav, shifted, rate)
    verdict = QualityVerdict(
        clip_id="clip-r",
        accepted=True,
        rules=[],
        audio_shift_ms=200.0,
        aligned_audio=qctx.commit(wav, "audio_aligned.wav", "audio"),
    )
    qctx.close()
    with_quality = ItemInputs(item_id="clip-r", records={**inputs.records, "quality": verdict})
    rec, _ = run_item(stage, tmp_path, with_quality)
    # the record names the audio it was computed from; later stages read that file
    assert (rec.audio, rec.audio_source) == (verdict.aligned_audio, "aligned")
    feats, _ = read(store._path(rec.file("hubert").artifact.uri), "features")
    hub = stage.pools["hubert"].worker
    (direct,) = extract_hubert(hub.model, hub.feature_extractor, [shifted], layer=-1)
    np.testing.assert_allclose(feats[5, 0].float().numpy(), direct[10], atol=2e-2)
    (original,) = extract_hubert(hub.model, hub.feature_extractor, [wave], layer=-1)
    assert not np.allclose(feats[5, 0].float().numpy(), original[10], atol=2e-2)


def test_reference_features_come_from_the_middle_frame(stage, tmp_path):
    from models.dinov2 import embed_reference
    from tasks.media import iter_frames

    inputs = commit_clip(tmp_path, "clip-ref", num_frames=9, size_px=64, seed=11)
    rec, _ = run_item(stage, tmp_path, inputs)
    store = ArtifactStore(str(tmp_path / "store"))
    path = store._path(rec.file("reference").artifact.uri)
    with safe_open(path, framework="pt") as f:
        cls, tokens, image = (f.get_tensor(k) for k in ("cls", "patch_tokens", "image"))
        meta = f.metadata()
    assert meta["frame_index"] == "4"
    assert tokens.shape == (256, 32) and cls.shape == (32,)  # 224 / 14 = 16 patches a side
    assert rec.file("reference").model.origin == "random-init"
    crops = Path(store._path(inputs.records["faces"].crops.uri))
    frames = np.concatenate(list(iter_frames(crops, 64, 64)))
    assert torch.equal(image, torch.from_numpy(frames[4]))
    direct = embed_reference(stage.pools["reference"].worker.encoder, frames[4])
    assert torch.allclose(direct["cls"], cls, atol=1e-5)
    assert torch.allclose(direct["patch_tokens"], tokens, atol=1e-5)


def test_flux2_vae_selectable_by_config(tmp_path):
    from models.registry import ModelSpec

    vae = ModelSpec(family="vae-flux2", source="models/vae-flux2-tiny", tiny_random=True)
    stage = make_features_stage(
        tmp_path, vae=vae, motion=None, flame=None, reference=None, sensevoice=None
    )
    inputs = commit_clip(tmp_path, "clip-f2", num_frames=6, size_px=64)
    rec, ctx = run_item(stage, tmp_path, inputs)
    assert {a.name for a in ctx.artifacts} == {"vae_latents.safetensors", "hubert.safetensors"}
    lat, meta = read(
        ArtifactStore(str(tmp_path / "store"))._path(rec.file("vae_latents").artifact.uri),
        "latents",
    )
    assert lat.shape == (6, 128, 4, 4) and "bn.running_mean" in meta["normalisation"]
    assert rec.file("vae_latents").model.name == "vae-flux2"


def test_sensevoice_rows_follow_the_formula_and_map_two_per_three_frames(stage, tmp_path):
    from models.sensevoice_frontend import sensevoice_num_frames

    inputs = commit_clip(tmp_path, "clip-sv", num_frames=30, size_px=64, seed=2)
    rec, _ = run_item(stage, tmp_path, inputs)
    store = ArtifactStore(str(tmp_path / "store"))
    path = store._path(rec.file("sensevoice").artifact.uri)
    with safe_open(path, framework="pt") as f:
        feats, index = f.get_tensor("features"), f.get_tensor("frame_index")
        tokens = f.get_tensor("ctc_tokens")
        meta = f.metadata()
    n = 30 * 640  # 1.2 s of audio at 16 kHz
    assert feats.shape == (sensevoice_num_frames(n), 32)  # the tiny model's hidden size
    assert feats.shape[0] == 20 and index.tolist() == [(2 * i + 1) // 3 for i in range(30)]
    assert meta["model_sha256"] == stage.env.model_fingerprints["sensevoice"].sha256
    # CTC tokens: one int per video frame, the argmax of the frame's SenseVoice row
    from models.sensevoice import extract_sensevoice, load_sensevoice
    from tasks.media import read_wav

    model = load_sensevoice(stage.env.model_fingerprints["sensevoice"].resolved_path)
    wave, _ = read_wav(store._path(inputs.records["download"].audio.uri))
    ids = extract_sensevoice(model, wave).ctc_ids
    assert tokens.shape == (30,) and tokens.dtype == torch.int64
    assert tokens.tolist() == [int(ids[(2 * i + 1) // 3]) for i in range(30)]
    assert int(meta["ctc_vocab_size"]) == model.ctc.ctc_lo.out_features == 64
    assert len(set(ids.tolist())) > 1  # random weights: varied ids, so the mapping is checked
    speech = rec.stats_rows()["speech"]
    assert len(speech) == 1 and speech[0]["model_origin"] == "random-init"
    assert rec.speech is not None and rec.speech.language == meta["language"]


def test_masked_latents_are_the_sd_vae_encoding_of_half_blacked_crops(tmp_path):
    """``masked_latents: true`` (the official MuseTalk 1.5 baseline's input) stores, beside
    ``latents``, the encoding of each crop with rows ``H//2:`` black in pixel space."""
    from models.registry import ModelSpec
    from models.vae import encode_frames
    from tasks.media import iter_frames

    vae = ModelSpec(family="vae-sd", source="models/vae-sd-tiny", tiny_random=True)
    stage = make_features_stage(
        tmp_path, vae=vae, masked_latents=True, latent_dtype="float32",
        motion=None, flame=None, reference=None, sensevoice=None,
    )  # fmt: skip
    inputs = commit_clip(tmp_path, "clip-m", num_frames=8, size_px=64, seed=4)
    rec, _ = run_item(stage, tmp_path, inputs)
    lat_file = rec.file("vae_latents")
    assert lat_file.shape == [8, 4, 8, 8]  # "latents" still describes the file
    store = ArtifactStore(str(tmp_path / "store"))
    path = store._path(lat_file.artifact.uri)
    lat, meta = read(path, "latents")
    masked, _ = read(path, "masked_latents")
    assert masked.shape == lat.shape == (8, 4, 8, 8)
    assert "H//2" in meta["masked_latents"] and meta["scaling_factor"] == "0.18215"
    crops = Path(store._path(inputs.records["faces"].crops.uri))
    frames = np.concatenate(list(iter_frames(crops, 64, 64)))
    hand = frames.copy()
    hand[:, 32:] = 0
    worker_vae = stage.pools["vae_latents"].worker.vae
    np.testing.assert_allclose(masked, encode_frames(worker_vae, hand), atol=1e-5)
    np.testing.assert_allclose(lat, encode_frames(worker_vae, frames), atol=1e-5)
    assert (masked - lat).abs().mean() > 0.01  # not the unmasked latents
    off = stage.config.model_copy(update={"masked_latents": False})
    assert off.params_hash() != stage.config.params_hash()  # the option keys the features
