"""The wing: family registry, the train config union, the musetalk15 surface, the import rule."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from generators import registry
from generators.family_config import DataLayout, FamilyConfig, ModelSpec
from generators.musetalk15.config import Musetalk15Config
from generators.musetalk15.family import Musetalk15Family
from generators.musetalk15.model import (
    audio_window_tokens,
    build_unet_from_spec,
    predict_latents,
    unet_input,
)
from talkforge.config import ConfigError, parse_config

WING = Path(__file__).resolve().parents[1] / "generators"
# The wing may import the standard library and these; never the pipeline layers above it.
ALLOWED = {"torch", "diffusers", "transformers", "peft", "numpy", "safetensors", "pydantic"}
ALLOWED |= {"models", "generators", "__future__"}
FORBIDDEN = {"tasks", "storage", "talkforge", "flows", "prefect", "ray"}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
    return out


def test_the_wing_imports_nothing_from_the_pipeline_layers():
    files = sorted(WING.rglob("*.py"))
    assert WING / "registry.py" in files and WING / "musetalk15" / "family.py" in files
    bad = []
    for path in files:
        for module in _imports(path):
            top = module.split(".")[0]
            if top in FORBIDDEN or (top not in ALLOWED and top not in sys.stdlib_module_names):
                bad.append(f"{path.relative_to(WING.parent)}: import {module}")
    assert not bad, "\n".join(bad)


def test_the_import_scan_sees_nested_and_from_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from tasks.base import Stage\n    import ray.util\n")
    assert _imports(probe) == ["tasks.base", "ray.util"]


def test_default_train_section_is_musetalk15_and_keeps_its_fields():
    cfg = parse_config({}, "<defaults>")
    assert cfg.train.family == "musetalk15"
    assert isinstance(cfg.train, Musetalk15Config)
    assert (cfg.train.audio_window_frames, cfg.train.unet, cfg.train.steps) == (2, "tiny", 20)
    again = parse_config({"train": {"family": "musetalk15", "unet": "full", "steps": 3}}, "x")
    assert (again.train.unet, again.train.steps) == ("full", 3)
    assert registry.family_config(again.train) == Musetalk15Config(unet="full")


def test_unknown_family_is_refused_at_start_naming_the_registered_ones():
    with pytest.raises(ConfigError) as exc:
        parse_config({"train": {"family": "musetalk9", "steps": 3}}, "run.yaml")
    msg = str(exc.value)
    assert "run.yaml" in msg and "train" in msg and "'musetalk9'" in msg
    assert "musetalk15" in msg


def test_a_field_the_selected_family_does_not_have_is_refused():
    with pytest.raises(ConfigError) as exc:
        parse_config({"train": {"family": "musetalk15", "mhc_streams": 4}}, "run.yaml")
    assert "mhc_streams" in str(exc.value)
    with pytest.raises(ConfigError):
        parse_config({"train": {"unet": "huge"}}, "run.yaml")


class _Spec(ModelSpec):
    family: Literal["probe"] = "probe"


class _Cfg(FamilyConfig):
    family: Literal["probe"] = "probe"
    steps: int = 1  # clashes with the train stage's own field


def test_register_checks_tags_and_union_refuses_a_stage_field_clash(monkeypatch):
    def family(name, cfg, spec):
        return type(
            "Probe",
            (Musetalk15Family,),
            {"name": name, "config_type": cfg, "spec_type": spec},
        )

    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    with pytest.raises(TypeError):  # name and config tag disagree
        registry.register(family("other", _Cfg, _Spec))
    with pytest.raises(ValueError):  # a second class under a taken name
        registry.register(family("musetalk15", Musetalk15Config, Musetalk15Family.spec_type))
    builtin = registry.names()
    registry.register(family("probe", _Cfg, _Spec))
    assert registry.names() == sorted([*builtin, "probe"])
    assert {"musetalk15", "musetalk2", "dualforce"} <= set(builtin)

    class Stage(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        steps: int = 20

    with pytest.raises(TypeError, match="steps"):
        registry.config_union(Stage)
    plain = TypeAdapter(registry.config_union())
    assert plain.validate_python({"family": "probe"}).steps == 1
    with pytest.raises(ValidationError):
        plain.validate_python({"family": "probe", "unet": "tiny"})  # musetalk15's field


def test_get_unknown_family_names_the_known_ones():
    with pytest.raises(KeyError, match="musetalk15"):
        registry.get("nope")


def _family_and_spec():
    family = registry.get("musetalk15")()
    layout = DataLayout(shapes={"vae_latents": [4, 8, 8], "hubert": [2, 16]})
    return family, family.make_spec(layout)


def test_musetalk15_layout_checks_and_spec_round_trip():
    family, spec = _family_and_spec()
    assert spec.family == "musetalk15" and spec.unet_config["in_channels"] == 12
    assert family.parse_spec(spec.to_json()) == spec
    with pytest.raises(ValueError, match="odd"):
        family.make_spec(DataLayout(shapes={"vae_latents": [4, 7, 8], "hubert": [2, 16]}))
    with pytest.raises(ValueError):
        family.parse_spec(spec.to_json().replace('"musetalk15"', '"other"'))


def test_musetalk15_step_and_sample_are_the_one_step_regression(tmp_path):
    """The family's loss is MSE of the timestep-0 prediction; its sample is that prediction
    on (masked target, fixed reference, prior); weights round-trip strictly."""
    family, spec = _family_and_spec()
    torch.manual_seed(0)
    model = family.build(spec).eval()
    x, tokens = torch.randn(3, 12, 8, 8), torch.randn(3, 10, 16)
    target = torch.randn(3, 4, 8, 8)
    losses = family.training_step(model, {"input": x, "audio": tokens, "target": target})
    with torch.no_grad():
        direct = predict_latents(model, x, tokens)
        assert torch.equal(losses["loss"], torch.nn.functional.mse_loss(direct, target))

    path = tmp_path / "w.safetensors"
    family.save_weights(path, model, spec)
    loaded = family.load_model(path, spec)
    assert not loaded.training
    small = family.make_spec(DataLayout(shapes={"vae_latents": [2, 8, 8], "hubert": [2, 16]}))
    family.save_weights(tmp_path / "small.safetensors", build_unet_from_spec(small), small)
    with pytest.raises(RuntimeError):  # strict: weights of another layout do not load
        family.load_model(tmp_path / "small.safetensors", spec)

    latents, hubert = torch.randn(6, 4, 8, 8).half(), torch.randn(6, 2, 16)
    bank_prior = torch.randn(6, 4, 4, 8)
    clip = family.prepare_clip(spec, {"vae_latents": latents, "hubert": hubert}, _bank(), 99)
    clip.tensors.prior = bank_prior  # pin the prior so the check below is exact
    idx = torch.tensor([1, 4])
    with torch.no_grad():
        got = family.sample(loaded, clip, idx)
        ref = latents[5:6].float().expand(2, -1, -1, -1)  # reference frame clamped to T-1
        want = predict_latents(
            model,
            unet_input(latents[idx].float(), ref, bank_prior[idx]),
            audio_window_tokens(hubert, idx, spec.audio_window_frames),
        )
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="do not fit"):
        family.prepare_clip(spec, {"vae_latents": latents[:, :2], "hubert": hubert}, _bank(), 0)


def _bank() -> dict[str, torch.Tensor]:
    """A minimal valid memory bank for 16-d audio and (4, 4, 8) mouth values."""
    import numpy as np

    from generators.blocks.engram_hash import make_multipliers, make_primes

    primes = make_primes(5, 1, 2)
    return {
        "codebook": torch.randn(3, 16),
        "multipliers": torch.from_numpy(make_multipliers(0, 2, 4)),
        "orders": torch.tensor([2]),
        "primes": torch.from_numpy(primes),
        "offsets": torch.from_numpy(np.array([[0, int(primes[0, 0])]], dtype=np.int64)),
        "pad_id": torch.tensor([3]),
        "table_values": torch.randn(int(primes.sum()), 4, 4, 8),
        "table_counts": torch.ones(int(primes.sum()), dtype=torch.int64),
        "unigram_values": torch.randn(3, 4, 4, 8),
        "unigram_counts": torch.ones(3, dtype=torch.int64),
        "global_mean": torch.zeros(4, 4, 8),
    }
