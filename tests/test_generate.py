"""Generate stage: every committed checkpoint × {self, cross} per held-out clip; the right
frames, fps and driving audio; cached videos; deterministic audio partners; typed failures."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from generators import registry
from generators.io import read_tensor
from generators.musetalk15.model import make_spec
from models.vae import decode_latents
from storage.store import ArtifactStore
from tasks.base import FailureKind, ItemContext, ItemFailure, ItemInputs
from tasks.generate import GenerateStage, cross_partners
from tasks.generate_config import BaselineWeights, GenerateConfig
from tasks.media import VideoWriter, count_frames, iter_frames, probe, read_wav, write_wav
from tasks.records import (
    ClipFeatures,
    CommittedHistory,
    CommittedVersion,
    FeatureFile,
    GeneratedClip,
    TrainedCheckpoint,
)
from tests.train_helpers import (
    AUDIO_DIM,
    build_bank,
    commit_clip,
    make_env,
    split_ids,
    tiny_vae,
)

SIZE = 64  # 8×8 latents
FRAMES = (16, 12)  # the two held-out clips differ in length: cross-audio cuts to the shorter


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    env = make_env(tmp)
    vae, vae_fp = tiny_vae(tmp)
    train_ids, held_ids = split_ids(2, 2)
    train = [
        commit_clip(tmp, env, vae, vae_fp, c, 16, SIZE, seed=i) for i, c in enumerate(train_ids)
    ]
    held = [
        commit_clip(tmp, env, vae, vae_fp, c, n, SIZE, seed=10 + i)
        for i, (c, n) in enumerate(zip(held_ids, FRAMES, strict=True))
    ]
    bank = build_bank(env, train)
    return {"tmp": tmp, "env": env, "vae": vae, "train": train, "held": held, "bank": bank}


def _checkpoint(world, name: str, zero_output: bool = False, seed: int = 0) -> TrainedCheckpoint:
    family = registry.get("musetalk15")()
    spec = make_spec(16, AUDIO_DIM, SIZE // 8, tiny=True)
    torch.manual_seed(seed)
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
        steps=seed,
        num_processes=1,
        train_clips=[c.clip_id for c in world["train"]],
        resumed_from_step=0,
        history=[],
    )


def _history(*ckpts: TrainedCheckpoint) -> CommittedHistory:
    versions = [
        CommittedVersion(item_key=f"k{i}", record_type="TrainedCheckpoint",
                         record_json=c.model_dump_json())
        for i, c in enumerate(ckpts)
    ]  # fmt: skip
    return CommittedHistory(stage="train", versions=versions)


def _inputs(world, clip, ckpts, partner=None, features=None) -> ItemInputs:
    records = dict(clip.inputs.records)
    if features is not None:
        records["features"] = features
    if partner is not None:
        records["features@partner"] = partner.inputs.records["features"]
    return ItemInputs(
        item_id=clip.clip_id,
        records=records,
        shared={"engram": world["bank"], "train": ckpts[-1], "train@history": _history(*ckpts)},
    )


def _generate(stage, world, clip, ckpts, partner=None, key="g", features=None) -> GeneratedClip:
    ctx = ItemContext(world["env"].store(), "generate", clip.clip_id, key * 40)
    try:
        return stage.process(_inputs(world, clip, ckpts, partner, features), ctx)
    finally:
        ctx.close()


def _stage(world, **cfg) -> GenerateStage:
    stage = GenerateStage(GenerateConfig(batch_size=8, **cfg), world["env"])
    stage.setup()
    return stage


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


def _path(world, ref):
    return world["env"].store().local_path(ref.uri, world["tmp"])


def test_both_settings_per_checkpoint_with_frames_fps_and_the_driving_audio(world):
    a, b = world["held"]
    ckpts = [_checkpoint(world, "one", seed=1), _checkpoint(world, "two", seed=2)]
    stage = _stage(world)
    assert all(stage.accepts(c.clip_id, {}) for c in world["held"])
    assert not any(stage.accepts(c.clip_id, {}) for c in world["train"])
    assert stage.partners([a.clip_id, b.clip_id]) == {a.clip_id: b.clip_id, b.clip_id: a.clip_id}

    rec = _generate(stage, world, a, ckpts, partner=b)
    assert isinstance(rec, GeneratedClip) and rec.clip_id == a.clip_id and not rec.notes
    got = {(v.checkpoint, v.setting) for v in rec.videos}
    labels = {f"main-step{c.steps}-{c.checkpoint.sha256[:12]}" for c in ckpts}
    assert got == {(label, s) for label in labels for s in ("self", "cross")}
    store = world["env"].store()
    for v in rec.videos:
        path = _path(world, v.video)
        info = probe(path)
        expected = FRAMES[0] if v.setting == "self" else min(FRAMES)
        assert v.num_frames == count_frames(path) == expected
        assert info.fps == pytest.approx(25.0) and (info.width, info.height) == (SIZE, SIZE)
        assert info.has_audio and v.generator_origin == "trained" and v.family == "musetalk15"
        driver = a if v.setting == "self" else b
        assert v.audio_clip_id == driver.clip_id
        assert v.audio == driver.inputs.records["features"].audio
        wav, _ = read_wav(store.local_path(v.audio.uri, world["tmp"]))
        muxed = _decoded_audio(path)
        assert _best_correlation(muxed, wav[: len(muxed)]) > 0.8
    # one load per model and VAE on this worker
    assert len(stage.worker._models) == 2 and len(stage.worker._vaes) == 1


def test_videos_already_in_the_store_are_reused_not_regenerated(world, monkeypatch):
    a, b = world["held"]
    ckpt = _checkpoint(world, "one", seed=1)
    first = _generate(_stage(world), world, a, [ckpt], partner=b, key="p")
    again = _stage(world)
    monkeypatch.setattr(again.worker, "_render", lambda *a, **k: pytest.fail("regenerated"))
    second = _generate(again, world, a, [ckpt], partner=b, key="q")  # another item key
    assert [v.video for v in second.videos] == [v.video for v in first.videos]
    # a new checkpoint adds videos; the known ones still come from the store
    monkeypatch.undo()
    third = _generate(
        _stage(world), world, a, [ckpt, _checkpoint(world, "three", seed=3)], partner=b, key="r"
    )
    assert {v.video.artifact_id for v in first.videos} < {v.video.artifact_id for v in third.videos}


def test_same_weights_committed_twice_generate_once(world):
    a, b = world["held"]
    ckpt = _checkpoint(world, "one", seed=1)
    rec = _generate(_stage(world, settings=["self"]), world, a, [ckpt, ckpt], partner=b)
    assert [v.setting for v in rec.videos] == ["self"]


def test_cross_without_another_heldout_clip_is_a_note(world):
    rec = _generate(_stage(world), world, world["held"][0], [_checkpoint(world, "one", seed=1)])
    assert [v.setting for v in rec.videos] == ["self"]
    assert any("cross: no other held-out clip" in n for n in rec.notes)


def test_partners_are_deterministic_never_self_and_stable_when_clips_are_added():
    ids = [f"c{i:02d}" for i in range(12)]
    pairs = cross_partners(ids, seed=3)
    assert pairs == cross_partners(list(reversed(ids)), seed=3)
    assert set(pairs) == set(ids) and all(p != c and p in ids for c, p in pairs.items())
    more = cross_partners([*ids, "new"], seed=3)
    # a clip's partner changes only to the new clip (when it hashes lower)
    assert all(more[c] in (pairs[c], "new") for c in ids)
    assert cross_partners(["only"], seed=3) == {}
    assert cross_partners(ids, seed=4) != pairs


def test_generated_frames_are_the_vae_decode_of_the_prediction(world):
    """A UNet whose output layer is zero predicts zero latents: every frame is decode(0)."""
    clip = world["held"][0]
    ckpt = _checkpoint(world, "zero", zero_output=True)
    rec = _generate(_stage(world, settings=["self"]), world, clip, [ckpt])
    frames = np.concatenate(list(iter_frames(_path(world, rec.videos[0].video), SIZE, SIZE)))
    expected = decode_latents(world["vae"], torch.zeros(1, 16, SIZE // 8, SIZE // 8))
    # the same frames through the same encoder settings, without the model in between
    ref_path = world["tmp"] / "decode-of-zero.mp4"
    with VideoWriter(ref_path, SIZE, SIZE, 25.0) as vw:
        vw.write(np.repeat(expected, FRAMES[0], axis=0))
    ref = np.concatenate(list(iter_frames(ref_path, SIZE, SIZE)))
    assert frames.shape == ref.shape == (FRAMES[0], SIZE, SIZE, 3)
    assert np.abs(frames.astype(np.int16) - ref.astype(np.int16)).mean() < 1.0
    # and it is not just any image: a real face crop is far from it
    assert np.abs(frames.astype(np.int16) - clip.frames.astype(np.int16)).mean() > 10.0


def test_features_that_do_not_fit_the_checkpoint_fail_typed(world):
    vae, vae_fp = tiny_vae(world["tmp"])
    _, held = split_ids(0, 3)
    big = commit_clip(world["tmp"], world["env"], vae, vae_fp, held[2], 12, 2 * SIZE, seed=5)
    with pytest.raises(ItemFailure) as exc:
        _generate(_stage(world), world, big, [_checkpoint(world, "one", seed=1)])
    assert exc.value.kind == FailureKind.MODEL
    assert "do not fit" in exc.value.message


def test_the_audio_the_features_were_computed_from_is_muxed(world, tmp_path):
    """The quality stage re-aligned this clip (audio delayed by 200 ms): the features record
    names the re-aligned wav, and generate must mux that one, not the clip's original."""
    clip = world["held"][0]
    store = world["env"].store()
    original, rate = read_wav(store.local_path(clip.inputs.records["download"].audio.uri, tmp_path))
    shift = rate // 5
    aligned = np.concatenate([np.zeros(shift), original[:-shift]])
    wav = tmp_path / "audio_aligned.wav"
    write_wav(wav, aligned, rate)
    aligned_ref = ItemContext(store, "quality", clip.clip_id, "q" * 40).commit(
        wav, "audio_aligned.wav", "audio"
    )
    feats = clip.inputs.records["features"].model_copy(
        update={"audio": aligned_ref, "audio_source": "aligned"}
    )
    stage = _stage(world, settings=["self"])
    rec = _generate(stage, world, clip, [_checkpoint(world, "one", seed=1)], features=feats)
    muxed = _decoded_audio(_path(world, rec.videos[0].video))
    assert _best_correlation(muxed, aligned) > 0.8
    assert _best_correlation(muxed, original) < 0.3


