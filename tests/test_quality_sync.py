"""The ``av_offset`` quality rule, its offline estimator, and SyncNet loading and scoring.

Clips: a generated one (the astronaut's face whose mouth opens with the loudness of
espeak-ng speech, 4 s at 25 fps; skipped without espeak-ng) and a real fixture clip
(``face_3``; skipped when ``../shared`` is absent). The faces stage runs for real before
quality. Shifts are checked relative to the unshifted measurement: the estimator reads
in-sync clips at about +30 to +65 ms (see :mod:`tasks.quality_sync`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from models.checkpoints import CheckpointError, CheckpointMismatchError
from models.registry import ModelSpec, ModelUnavailableError, ensure_model, fingerprint
from models.syncnet import (
    SyncNet,
    load_syncnet,
    mfcc,
    mfcc_windows,
    save_state_dict,
    sync_scores,
)
from tasks.faces import FacesStage
from tasks.faces_config import FacesConfig
from tasks.media import read_wav, write_wav
from tasks.quality import QualityStage
from tasks.quality_config import QualityConfig
from tasks.quality_measures import mouth_roi, read_boxes
from tasks.quality_sync import (
    OffsetEstimate,
    SyncNetScorer,
    estimate_av_offset_xcorr,
    judge_av_offset,
    shift_audio,
    speech_envelope,
    syncnet_crop_affines,
    syncnet_offset,
    xcorr_offset,
)
from tests.faces_helpers import (
    CANVAS_HW,
    CLIPS,
    astronaut_face,
    canvas,
    espeak_speech,
    inputs_for,
    make_ctx,
    make_env,
    normalized_from_file,
    normalized_from_frames,
    paste,
)

FPS = 25.0
RATE = 16000
GEN_FRAMES = 100
ONE_FRAME_MS = 1000.0 / FPS


def talking_frames(speech: np.ndarray) -> list[np.ndarray]:
    """Frame ``i`` shows the mouth opened by the loudness of the audio around ``i / fps``."""
    # delaying by half a frame centres the envelope's intervals on the frame times
    loud = speech_envelope(shift_audio(speech, RATE, ONE_FRAME_MS / 2), RATE, FPS, GEN_FRAMES)
    opening = np.clip(loud / np.percentile(loud, 90), 0.0, 1.0)
    h, w = CANVAS_HW
    x0, y0 = (w - 150) // 2, (h - 150) // 2
    return [
        paste(canvas(), astronaut_face(150, o), x0 + round(4 * np.sin(i / 7)), y0)
        for i, o in enumerate(opening)
    ]


class Clip:
    """A normalized clip with its face track, re-judged with other audio."""

    def __init__(self, root, name, clip, track, qcfg: QualityConfig):
        self.root, self.name, self.clip, self.track, self.qcfg = root, name, clip, track, qcfg
        ctx = make_ctx(root, "x", name)
        self.samples, _ = read_wav(ctx.local_path(clip.audio))
        self.crops = ctx.local_path(track.crops)
        self.boxes = read_boxes(ctx.local_path(track.boxes))

    def measure(self, samples: np.ndarray) -> OffsetEstimate:
        roi = mouth_roi(self.boxes, self.track.crop_size_px)
        return xcorr_offset(self.crops, self.track.crop_size_px, roi, samples, RATE, FPS)

    def judge(self, samples: np.ndarray, tag: str, **overrides):
        ctx = make_ctx(self.root, "download", f"{self.name}-{tag}")
        wav = ctx.scratch / f"{tag}.wav"
        write_wav(wav, samples, RATE)
        clip = self.clip.model_copy(update={"audio": ctx.commit(wav, wav.name, "audio")})
        stage = QualityStage(self.qcfg.model_copy(update=overrides), make_env(self.root))
        inputs = inputs_for(self.name, download=clip, faces=self.track)
        return stage.process(inputs, make_ctx(self.root, "quality", f"{self.name}-{tag}"))


def av_rule(verdict):
    return next(r for r in verdict.rules if r.rule == "av_offset")


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Clip:
    root = tmp_path_factory.mktemp("gen")
    speech = espeak_speech(root, round(RATE * GEN_FRAMES / FPS))
    clip = normalized_from_frames(root, "gen", talking_frames(speech))
    ctx = make_ctx(root, "download", "gen-speech")
    wav = ctx.scratch / "speech.wav"
    write_wav(wav, speech, RATE)
    clip = clip.model_copy(update={"audio": ctx.commit(wav, wav.name, "audio")})
    faces = FacesStage(FacesConfig(crop_size_px=128), make_env(root))
    track = faces.process(inputs_for("gen", download=clip), make_ctx(root, "faces", "gen"))
    return Clip(root, "gen", clip, track, QualityConfig(min_face_size_px=80))


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Clip:
    src = CLIPS / "face_3.mp4"
    if not src.exists():
        pytest.skip("real fixture clips (../shared/fixtures/clips) are absent")
    root = tmp_path_factory.mktemp("real")
    clip = normalized_from_file(root, src, "face_3")
    faces = FacesStage(FacesConfig(), make_env(root))
    track = faces.process(inputs_for("face_3", download=clip), make_ctx(root, "faces", "face_3"))
    return Clip(root, "face_3", clip, track, QualityConfig())


@pytest.mark.parametrize("which", ["generated", "real"])
def test_xcorr_follows_shifted_audio_within_a_frame(which, request):
    c: Clip = request.getfixturevalue(which)
    base = c.measure(c.samples)
    assert base.method == "xcorr" and not base.unmeasurable
    assert base.confidence >= 3.0 and abs(base.offset_ms) <= 100.0
    for shift in (200.0, -200.0):
        est = c.measure(shift_audio(c.samples, RATE, shift))
        assert est.confidence >= 3.0
        assert est.offset_ms - base.offset_ms == pytest.approx(shift, abs=ONE_FRAME_MS)


@pytest.mark.parametrize("which", ["generated", "real"])
def test_av_offset_rule_rejects_200ms_either_way_and_passes_in_sync(which, request):
    c: Clip = request.getfixturevalue(which)
    v = c.judge(c.samples, "sync")
    assert v.accepted and av_rule(v).passed and av_rule(v).reason == ""
    assert av_rule(v).hard and av_rule(v).threshold == 100.0
    for shift, side in ((200.0, "audio lags video"), (-200.0, "audio leads video")):
        v = c.judge(shift_audio(c.samples, RATE, shift), f"shift{shift:.0f}")
        rule = av_rule(v)
        assert not v.accepted and [r.rule for r in v.rules if r.hard and not r.passed] == [
            "av_offset"
        ]
        assert abs(rule.value) > 100.0 and np.sign(rule.value) == np.sign(shift)
        assert rule.reason.startswith(f"audio-video offset {rule.value:+.0f} ms ({side})")
        assert "beyond ±100 ms (xcorr, confidence" in rule.reason
        assert v.rejection_reason() == f"av_offset: {rule.reason}"


def test_realigned_clip_passes_and_its_aligned_audio_measures_in_sync(generated):
    c = generated
    shifted = shift_audio(c.samples, RATE, 200.0)
    v = c.judge(shifted, "realign", realign_confident_offsets=True)
    rule = av_rule(v)
    assert v.accepted and rule.passed and rule.value > 100.0
    assert rule.reason.startswith(f"re-aligned: audio shifted by {-rule.value:+.0f} ms; ")
    assert v.audio_shift_ms == pytest.approx(-rule.value) and v.aligned_audio is not None
    aligned, rate = read_wav(make_ctx(c.root, "x", "aligned").local_path(v.aligned_audio))
    assert rate == RATE and len(aligned) == len(shifted)
    again = c.judge(aligned, "aligned")
    assert av_rule(again).passed and av_rule(again).reason == ""
    assert abs(av_rule(again).value) <= 100.0 and again.aligned_audio is None


def test_silent_audio_is_unmeasurable_not_an_offset(generated):
    c = generated
    silent = np.zeros_like(c.samples)
    assert c.measure(silent).unmeasurable == "no audio signal"
    v = c.judge(silent, "silent")
    rule = av_rule(v)
    assert rule.passed and rule.value == 0.0
    # a silent clip is rejected, by the speech floor and not by av_offset
    assert [r.rule for r in v.rules if r.hard and not r.passed] == ["speech_floor"]
    assert rule.reason == "unmeasured offset (xcorr: no audio signal)" and not rule.measured


def test_estimator_on_constructed_signals():
    rng = np.random.default_rng(0)
    motion = np.convolve(rng.exponential(1.0, 200), np.ones(3) / 3, mode="same")
    for lag in (4, -7, 0):
        envelope = np.roll(motion, lag) + rng.normal(0, 0.05, 200)  # audio lags by ``lag``
        est = estimate_av_offset_xcorr(motion, envelope, FPS)
        assert est.offset_frames == pytest.approx(lag, abs=0.5) and est.confidence > 6
        assert est.offset_ms == pytest.approx(est.offset_frames * ONE_FRAME_MS)
    unrelated = estimate_av_offset_xcorr(motion, rng.exponential(1.0, 200), FPS)
    assert unrelated.confidence < 3.0
    short = estimate_av_offset_xcorr(motion[:61], motion[:61], FPS)
    assert short.unmeasurable == "61 frame intervals < 62 for a ±15-frame search"
    still = estimate_av_offset_xcorr(np.zeros(100), motion[:100], FPS)
    assert still.unmeasurable == "no mouth motion"


def test_judge_reasons_and_realign_limits():
    def est(offset_ms, confidence, edge=False):
        frames = offset_ms / ONE_FRAME_MS
        return OffsetEstimate("xcorr", frames, offset_ms, confidence, 0.4, at_search_edge=edge)

    low = judge_av_offset(est(300.0, 1.2), 100.0, 3.0, realign=False, hard=True)
    assert low.rule.passed and low.rule.value == 300.0 and low.audio_shift_ms == 0.0
    assert not low.rule.measured
    assert low.rule.reason == "unmeasured offset (confidence 1.20 < 3.00; xcorr best guess +300 ms)"
    ok = judge_av_offset(est(-80.0, 5.0), 100.0, 3.0, realign=True, hard=True)
    assert ok.rule.passed and ok.rule.reason == "" and ok.audio_shift_ms == 0.0 and ok.rule.measured
    moved = judge_av_offset(est(-160.0, 5.0), 100.0, 3.0, realign=True, hard=False)
    assert moved.rule.passed and moved.audio_shift_ms == 160.0 and not moved.rule.hard
    assert moved.rule.reason.startswith("re-aligned: audio shifted by +160 ms; audio-video")
    edge = judge_av_offset(est(600.0, 5.0, edge=True), 100.0, 3.0, realign=True, hard=True)
    assert not edge.rule.passed and edge.audio_shift_ms == 0.0


def test_shift_audio_pads_and_trims():
    x = np.arange(1, 11, dtype=np.float32)
    assert shift_audio(x, 1000, 3.0).tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert shift_audio(x, 1000, -3.0).tolist() == [4, 5, 6, 7, 8, 9, 10, 0, 0, 0]
    assert shift_audio(x, 1000, 20.0).tolist() == [0] * 10


def test_syncnet_state_dict_has_the_official_layout():
    sd = SyncNet().state_dict()
    shapes = {
        "netcnnaud.0.weight": (64, 1, 3, 3),
        "netcnnaud.4.weight": (192, 64, 3, 3),
        "netcnnaud.18.weight": (512, 256, 5, 4),
        "netcnnaud.19.running_var": (512,),
        "netcnnlip.0.weight": (96, 3, 5, 7, 7),
        "netcnnlip.4.weight": (256, 96, 1, 5, 5),
        "netcnnlip.18.weight": (512, 256, 1, 6, 6),
        "netfcaud.1.running_mean": (512,),
        "netfcaud.3.weight": (1024, 512),
        "netfclip.0.weight": (512, 512),
        "netfclip.3.bias": (1024,),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert {k.split(".")[0] for k in sd} == {"netcnnaud", "netfcaud", "netcnnlip", "netfclip"}
    convs = [k for k in sd if k.endswith(".weight") and sd[k].dim() >= 4]
    assert [k.split(".")[1] for k in convs] == ["0", "4", "8", "11", "14", "18"] * 2


def test_random_syncnet_round_trips_through_the_loader(tmp_path):
    spec = ModelSpec(family="syncnet", source="models/syncnet-random", tiny_random=True, seed=3)
    directory = ensure_model(spec, tmp_path)
    assert fingerprint(spec, tmp_path).origin == "random-init"
    model = load_syncnet(directory)
    torch.manual_seed(3)
    expected = SyncNet().state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert not model.training
    with torch.inference_mode():
        assert model.forward_aud(torch.randn(2, 1, 13, 20)).shape == (2, 1024)
        assert model.forward_lip(torch.rand(1, 3, 5, 224, 224) * 255).shape == (1, 1024)


def test_loading_wrong_files_fails_clearly(tmp_path):
    sd = SyncNet().state_dict()
    renamed = {k.replace("netfclip", "netfcvid"): v for k, v in sd.items()}
    torch.save(renamed, tmp_path / "renamed.model")
    with pytest.raises(
        CheckpointMismatchError, match=r"does not fit the SyncNet.*\n  missing: netfclip\."
    ) as err:
        load_syncnet(tmp_path / "renamed.model")
    assert all(name.startswith("netfcvid.") for name in err.value.unexpected)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.model")  # a pickled module
    with pytest.raises(CheckpointError, match=r"refused .*module\.model: .*Linear.*Re-save it"):
        load_syncnet(tmp_path / "module.model")
    with pytest.raises(ModelUnavailableError, match="not found"):
        load_syncnet(tmp_path / "absent.model")
    save_state_dict(SyncNet(), tmp_path / "ok.model")
    assert isinstance(load_syncnet(tmp_path / "ok.model"), SyncNet)


def test_sync_scores_find_a_known_offset():
    rng = np.random.default_rng(1)
    n, vshift = 60, 15
    lip = rng.normal(size=(n, 1024))
    same = sync_scores(lip, lip.copy(), vshift)
    assert same.offset_frames == 0 and same.sync_d == pytest.approx(0.0, abs=1e-9)
    assert same.sync_c == pytest.approx(np.median(same.mean_distance)) and same.sync_c > 10
    for k in (3, -4):  # audio window i + k matches video window i: audio lags by k
        audio = rng.normal(size=(n, 1024))
        if k > 0:
            audio[k:] = lip[: n - k]
        else:
            audio[:k] = lip[-k:]
        s = sync_scores(lip, audio, vshift)
        assert s.offset_frames == k
        # the reference pads audio with zeros: windows paired past the end cost ‖lip‖
        edge = lip[n - k :] if k > 0 else lip[:-k]
        assert s.sync_d == pytest.approx(np.linalg.norm(edge, axis=1).sum() / n)
        assert s.sync_c == pytest.approx(np.median(s.mean_distance) - s.sync_d)
    with pytest.raises(ValueError, match="equal"):
        sync_scores(lip, lip[:10])


def test_mfcc_matches_python_speech_features():
    """Reference rows computed with python_speech_features 0.6 ``mfcc(x * 32768, 16000)``."""
    t = np.arange(1000) / RATE
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3000 * t)
    ceps = mfcc(x)
    assert ceps.shape == (5, 13)
    first = [21.170708, -0.018212, -2.064028, 22.83421, -45.196263, -48.608073, 6.757482,
             -30.966198, -19.406725, 39.604445, 8.380454, 3.625444, 32.354989]  # fmt: skip
    last = [21.063342, 5.835939, -12.326422, 26.480948, -39.736249, -45.652781, 5.81697,
            -30.275316, -17.428038, 38.362879, 6.329611, 3.52527, 30.196486]  # fmt: skip
    np.testing.assert_allclose(ceps[0], first, atol=1e-5)
    np.testing.assert_allclose(ceps[-1], last, atol=1e-5)
    windows = mfcc_windows(mfcc(np.zeros(RATE)), 20)  # 1 s: 99 steps
    assert windows.shape == (20, 1, 13, 20)
    with pytest.raises(ValueError, match="too few"):
        mfcc_windows(mfcc(np.zeros(RATE)), 21)


def test_syncnet_crop_geometry_follows_the_reference():
    boxes = {
        c: np.array([v], dtype=np.float64)
        for c, v in zip(("x1", "y1", "x2", "y2"), (40, 20, 140, 120))
    }
    boxes |= {
        c: np.array([v])
        for c, v in zip(("m00", "m01", "m02", "m10", "m11", "m12"), (1, 0, 0, 0, 1, 0))
    }
    m = syncnet_crop_affines(boxes)[0]
    top_centre, bottom_centre = m @ [90, 20, 1], m @ [90, 120, 1]
    np.testing.assert_allclose(top_centre, [112, 0])
    np.testing.assert_allclose(bottom_centre, [112, 224 / 1.4])


def test_syncnet_scorer_runs_on_a_clip_with_random_weights(generated, tmp_path):
    spec = ModelSpec(family="syncnet", source="syncnet", tiny_random=True)
    weights = ensure_model(spec, tmp_path)
    cfg = QualityConfig(av_offset_method="syncnet", syncnet_weights=str(weights))
    stage = QualityStage(cfg, make_env(tmp_path))
    assert [s.family for s in stage.model_specs()] == ["silero-vad", "syncnet"]
    c = generated
    frames = 40  # 35 windows, to keep the CPU test short
    boxes = {k: v[:frames] for k, v in c.boxes.items()}
    scorer = SyncNetScorer(weights, batch_windows=8)
    est = syncnet_offset(scorer, c.crops, 128, boxes, c.samples[: frames * 640], RATE, FPS)
    assert est.method == "syncnet" and not est.unmeasurable
    assert est.offset_frames == round(est.offset_frames) and abs(est.offset_frames) <= 15
    assert est.offset_ms == pytest.approx(est.offset_frames * ONE_FRAME_MS)
    assert est.score > 0 and est.confidence >= 0
    wrong_fps = syncnet_offset(scorer, c.crops, 128, boxes, c.samples, RATE, 30.0)
    assert wrong_fps.unmeasurable.startswith("SyncNet needs 25 fps")
    with pytest.raises(ValidationError, match="needs syncnet_weights"):
        QualityConfig(av_offset_method="syncnet")
