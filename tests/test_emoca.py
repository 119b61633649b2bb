"""EMOCA encoder: official key layout, tiny round-trip through the real loader, extraction."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import resnet50

from models.checkpoints import CheckpointError, CheckpointMismatchError
from models.emoca import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    E_FLAME_SLICES,
    FLAME_DIM,
    FLAME_LAYOUT,
    FLAME_SLICES,
    TINY_CONFIG,
    EmocaEncoder,
    build_tiny_emoca,
    extract_flame,
    load_emoca,
)
from models.registry import PROVENANCE_FILE, ModelSpec, ModelUnavailableError, ensure_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("emoca-tiny")
    build_tiny_emoca(directory, seed=3)
    return directory


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: Path) -> EmocaEncoder:
    return load_emoca(tiny_dir)


def _ckpt_state(directory: Path) -> dict[str, torch.Tensor]:
    return torch.load(directory / CHECKPOINT_FILE, weights_only=True)["state_dict"]


def _frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def test_flame_layout() -> None:
    assert FLAME_LAYOUT == (("shape", 100), ("expression", 50), ("pose", 6), ("cam", 3))
    assert FLAME_DIM == 159
    assert FLAME_SLICES["cam"] == slice(156, 159)
    assert E_FLAME_SLICES["exp"] == slice(150, 200)
    assert E_FLAME_SLICES["light"] == slice(209, 236)


def test_full_model_key_layout_and_size() -> None:
    with torch.device("meta"):
        model = EmocaEncoder()
        reference = resnet50(weights=None)
    shapes = {f"deca.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["deca.E_flame.encoder.conv1.weight"] == (64, 3, 7, 7)
    assert shapes["deca.E_flame.layers.0.weight"] == (1024, 2048)
    assert shapes["deca.E_flame.layers.2.weight"] == (236, 1024)
    assert shapes["deca.E_expression.layers.0.weight"] == (1024, 2048)
    assert shapes["deca.E_expression.layers.2.weight"] == (50, 1024)
    assert shapes["deca.E_expression.encoder.layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert not any(".layers.1." in k or ".fc." in k for k in shapes)
    # each backbone is exactly torchvision's resnet50 without its classifier
    backbone = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    backbone = {k: s for k, s in backbone.items() if not k.startswith("fc.")}
    for name in ("E_flame", "E_expression"):
        prefix = f"deca.{name}.encoder."
        assert {k.removeprefix(prefix): s for k, s in shapes.items() if k.startswith(prefix)} == (
            backbone
        )
    resnet50_backbone = 25_557_032 - (2048 * 1000 + 1000)  # torchvision resnet50 minus fc
    assert resnet50_backbone == 23_508_032
    mlp_flame = 2048 * 1024 + 1024 + 1024 * 236 + 236
    mlp_expression = 2048 * 1024 + 1024 + 1024 * 50 + 50
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 2 * resnet50_backbone + mlp_flame + mlp_expression == 51_505_566


def test_tiny_round_trip_through_registry(tmp_path: Path) -> None:
    spec = ModelSpec(family="emoca", source="models/emoca-tiny", tiny_random=True, seed=3)
    path = ensure_model(spec, tmp_path)
    assert path is not None
    assert json.loads((path / PROVENANCE_FILE).read_text())["origin"] == "random-init"
    assert json.loads((path / CONFIG_FILE).read_text())["blocks"] == [1, 1, 1, 1]
    state = _ckpt_state(path)
    assert state and all(k.startswith(("deca.E_flame.", "deca.E_expression.")) for k in state)
    model = load_emoca(path)
    assert model.config == TINY_CONFIG
    assert not model.training
    loaded = model.state_dict()
    assert loaded.keys() == {k.removeprefix("deca.") for k in state}
    for key, value in state.items():
        assert torch.equal(loaded[key.removeprefix("deca.")], value), key


def test_loader_ignores_other_modules_and_reads_safetensors(
    tiny_dir: Path, tiny_model: EmocaEncoder, tmp_path: Path
) -> None:
    state = _ckpt_state(tiny_dir)
    extra = {
        "deca.D_detail.layers.0.weight": torch.zeros(4, 4),
        "deca.E_detail.encoder.conv1.weight": torch.zeros(4, 3, 7, 7),
        "perceptual_loss.vgg.weight": torch.zeros(2),
    }
    (tmp_path / "lightning").mkdir()
    torch.save(
        {"state_dict": {**state, **extra}, "epoch": 7, "global_step": 123},
        tmp_path / "lightning" / "deca-epoch=07.ckpt",
    )
    (tmp_path / "lightning" / CONFIG_FILE).write_text((tiny_dir / CONFIG_FILE).read_text())
    # a plain (prefix-free) state dict in safetensors
    (tmp_path / "st").mkdir()
    save_file(
        {k.removeprefix("deca."): v for k, v in state.items()}, tmp_path / "st" / "e.safetensors"
    )
    (tmp_path / "st" / CONFIG_FILE).write_text((tiny_dir / CONFIG_FILE).read_text())
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = tiny_model(x)
        for sub in ("lightning", "st"):
            assert torch.equal(load_emoca(tmp_path / sub)(x), expected), sub


def test_checkpoint_without_num_batches_tracked_loads(tiny_dir: Path, tmp_path: Path) -> None:
    state = {k: v for k, v in _ckpt_state(tiny_dir).items() if "num_batches_tracked" not in k}
    torch.save({"state_dict": state}, tmp_path / CHECKPOINT_FILE)
    (tmp_path / CONFIG_FILE).write_text((tiny_dir / CONFIG_FILE).read_text())
    load_emoca(tmp_path / CHECKPOINT_FILE)


def test_missing_unexpected_and_misshaped_keys_are_reported(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text((tiny_dir / CONFIG_FILE).read_text())
    state = _ckpt_state(tiny_dir)
    state.pop("deca.E_expression.layers.2.bias")
    state["deca.E_flame.encoder.fc.weight"] = torch.zeros(3, 3)
    state["deca.E_flame.layers.2.weight"] = torch.zeros(53, 32)
    torch.save({"state_dict": state}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(CheckpointMismatchError) as info:
        load_emoca(tmp_path)
    message = str(info.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped keys" in message
    assert "\n  missing: E_expression.layers.2.bias\n" in message
    assert "\n  unexpected: E_flame.encoder.fc.weight\n" in message
    assert "\n  mis-shaped: E_flame.layers.2.weight: checkpoint (53, 32) vs model (236, 32)" in (
        message
    )


def test_full_architecture_is_default_without_config(tiny_dir: Path, tmp_path: Path) -> None:
    torch.save({"state_dict": _ckpt_state(tiny_dir)}, tmp_path / "tiny.ckpt")
    with pytest.raises(
        CheckpointMismatchError, match=r"\n  missing: E_flame\.encoder\.layer1\.1\."
    ):
        load_emoca(tmp_path / "tiny.ckpt")


def test_pickled_objects_are_refused_with_a_conversion_hint(tmp_path: Path) -> None:
    hparams = Namespace(lr=1e-4)  # stands in for a Lightning checkpoint's pickled objects
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, tmp_path / "real.ckpt")
    with pytest.raises(
        CheckpointError,
        match=r"(?s)refused .*real\.ckpt.*argparse\.Namespace"
        r".*talkforge models import emoca FILE\.ckpt.*restricted unpickler",
    ):
        load_emoca(tmp_path / "real.ckpt")


FOREIGN_MODULE = """
import pathlib
MARK = pathlib.Path(__file__).with_name("ran")