def test_unusable_models_fail_typed_or_become_notes(world):
    clip = world["held"][0]
    good = _checkpoint(world, "one", seed=1)
    nope = good.model_copy(update={"family": "nope"})
    with pytest.raises(ItemFailure) as exc:
        _generate(_stage(world, settings=["self"]), world, clip, [nope])
    assert exc.value.kind == FailureKind.MODEL
    assert "unknown model family 'nope'" in exc.value.message
    # beside a usable checkpoint, an unusable one is a note and the clip still succeeds
    gone_path = world["tmp"] / "gone.safetensors"
    gone_path.write_bytes(b"x")
    gone_ref = ItemContext(world["env"].store(), "train", "train", "z" * 40).commit(
        gone_path, "model.safetensors", "checkpoint"
    )
    ArtifactStore(world["env"].store_uri).fs.rm(
        world["env"].store().local_path(gone_ref.uri, world["tmp"]).as_posix()
    )
    gone = good.model_copy(update={"checkpoint": gone_ref})
    rec = _generate(_stage(world, settings=["self"]), world, clip, [good, gone])
    assert len(rec.videos) == 1 and any("checkpoint file of" in n for n in rec.notes)


def _official_features(world, clip) -> ClipFeatures:
    """The clip's features as the features stage writes them for the official MuseTalk 1.5
    baseline (``vae: vae-sd``, ``masked_latents: true``, ``whisper``): tiny SD-VAE latents of
    the crops and of the half-blacked crops; Whisper-tiny-shaped (random) features."""
    from models.fingerprint import ModelFingerprint
    from models.registry import ModelSpec, ensure_model, fingerprint
    from models.vae import encode_frames, load_vae, mask_lower_half

    spec = ModelSpec(family="vae-sd", source="models/vae-sd-tiny", tiny_random=True)
    vae = load_vae(ensure_model(spec, world["tmp"]))
    n = len(clip.frames)
    tensors = {
        "vae_latents": {"latents": encode_frames(vae, clip.frames).half(),
                        "masked_latents": encode_frames(vae, mask_lower_half(clip.frames)).half()},
        "whisper": {"features": torch.randn(n, 2, 5, 384, generator=torch.Generator()
                                            .manual_seed(1)).half()},
    }  # fmt: skip
    prints = {
        "vae_latents": fingerprint(spec, world["tmp"]),
        "whisper": ModelFingerprint(name="whisper", source="random", resolved_path="",
                                    sha256="0" * 64, origin="random-init"),
    }  # fmt: skip
    ctx = ItemContext(world["env"].store(), "features", clip.clip_id, "w" * 40)
    files = []
    for family, named in tensors.items():
        path = ctx.scratch / f"{family}.safetensors"
        save_file({k: v.contiguous() for k, v in named.items()}, str(path))
        first = next(iter(named.values()))
        files.append(FeatureFile(
            family=family, artifact=ctx.commit(path, path.name, "features"),
            shape=list(first.shape), dtype="float16", frame_rate_hz=25.0, model=prints[family],
        ))  # fmt: skip
    ctx.close()
    return clip.inputs.records["features"].model_copy(update={"files": files})


