"""Metric networks loaded through the model registry, and the metrics computed with them.

Random-init stand-ins built by the registry's tiny builders and loaded back through the
same loaders as the official files (labelled ``random-init``); LPIPS is compared with the
reference ``lpips`` package given identical weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
from skimage import data
from skimage.transform import resize

from metrics.fid import fid, inception_features
from metrics.fvd import fvd, i3d_features, protocol_window, windows_upto
from metrics.identity import (
    acd,
    acd_curve,
    aligned_faces,
    centre_squares,
    csim,
    embed,
    identity_reference,
)
from metrics.perceptual import lpips_per_frame
from metrics.pose import apd_deg, head_pose_deg
from models.arcface import IResNet, arch_from_state, load_arcface
from models.checkpoints import CheckpointMismatchError
from models.i3d import load_i3d
from models.inception_fid import load_fid_inception
from models.liveportrait import load_motion_extractor
from models.lpips_net import (
    BACKBONE_FILES,
    HEAD_FILES,
    LPIPS,
    build_random_lpips_alex,
    build_random_lpips_vgg,
    load_lpips,
    save_lpips,
)
from models.registry import ModelSpec, ModelUnavailableError, ensure_model, fingerprint

build_tiny_lpips = {"alex": build_random_lpips_alex, "vgg": build_random_lpips_vgg}


def _random_model(family: str, root: Path) -> Path:
    spec = ModelSpec(family=family, source=family, tiny_random=True)
    path = ensure_model(spec, root)
    assert fingerprint(spec, root).origin == "random-init"
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("metric-models")


def _face(size: int) -> np.ndarray:
    img = data.astronaut()[20:220, 140:340]  # the face
    return (resize(img, (size, size), anti_aliasing=True) * 255).astype(np.uint8)


def _other_face(size: int) -> np.ndarray:
    img = data.lfw_subset()[0]  # a grey 25×25 face
    rgb = np.repeat((resize(img, (size, size)) * 255).astype(np.uint8)[..., None], 3, axis=2)
    return rgb


def _noisy(frames: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(frames + rng.normal(0, sigma, frames.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_equals_the_reference_package_with_identical_weights(net, tmp_path):
    torch.manual_seed(0)
    ref = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
    # the reference's backbone in torchvision's file layout, its shipped heads as they are
    feats = {
        "features." + k.split(".", 3)[2] + "." + k.split(".", 3)[3]: v
        for k, v in ref.state_dict().items()
        if k.startswith("net.slice")
    }
    torch.save(feats, tmp_path / BACKBONE_FILES[net])
    shipped = Path(lpips.__file__).parent / "weights" / "v0.1" / HEAD_FILES[net]
    shutil.copy(shipped, tmp_path / HEAD_FILES[net])  # the file the reference loaded
    ours = load_lpips(tmp_path, net)
    a = _face(64)[None].repeat(3, 0)
    b = np.stack([_noisy(a[0], s, i) for i, s in enumerate((5.0, 20.0, 60.0))])
    got = lpips_per_frame(ours, b, a)
    with torch.inference_mode():
        want = ref(torch.from_numpy(b).permute(0, 3, 1, 2).float() / 127.5 - 1,
                   torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1)  # fmt: skip
    np.testing.assert_allclose(got, want.flatten().double().numpy(), rtol=1e-5, atol=1e-7)
    assert got[0] < got[1] < got[2]
    assert lpips_per_frame(ours, a, a) == pytest.approx(np.zeros(3), abs=1e-7)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_narrow_random_stand_in_loads_through_the_official_path(net, tmp_path):
    build_tiny_lpips[net](tmp_path, 0)
    tiny = load_lpips(tmp_path, net)
    full = load_lpips(_full_random(net, tmp_path / "full"), net)
    narrow = [m.out_channels for m in tiny.features if isinstance(m, torch.nn.Conv2d)]
    wide = [m.out_channels for m in full.features if isinstance(m, torch.nn.Conv2d)]
    assert len(narrow) == len(wide) and all(n * 8 == w for n, w in zip(narrow, wide))
    assert [type(m) for m in tiny.features] == [type(m) for m in full.features]
    a = _face(64)[None].repeat(2, 0)
    b = np.stack([_noisy(a[0], s, i) for i, s in enumerate((5.0, 60.0))])
    got = lpips_per_frame(tiny, b, a)
    assert 0 < got[0] < got[1]
    assert lpips_per_frame(tiny, a, a) == pytest.approx(np.zeros(2), abs=1e-7)


def _full_random(net: str, folder: Path) -> Path:
    model = LPIPS(net)
    save_lpips(model, folder)
    return folder


def test_missing_weights_say_how_to_import_them(tmp_path):
    with pytest.raises(ModelUnavailableError, match="talkforge models import lpips-alex"):
        load_lpips(tmp_path, "alex")
    with pytest.raises(ModelUnavailableError, match="talkforge models import inception-fid"):
        load_fid_inception(tmp_path)
    with pytest.raises(ModelUnavailableError, match="talkforge models import i3d"):
        load_i3d(tmp_path)
    with pytest.raises(ModelUnavailableError, match="talkforge models import arcface"):
        load_arcface(tmp_path)
    spec = ModelSpec(family="arcface", source="nowhere")
    with pytest.raises(ModelUnavailableError, match="talkforge models import arcface"):
        ensure_model(spec, tmp_path)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(root):
    model = load_fid_inception(_random_model("inception-fid", root))
    clean = np.stack([np.roll(_face(64), 3 * i, axis=1) for i in range(8)])
    base = inception_features(model, clean, batch=8)
    assert base.shape == (8, 2048) and np.isfinite(base).all()
    assert fid(base, base) == pytest.approx(0.0, abs=1e-6)
    values = [fid(base, inception_features(model, _noisy(clean, s, 1), 8)) for s in (15, 60)]
    assert 0 < values[0] < values[1]


def test_fvd_of_a_set_with_itself_is_zero_and_grows_with_noise(root):
    model = load_i3d(_random_model("i3d", root))
    rng = np.random.default_rng(0)
    face = _face(96)
    videos = [
        np.stack([np.roll(face, int(rng.integers(0, 9)) + t, axis=0) for t in range(40)])
        for _ in range(3)
    ]
    assert protocol_window(videos[0][:35]) is None
    windows = [protocol_window(v) for v in videos]
    assert windows[0].shape == (16, 224, 224, 3)
    base = i3d_features(model, windows)
    assert base.shape == (3, 400)
    assert fvd(base, base) == pytest.approx(0.0, abs=1e-6)
    values = [fvd(base, i3d_features(model, [_noisy(w, s, 2) for w in windows])) for s in (20, 80)]
    assert 0 < values[0] < values[1]
    assert len(windows_upto(videos[0], 32)) == 2 and windows_upto(videos[0], 128) == []


def test_csim_is_one_for_identical_frames_and_lower_for_another_face(root):
    model = load_arcface(_random_model("arcface", root))
    same = np.stack([_face(112)] * 4)
    ref = embed(model, same[:1])[0]
    assert csim(embed(model, same), ref) == pytest.approx(1.0, abs=1e-9)
    other = np.stack([_other_face(112)] * 4)
    assert csim(embed(model, other), ref) < 0.999
    assert acd(embed(model, same)) == pytest.approx(0.0, abs=1e-6)
    ref_mean = identity_reference(embed(model, same))
    assert np.linalg.norm(ref_mean) == pytest.approx(1.0)


def test_acd_grows_on_a_sequence_drifting_towards_another_face(root):
    model = load_arcface(_random_model("arcface", root))
    a, b = _face(112).astype(np.float64), _other_face(112).astype(np.float64)
    drift = np.stack([((1 - t) * a + t * b).astype(np.uint8) for t in np.linspace(0, 1, 40)])
    e = embed(model, drift)
    prefix = [acd(e[:n]) for n in (10, 20, 40)]
    assert 0 < prefix[0] < prefix[1] < prefix[2]
    assert acd(embed(model, np.stack([drift[0]] * 40))) < prefix[0]
    assert set(acd_curve(e)) == {32}


def test_centre_squares_and_aligned_faces_cut_the_arcface_square_of_a_crop():
    crop = np.zeros((1, 240, 240, 3), np.uint8)
    crop[:, 40:200, 40:200] = 255  # the template square at margin 0.5: 160 px centred
    faces = centre_squares(crop, margin=0.5)
    assert faces.shape == (1, 112, 112, 3) and faces.min() == 255
    # the same square through a crop→112 map (scale 112/160, shift by the square's corner)
    k = 112 / 160
    m = np.array([[[k, 0, -40 * k], [0, k, -40 * k]]])
    warped = aligned_faces(crop, m)
    assert warped.shape == (1, 112, 112, 3) and warped[:, 1:-1, 1:-1].min() == 255


def test_arcface_loader_reads_depth_and_widths_from_the_file(tmp_path):
    net = IResNet((2, 1, 3, 1), (8, 16, 32, 64), stem=8)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "backbone.pth")
    loaded = load_arcface(tmp_path)
    assert (loaded.layers, loaded.widths, loaded.stem) == ((2, 1, 3, 1), (8, 16, 32, 64), 8)
    assert arch_from_state(IResNet().state_dict())[0] == (3, 4, 14, 3)  # r50
    bad = net.state_dict()
    bad["fc.weight"] = bad["fc.weight"][:, :10]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match="mis-shaped"):
        load_arcface(tmp_path / "bad.pth")


def test_i3d_and_inception_refuse_another_layout(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointMismatchError):
        load_i3d(tmp_path / "x.pt")
    with pytest.raises(CheckpointMismatchError):
        load_fid_inception(tmp_path / "x.pt")


def test_apd_is_zero_for_the_same_pose_and_positive_for_a_mirrored_head(root):
    model = load_motion_extractor(_random_model("liveportrait-motion", root))
    frames = np.stack([_face(256)] * 3)
    pose = head_pose_deg(model, frames)
    assert pose.shape == (3, 3)
    assert apd_deg(pose, head_pose_deg(model, frames)) == pytest.approx(0.0, abs=1e-5)
    mirrored = head_pose_deg(model, frames[:, :, ::-1].copy())
    assert apd_deg(mirrored, pose) > 0