class ModelCheckpoint:  # a Lightning callback: its code must never run on import
    def __init__(self, *args, **kwargs):
        MARK.write_text("init")

    def __setstate__(self, state):
        MARK.write_text("setstate")


class AttributeDict(dict):  # Lightning's hyper-parameter container
    def __setitem__(self, key, value):
        MARK.write_text("setitem")


class Payload:  # what a hostile checkpoint would hide: exec on unpickling
    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({str(MARK)!r}).write_text('exec')",))
"""


def _lightning_checkpoint(tiny_dir: Path, root: Path, monkeypatch) -> tuple[Path, Path]:
    """A Lightning-style ``.ckpt`` of the tiny EMOCA with foreign objects, built with a module
    that is gone when the checkpoint is read; returns (checkpoint, the module's marker)."""
    import importlib
    import sys

    package = root / "fake_lightning"
    package.mkdir()
    (package / "__init__.py").write_text(FOREIGN_MODULE)
    monkeypatch.syspath_prepend(str(root))
    foreign = importlib.import_module("fake_lightning")
    callback = foreign.ModelCheckpoint.__new__(foreign.ModelCheckpoint)
    callback.__dict__.update(best_model_score=torch.tensor(0.25), dirpath="/ckpt")
    hparams = foreign.AttributeDict()
    dict.update(hparams, {"n_exp": 50, "backbone": "ResNet50"})
    state = _ckpt_state(tiny_dir)
    state["deca.D_detail.conv.weight"] = torch.ones(3)  # not an encoder: left out
    checkpoint = root / "official" / "EMOCA_v2_lr_mse_20.ckpt"
    checkpoint.parent.mkdir()
    (checkpoint.parent / CONFIG_FILE).write_text((tiny_dir / CONFIG_FILE).read_text())
    torch.save(
        {
            "epoch": 20,
            "pytorch-lightning_version": "1.4.9",
            "state_dict": state,
            "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": callback},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}, "lr": 1e-4}],
            "hyper_parameters": hparams,
            "payload": foreign.Payload(),
        },
        checkpoint,
    )
    marker = package / "ran"
    assert not marker.exists()
    del sys.modules["fake_lightning"]
    monkeypatch.syspath_prepend(str(root / "elsewhere"))
    sys.path.remove(str(root))
    return checkpoint, marker