def test_the_official_musetalk15_baseline_generates_through_load_official(world):
    """The released UNet (here the tiny stand-in in the release layout, as ``talkforge
    models import musetalk15-official`` leaves it) is fingerprinted in preflight and sampled
    by the real ``Musetalk15Family.load_official`` from Whisper + SD-VAE + masked latents,
    without the memory bank; the frames are the VAE decode of the official prediction."""
    from models.musetalk15_official import build_tiny_official_unet
    from models.registry import ModelSpec

    folder = world["tmp"] / "official-mt15"
    build_tiny_official_unet(folder, seed=7)
    weights = ModelSpec(family="musetalk15-official", source=str(folder))
    baseline = BaselineWeights(name="mt15", family="musetalk15", weights=weights)
    stage = _stage(world, settings=["self"], baselines=[baseline])
    assert stage.model_specs() == [weights]  # preflight fingerprints them
    clip, ckpt = world["held"][0], _checkpoint(world, "one", seed=1)
    feats = _official_features(world, clip)
    rec = _generate(stage, world, clip, [ckpt], key="o", features=feats)
    (base,) = rec.videos  # the trained checkpoint reads HuBERT, which these features lack
    assert any(n.startswith("main-step1-") and "hubert" in n for n in rec.notes)
    assert (base.checkpoint, base.generator_origin, base.family) == ("mt15", "pretrained",
                                                                    "musetalk15")  # fmt: skip
    assert stage.worker._banks == {}  # the official path never read the memory bank
    path = _path(world, base.video)
    assert count_frames(path) == FRAMES[0] and probe(path).width == SIZE
    # the stage's loaded model fed by hand: prepare_clip, sample, decode
    ((family, spec, model),) = [
        m for k, m in stage.worker._models.items() if k.startswith(base.checkpoint_sha256)
    ]
    assert spec.official and family.features_for(spec).keys() == {"vae_latents", "whisper"}
    store = world["env"].store()
    read = {f.family: store.local_path(f.artifact.uri, world["tmp"]) for f in feats.files}
    features = {"vae_latents": read_tensor(read["vae_latents"], "latents"),
                "vae_latents/masked_latents": read_tensor(read["vae_latents"], "masked_latents"),
                "whisper": read_tensor(read["whisper"], "features")}  # fmt: skip
    with torch.inference_mode():
        pred = family.sample(model, family.prepare_clip(spec, features, None, 0),
                             torch.arange(FRAMES[0]))  # fmt: skip
    expected = decode_latents(stage.worker._vae(feats), pred)
    ref_path = world["tmp"] / "official-expected.mp4"  # through the same x264 settings
    with VideoWriter(ref_path, SIZE, SIZE, 25.0, crf=stage.config.crf) as vw:
        vw.write(expected)
    ref = np.concatenate(list(iter_frames(ref_path, SIZE, SIZE))).astype(np.int16)
    frames = np.concatenate(list(iter_frames(path, SIZE, SIZE))).astype(np.int16)
    assert frames.shape == ref.shape and np.abs(frames - ref).mean() < 1.0
    # not any decode: the frames' own (unmasked) latents decode far from it
    own = decode_latents(stage.worker._vae(feats), features["vae_latents"].float()).astype(np.int16)
    assert np.abs(own - expected.astype(np.int16)).mean() > 5.0


