"""Typed config: bad keys, types and values fail at start naming file, key and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from talkforge.config import ConfigError, load_config
from talkforge.engine import select_stages
from tests.conftest import REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_default_config_validates_and_round_trips() -> None:
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg.faces.crop_size_px == 256
    again = load_config(None, None).model_validate(yaml.safe_load(cfg.to_yaml()))
    dump = {"mode": "json", "exclude": {"project"}}
    assert again.model_dump(**dump) == cfg.model_dump(**dump)
    assert again.data_root == cfg.data_root  # stored resolved: absolute
    for stage in ("download", "faces", "quality", "features", "engram", "train", "generate"):
        # a resumed run reloads the stored YAML: its keys must not change
        assert again.stage(stage).params_hash() == cfg.stage(stage).params_hash(), stage


@pytest.mark.parametrize(
    ("text", "key", "expect"),
    [
        ("faces:\n  detect_evry_k: 3\n", "faces.detect_evry_k", "Extra inputs"),
        ("faces:\n  detect_every_k: many\n", "faces.detect_every_k", "valid integer"),
        ("faces:\n  detector: dlib\n", "faces.detector", "mtcnn"),
        ("execution:\n  shard_size: 0\n", "execution.shard_size", "greater than or equal"),
        ("quality:\n  resources: {num_gpus: -1}\n", "quality.resources.num_gpus", "greater"),
    ],
)
def test_bad_config_names_file_key_and_expectation(
    tmp_path: Path, text: str, key: str, expect: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and key in message and expect in message


def test_not_a_mapping_and_bad_yaml_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "faces: [\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_apply_and_are_validated(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "default.yaml", ["faces.detect_every_k=3"])
    assert cfg.faces.detect_every_k == 3
    with pytest.raises(ConfigError, match=r"faces\.detect_every_k"):
        load_config(REPO / "configs" / "default.yaml", ["faces.detect_every_k=x"])
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        load_config(None, ["faces"])


def test_resources_do_not_change_the_params_hash() -> None:
    base = load_config(None)
    more = load_config(None, ["faces.resources.num_workers=4", "faces.resources.batch_size=64"])
    other = load_config(None, ["faces.detect_every_k=2"])
    assert base.faces.params_hash() == more.faces.params_hash()
    assert base.faces.params_hash() != other.faces.params_hash()


def test_readme_gpu_node_features_config_validates_and_keeps_the_hash(tmp_path: Path) -> None:
    """The README's own_pools example is valid, and placement never invalidates features."""
    text = (REPO / "README.md").read_text()
    block = text.split("```yaml\nfeatures:\n", 1)[1].split("```", 1)[0]
    cfg = load_config(write(tmp_path, "features:\n" + block))
    assert cfg.features.pools.placement == "own_pools"
    assert cfg.features.pools.vae_latents.num_gpus == 0.4
    base = load_config(None)
    assert cfg.features.params_hash() == base.features.params_hash()
    amp = load_config(None, ["features.amp_dtype=float16"])
    assert amp.features.params_hash() != base.features.params_hash()


def test_stage_selection() -> None:
    assert select_stages(None, "quality", "engram") == ["quality", "features", "engram"]
    assert select_stages(["train", "download"]) == ["download", "train"]
    with pytest.raises(ValueError, match="unknown stage"):
        select_stages(["fces"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates_at_its_size_and_at_the_tiny_trial_size(path: Path) -> None:
    """Each file loads as written, and the DualForce stages also with the documented tiny CPU
    override (a seed-size value the tiny preset cannot hold, e.g. 8 shallow blocks of 3,
    fails here rather than inside a training run)."""
    train = load_config(path).train
    if train.family == "dualforce":
        full, tiny = train.arch(), load_config(path, ["train.size=tiny"]).train.arch()
        assert tiny.num_layers < full.num_layers
        assert 0 < tiny.fusion_depth <= tiny.num_layers and full.fusion_depth == 8


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_local_model_of_a_shipped_config_can_be_imported(path: Path, tmp_path: Path) -> None:
    """A weights source meant as a folder under data_root must not read as a hub id, or
    ``talkforge models import`` refuses it ("is a hub id; use download")."""
    from talkforge.weights import needed_models

    config = load_config(path, [f"project.data_root={tmp_path}"])
    hub = [m.spec.source for m in needed_models(config) if m.path is None]
    assert not [s for s in hub if s.split("/")[0] in {"models", "data", "weights"}], hub
