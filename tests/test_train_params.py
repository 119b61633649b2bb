"""Trainable-parameter patterns, per-group learning rates, the stage configs in configs/.

The gradient checks run the loop's own building blocks (``apply_trainable``,
``build_optimizer``) on the tiny musetalk15 UNet for one real optimizer step: what the
patterns freeze gets no gradient and keeps its exact bytes, everything else moves.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from generators import registry
from generators.family_config import DataLayout
from generators.musetalk15.model import predict_latents
from talkforge.config import ConfigError, load_config
from tasks.train_config import train_config
from tasks.train_params import apply_trainable, build_optimizer, build_scheduler
from tests.conftest import REPO

LAYOUT = DataLayout(shapes={"vae_latents": [16, 8, 8], "hubert": [2, 32]})


def _step(cfg) -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.optim.Optimizer]:
    """One optimizer step of the tiny UNet under ``cfg``; returns model, weights before, opt."""
    torch.manual_seed(0)
    family = registry.instantiate(cfg)
    model = family.build(family.make_spec(LAYOUT))
    apply_trainable(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, cfg)
    x, tokens = torch.randn(2, 48, 8, 8), torch.randn(2, 10, 32)
    predict_latents(model, x, tokens).pow(2).mean().backward()
    opt.step()
    return model, before, opt


def test_frozen_patterns_get_no_gradient_and_keep_their_weights():
    cfg = train_config(frozen=[r"mid_block\..*", r"conv_in\..*"])
    model, before, _ = _step(cfg)
    frozen = [n for n, _ in model.named_parameters() if n.startswith(("mid_block.", "conv_in."))]
    assert frozen
    for name, p in model.named_parameters():
        if name in frozen:
            assert not p.requires_grad and p.grad is None, name
            assert torch.equal(p.detach(), before[name]), name
        else:
            assert p.requires_grad and p.grad is not None, name
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert set(moved) == {n for n, _ in model.named_parameters()} - set(frozen)


def test_trainable_patterns_train_only_what_they_name_and_lr_groups_split():
    cfg = train_config(
        trainable=[r"up_blocks\..*", r"conv_out\..*"],
        lr_groups=[{"pattern": r"conv_out\..*", "lr": 1e-2}],
        learning_rate=1e-4,
    )
    model, before, opt = _step(cfg)
    named = dict(model.named_parameters())
    trained = {n for n, p in named.items() if p.requires_grad}
    assert trained == {n for n in named if n.startswith(("up_blocks.", "conv_out."))}
    assert {n for n in named if not torch.equal(named[n].detach(), before[n])} == trained
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups[r"conv_out\..*"]["lr"] == 1e-2 and groups["default"]["lr"] == 1e-4
    ids = {id(p) for p in groups[r"conv_out\..*"]["params"]}
    assert ids == {id(p) for n, p in named.items() if n.startswith("conv_out.")}


def test_family_frozen_parameters_stay_frozen():
    """A parameter the family froze itself is never re-enabled by the patterns."""
    cfg = train_config()
    family = registry.instantiate(cfg)
    model = family.build(family.make_spec(LAYOUT))
    model.conv_in.weight.requires_grad_(False)
    trained = apply_trainable(model, cfg)
    assert "conv_in.weight" not in trained and "conv_in.bias" in trained


def test_patterns_that_match_nothing_or_leave_nothing_fail():
    family = registry.instantiate(train_config())
    model = family.build(family.make_spec(LAYOUT))
    with pytest.raises(ValueError, match=r"unet\\\\\.\.\*"):
        apply_trainable(model, train_config(frozen=[r"unet\..*"]))  # musetalk15 has no 'unet.'
    with pytest.raises(ValueError, match="no parameter"):
        apply_trainable(model, train_config(frozen=[".*"]))
    with pytest.raises(ValueError, match="regular expression"):
        train_config(trainable=["(unclosed"])


def test_linear_schedule_warms_up_then_decays():
    cfg = train_config(steps=10, lr_scheduler="linear", lr_warmup_steps=2, learning_rate=1e-3)
    family = registry.instantiate(cfg)
    model = family.build(family.make_spec(LAYOUT))
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    lrs = []  # the lr each step ran with
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] == pytest.approx(1e-3 / 8)


def test_extends_merges_sections_and_stage_configs_name_their_parents(tmp_path: Path):
    base = tmp_path / "base.yaml"
    base.write_text("train: {steps: 7, batch_size: 3}\nsplit: {seed: 5}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ntrain: {steps: 9, init_from: {stage: stage1}}\n")
    cfg = load_config(child)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.split.seed) == (9, 3, 5)
    assert cfg.train.init_from.stage == "stage1"
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(loop)


STAGE_CONFIGS = sorted((REPO / "configs").glob("musetalk2_*.yaml"))
PARENTS = {
    "musetalk2_stage1_v2.yaml": None,
    "musetalk2_stage2_v2.yaml": "stage1",
    "musetalk2_stage2_migration_adapter_only.yaml": "weights",
    "musetalk2_stage2_migration_encoder_decoder.yaml": "adapter_only",
    "musetalk2_stage2_migration_full_network.yaml": "encoder_decoder",
}


@pytest.mark.skipif(
    "musetalk2" not in registry.names(), reason="the musetalk2 family is not registered yet"
)
@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: p.name)
def test_musetalk2_stage_configs_validate_and_chain(path: Path):
    cfg = load_config(path).train
    assert cfg.family == "musetalk2"
    parent = PARENTS[path.name]
    init = cfg.init_from
    if parent is None:
        assert init is None
    elif parent == "weights":
        assert init.source_family == "musetalk15-official"
    else:
        assert init.stage == parent
    assert sorted(PARENTS) == [p.name for p in STAGE_CONFIGS]


MIGRATION = [p for p in STAGE_CONFIGS if "migration" in p.name]
TINY = [
    "train.unet=tiny",
    "train.audio=hubert",
    "train.losses.l1_pixel=0",  # no VAE decoder / VGG: the gradient check needs no assets
    "train.losses.vgg=0",
    "train.losses.l1_latent=1",
]


@pytest.mark.skipif(
    "musetalk2" not in registry.names(), reason="the musetalk2 family is not registered yet"
)
@pytest.mark.parametrize("path", MIGRATION, ids=lambda p: p.name)
def test_migration_phases_train_exactly_what_their_patterns_name(path: Path, tmp_path: Path):
    """One real musetalk2 training step under each migration config: the parameters its
    patterns name (and only those) get gradients and move; the rest keep their bytes."""
    import re

    from tests.musetalk2_helpers import clip_features, layout

    cfg = load_config(path, TINY).train
    family = registry.instantiate(cfg)
    clips = [clip_features(tmp_path, f"c{i}", 12, seed=i) for i in range(2)]
    spec = family.make_spec(layout("hubert"))
    data = family.load_training_data(spec, clips, None)
    torch.manual_seed(0)
    model = family.build(spec)
    family.prepare_model(model, spec, data)
    apply_trainable(model, cfg)

    def named(name: str) -> bool:
        hit = any(re.fullmatch(p, name) for p in cfg.trainable)
        return hit and not any(re.fullmatch(p, name) for p in cfg.frozen)

    params = dict(model.named_parameters())
    expected = {n for n in params if named(n)}
    assert {n for n, p in params.items() if p.requires_grad} == expected
    assert 0 < len(expected) <= len(params)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = build_optimizer(model, cfg)
    family.training_step(model, family.training_batch(data, 0, 1, 2, 0, 2))["loss"].backward()
    opt.step()
    moved = {n for n, p in params.items() if not torch.equal(p.detach(), before[n])}
    assert moved <= expected and len(moved) >= len(expected) // 2
    for name in set(params) - expected:
        assert params[name].grad is None, name