def test_a_baseline_its_family_cannot_feed_is_a_note_beside_the_checkpoints(world):
    """On Flux latents and HuBERT (no Whisper) the official UNet is refused with the reason
    (a typed MODEL note beside the checkpoint's video); on features without
    ``masked_latents`` its video fails FORMAT, naming the missing tensor."""
    from models.musetalk15_official import build_tiny_official_unet
    from models.registry import ModelSpec

    folder = world["tmp"] / "official-mt15-refused"
    build_tiny_official_unet(folder, seed=7)
    weights = ModelSpec(family="musetalk15-official", source=str(folder))
    baseline = BaselineWeights(name="mt15", family="musetalk15", weights=weights)
    clip, ckpt = world["held"][0], _checkpoint(world, "one", seed=1)
    rec = _generate(_stage(world, settings=["self"], baselines=[baseline]), world, clip,
                    [ckpt], key="n")  # fmt: skip
    assert [v.checkpoint for v in rec.videos] == [f"main-step1-{ckpt.checkpoint.sha256[:12]}"]
    (note,) = [n for n in rec.notes if n.startswith("mt15/self")]
    assert note.startswith("mt15/self: model: cannot load") and "vae-sd" in note
    feats = _official_features(world, clip)
    lat = feats.file("vae_latents")
    lat_path = world["env"].store().local_path(lat.artifact.uri, world["tmp"])
    plain = world["tmp"] / "plain" / "vae_latents.safetensors"
    plain.parent.mkdir(exist_ok=True)
    save_file({"latents": read_tensor(lat_path, "latents")}, str(plain))
    ctx = ItemContext(world["env"].store(), "features", clip.clip_id, "u" * 40)
    ref = ctx.commit(plain, plain.name, "features")
    ctx.close()
    files = [f.model_copy(update={"artifact": ref}) if f is lat else f for f in feats.files]
    plain_feats = feats.model_copy(update={"files": files})
    stage = _stage(world, settings=["self"], baselines=[baseline])
    inputs = _inputs(world, clip, [ckpt], features=plain_feats)
    (gen,) = [g for g in stage.generators(inputs) if g.baseline is not None]
    ctx = ItemContext(world["env"].store(), "generate", clip.clip_id, "m" * 40)
    with pytest.raises(ItemFailure) as exc:
        stage.worker.video(inputs, ctx, gen, "self", plain_feats, plain_feats, 25.0)
    ctx.close()
    assert exc.value.kind == FailureKind.FORMAT and "masked_latents" in exc.value.message