def test_official_lightning_checkpoint_imports_through_a_restricted_unpickler(
    tiny_dir: Path, tiny_model: EmocaEncoder, tmp_path: Path, monkeypatch
) -> None:
    """`talkforge models import emoca X.ckpt`: tensors kept, foreign objects never built."""
    import sys

    from typer.testing import CliRunner

    from talkforge.cli import app

    checkpoint, marker = _lightning_checkpoint(tiny_dir, tmp_path, monkeypatch)
    with pytest.raises(CheckpointError, match="talkforge models import emoca"):
        load_emoca(checkpoint)  # the loader itself never unpickles objects
    cfg = tmp_path / "emoca.yaml"
    cfg.write_text(
        f"project: {{data_root: {tmp_path / 'data'}}}\n"
        "features:\n  flame: {family: emoca, source: ./models/emoca, tiny_random: false}\n"
    )
    result = CliRunner().invoke(
        app, ["models", "import", "emoca", str(checkpoint), "--config", str(cfg)]
    )
    assert result.exit_code == 0, result.output
    assert not marker.exists() and "fake_lightning" not in sys.modules  # nothing ran
    dest = tmp_path / "data" / "models" / "emoca"
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [".talkforge-import.json", CONFIG_FILE, "emoca.safetensors"]
    )
    record = json.loads((dest / ".talkforge-import.json").read_text())
    assert record["converted"]["dropped_objects"] == [
        "builtins.exec",
        "fake_lightning.AttributeDict",
        "fake_lightning.ModelCheckpoint",
    ]
    assert record["converted"]["tensors_left_out"] == 1
    assert record["source_files"][checkpoint.name]["sha256"]
    frames = _frames(3)
    np.testing.assert_array_equal(
        extract_flame(load_emoca(dest), frames), extract_flame(tiny_model, frames)
    )
    verify = CliRunner().invoke(app, ["models", "verify", "emoca", "--config", str(cfg)])
    assert verify.exit_code == 0, verify.output


def test_import_refuses_a_checkpoint_that_does_not_fit(tiny_dir: Path, tmp_path: Path) -> None:
    from models.emoca import convert_for_import

    state = _ckpt_state(tiny_dir)
    state["deca.E_flame.layers.2.weight"] = torch.zeros(5, 32)
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    (tmp_path / CONFIG_FILE).write_text((tiny_dir / CONFIG_FILE).read_text())
    with pytest.raises(CheckpointMismatchError, match=r"mis-shaped: E_flame\.layers\.2\.weight"):
        convert_for_import(tmp_path / "bad.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "none.ckpt")
    with pytest.raises(ModelUnavailableError, match="no E_flame/E_expression"):
        convert_for_import(tmp_path / "none.ckpt", tmp_path / "out")
    assert convert_for_import(tiny_dir, tmp_path / "copy") is None  # a folder is copied


def test_missing_or_ambiguous_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="not found"):
        load_emoca(tmp_path / "absent")
    with pytest.raises(ModelUnavailableError, match="no EMOCA weight files"):
        load_emoca(tmp_path)
    for name in ("a.ckpt", "b.pt"):
        torch.save({}, tmp_path / name)
    with pytest.raises(ModelUnavailableError, match="2 candidate"):
        load_emoca(tmp_path)


def test_extract_flame_shape_batching_and_slices(tiny_model: EmocaEncoder) -> None:
    frames = _frames(4)
    one = extract_flame(tiny_model, frames, batch_size=1)
    three = extract_flame(tiny_model, frames, batch_size=3)
    assert one.shape == (4, 159) and one.dtype == np.float32
    assert np.isfinite(one).all()
    np.testing.assert_allclose(three, one, rtol=1e-5, atol=1e-5)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        code = tiny_model.E_flame(x).numpy()
        expression = tiny_model.E_expression(x).numpy()
    s, e = FLAME_SLICES, E_FLAME_SLICES
    np.testing.assert_allclose(three[:, s["expression"]], expression, rtol=1e-5, atol=1e-5)
    assert not np.allclose(three[:, s["expression"]], code[:, e["exp"]], atol=1e-3)
    for name in ("shape", "pose", "cam"):
        np.testing.assert_allclose(three[:, s[name]], code[:, e[name]], rtol=1e-5, atol=1e-5)


def test_extract_flame_rejects_bad_input(tiny_model: EmocaEncoder) -> None:
    assert extract_flame(tiny_model, _frames(0)).shape == (0, FLAME_DIM)
    with pytest.raises(ValueError, match="face crops"):
        extract_flame(tiny_model, np.zeros((2, 256, 256, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        extract_flame(tiny_model, np.zeros((2, 224, 224, 3), np.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16, None])
def test_extract_flame_runs_under_the_configured_amp_dtype(tiny_dir: Path, amp) -> None:
    """features.amp_dtype reaches EMOCA (it used to be float16 whatever the config said)."""
    model = load_emoca(tiny_dir, device="cuda")
    seen: list[torch.dtype] = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    handle = conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        extract_flame(model, _frames(2), amp_dtype=amp)
    finally:
        handle.remove()
    assert set(seen) == {amp or torch.float32}
