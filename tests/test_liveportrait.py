"""LivePortrait motion extractor: official key layout, tiny round-trip, decoding, batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoints import CheckpointError, CheckpointMismatchError
from models.liveportrait import (
    CONFIG_FILE,
    FAMILY,
    MAX_DEGREES,
    MOTION_DIM,
    MOTION_LAYOUT,
    OFFICIAL_ARCH,
    TINY_ARCH,
    WEIGHTS_FILE,
    MotionExtractor,
    extract_motion,
    headpose_logits_to_degrees,
    load_motion_extractor,
    motion_slices,
    random_motion_extractor,
    save_motion_extractor,
)
from models.registry import PROVENANCE_FILE, ModelSpec, ModelUnavailableError, fingerprint


def _frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)


def test_official_architecture_has_the_official_state_dict_layout() -> None:
    # names and shapes from KwaiVGI/LivePortrait src/modules/convnextv2.py + util.py
    with torch.device("meta"):
        model = MotionExtractor(OFFICIAL_ARCH)
    sd = model.state_dict()
    assert len(sd) == 212
    assert all(k.startswith("detector.") for k in sd)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["detector.downsample_layers.0.0.weight"] == (96, 3, 4, 4)
    assert shapes["detector.downsample_layers.0.1.weight"] == (96,)
    assert shapes["detector.downsample_layers.3.0.weight"] == (384,)
    assert shapes["detector.downsample_layers.3.1.weight"] == (768, 384, 2, 2)
    assert shapes["detector.stages.0.0.dwconv.weight"] == (96, 1, 7, 7)
    assert shapes["detector.stages.2.8.pwconv1.weight"] == (1536, 384)
    assert shapes["detector.stages.2.8.grn.gamma"] == (1, 1, 1, 1536)
    assert shapes["detector.stages.3.2.pwconv2.weight"] == (768, 3072)
    assert shapes["detector.norm.weight"] == (768,)
    assert shapes["detector.fc_kp.weight"] == (63, 768)
    assert shapes["detector.fc_exp.weight"] == (63, 768)
    for axis in ("pitch", "yaw", "roll"):
        assert shapes[f"detector.fc_{axis}.weight"] == (66, 768)
    assert shapes["detector.fc_t.weight"] == (3, 768)
    assert shapes["detector.fc_scale.weight"] == (1, 768)
    assert "detector.stages.2.9.dwconv.weight" not in sd  # depths [3, 3, 9, 3]
    n_params = sum(p.numel() for p in model.parameters())
    assert 28.05e6 < n_params < 28.15e6


def test_tiny_model_uses_the_same_key_pattern() -> None:
    tiny = MotionExtractor(TINY_ARCH).state_dict()
    with torch.device("meta"):
        official = MotionExtractor(OFFICIAL_ARCH).state_dict()
    assert set(tiny) <= set(official)  # a subset: fewer blocks per stage, same names
    assert tiny["detector.fc_pitch.weight"].shape == (66, 64)


def test_tiny_builder_round_trips_through_the_strict_loader(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    spec = ModelSpec(family=FAMILY, source="models/lp-tiny", tiny_random=True, seed=3)
    fp = fingerprint(spec, tmp_path)  # builds through ensure_model
    directory = tmp_path / "models" / "lp-tiny"
    assert fp.origin == "random-init"
    assert json.loads((directory / PROVENANCE_FILE).read_text())["family"] == FAMILY
    assert json.loads((directory / CONFIG_FILE).read_text()) == {
        "depths": [1, 1, 1, 1],
        "dims": [8, 16, 32, 64],
    }
    raw = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    assert all(k.startswith("detector.") for k in raw)

    reference = random_motion_extractor(TINY_ARCH, seed=3)
    loaded = load_motion_extractor(directory)
    from_file = load_motion_extractor(directory / WEIGHTS_FILE)  # config found beside the file
    frames = _frames(3)
    expected = extract_motion(reference, frames)
    np.testing.assert_array_equal(extract_motion(loaded, frames), expected)
    np.testing.assert_array_equal(extract_motion(from_file, frames), expected)


def test_renamed_key_fails_with_the_key_names(tmp_path: Path) -> None:
    save_motion_extractor(random_motion_extractor(TINY_ARCH, seed=0), tmp_path)
    sd = torch.load(tmp_path / WEIGHTS_FILE, weights_only=True)
    sd["detector.fc_kp_renamed.weight"] = sd.pop("detector.fc_kp.weight")
    torch.save(sd, tmp_path / WEIGHTS_FILE)
    with pytest.raises(CheckpointMismatchError) as err:
        load_motion_extractor(tmp_path)
    assert err.value.missing == ("detector.fc_kp.weight",)
    assert err.value.unexpected == ("detector.fc_kp_renamed.weight",)
    message = str(err.value)
    assert "1 missing, 1 unexpected, 0 mis-shaped keys" in message
    assert "\n  missing: detector.fc_kp.weight\n" in message
    assert "\n  unexpected: detector.fc_kp_renamed.weight\n" in message


def test_wrong_layouts_fail_clearly(tmp_path: Path) -> None:
    save_motion_extractor(random_motion_extractor(TINY_ARCH, seed=0), tmp_path)
    (tmp_path / CONFIG_FILE).unlink()  # tiny weights read as the official architecture
    with pytest.raises(
        CheckpointMismatchError,
        match=r"mis-shaped: detector\.downsample_layers\.0\.0\.weight: "
        r"checkpoint \(8, 3, 4, 4\) vs model \(96, 3, 4, 4\)",
    ):
        load_motion_extractor(tmp_path)
    sd = torch.load(tmp_path / WEIGHTS_FILE, weights_only=True)
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pth")
    with pytest.raises(
        CheckpointError, match=r"non-tensor entries \(1\): 'state_dict' \(\w*[Dd]ict\)"
    ):
        load_motion_extractor(tmp_path / "wrapped.pth")
    with pytest.raises(ModelUnavailableError, match="tiny_random"):
        load_motion_extractor(tmp_path / "nowhere")


def test_extract_motion_shape_range_and_batch_invariance() -> None:
    model = random_motion_extractor(TINY_ARCH, seed=1)
    frames = _frames(5, seed=2)
    one = extract_motion(model, frames, batch_size=1)
    four = extract_motion(model, frames, batch_size=4)
    assert one.shape == (5, MOTION_DIM) == (5, 133)
    assert one.dtype == np.float32
    assert np.isfinite(one).all()
    np.testing.assert_allclose(one, four, atol=1e-5, rtol=0)
    cols = motion_slices()
    angles = one[:, cols["pitch"].start : cols["roll"].stop]
    assert np.all(np.abs(angles) <= MAX_DEGREES)
    with torch.inference_mode():
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
        raw = model(x)
    np.testing.assert_allclose(one[:, cols["kp"]], raw["kp"].numpy(), atol=1e-5)
    np.testing.assert_allclose(one[:, cols["scale"]], raw["scale"].numpy(), atol=1e-5)
    assert extract_motion(model, frames[:0]).shape == (0, 133)
    with pytest.raises(ValueError, match="256"):
        extract_motion(model, frames[:, :128])


def test_motion_layout_is_contiguous_and_complete() -> None:
    assert [name for name, _ in MOTION_LAYOUT] == [
        "kp",
        "exp",
        "pitch",
        "yaw",
        "roll",
        "t",
        "scale",
    ]
    cols = motion_slices()
    assert cols["kp"] == slice(0, 63)
    assert cols["exp"] == slice(63, 126)
    assert (cols["pitch"], cols["yaw"], cols["roll"]) == (
        slice(126, 127),
        slice(127, 128),
        slice(128, 129),
    )
    assert cols["t"] == slice(129, 132)
    assert cols["scale"] == slice(132, 133)


@pytest.mark.parametrize(("bin_index", "degrees"), [(0, -97.5), (10, -67.5), (33, 1.5), (65, 97.5)])
def test_peaked_bin_decodes_to_its_angle(bin_index: int, degrees: float) -> None:
    logits = torch.full((1, 66), -1e4)
    logits[0, bin_index] = 0.0
    assert headpose_logits_to_degrees(logits).item() == pytest.approx(degrees, abs=1e-4)


def test_spread_logits_decode_to_their_expectation() -> None:
    assert headpose_logits_to_degrees(torch.zeros(2, 66)).tolist() == pytest.approx([0.0, 0.0])
    logits = torch.full((1, 66), -1e4)
    logits[0, 40] = logits[0, 42] = 0.0  # two equal bins: the midpoint, bin 41
    assert headpose_logits_to_degrees(logits).item() == pytest.approx(41 * 3 - 97.5, abs=1e-4)
    with pytest.raises(ValueError, match="66"):
        headpose_logits_to_degrees(torch.zeros(1, 65))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16, torch.float16])
def test_cuda_autocast_matches_cpu(amp_dtype: torch.dtype | None) -> None:
    model = random_motion_extractor(TINY_ARCH, seed=4)
    frames = _frames(6, seed=5)
    cpu = extract_motion(model, frames, batch_size=4)
    gpu = extract_motion(model.to("cuda"), frames, batch_size=4, amp_dtype=amp_dtype)
    assert gpu.dtype == np.float32 and gpu.shape == cpu.shape
    tol = 1e-3 if amp_dtype is None else 0.1
    cols = motion_slices()
    np.testing.assert_allclose(gpu[:, cols["kp"]], cpu[:, cols["kp"]], atol=tol)
    angles = slice(cols["pitch"].start, cols["roll"].stop)
    np.testing.assert_allclose(gpu[:, angles], cpu[:, angles], atol=100 * tol)
