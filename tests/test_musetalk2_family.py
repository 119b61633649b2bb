"""The musetalk2 family surface: config presets, data, steps with frozen models, sampling,
weights I/O, stage freezing, parent / official weight transfer, and DDP gradient sync."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import load_file, save_file

from generators import registry
from generators.blocks.engram_hash import read_bank
from generators.family import unwrap
from generators.family_config import TrainingAssets
from generators.musetalk2.config import Musetalk2Config
from generators.musetalk2.family import Musetalk2Family
from models.registry import ModelSpec, ensure_model
from tests.musetalk2_helpers import CTC_VOCAB, clip_features, layout, memory_bank

NO_PIXELS = {"l1_pixel": 0.0, "vgg": 0.0, "sync": 0.0, "l1_latent": 1.0}
SMALL = {"block_out_channels": [16, 32], "audio": "hubert"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt2")
    clips = [clip_features(root, f"c{i}", 40, seed=i) for i in range(2)]
    return root, clips, memory_bank(clips, root / "bank.safetensors")


def _family(**cfg) -> Musetalk2Family:
    return Musetalk2Family(Musetalk2Config(**(SMALL | cfg)))


def _ready(fam: Musetalk2Family, cache, seed: int = 0):
    _, clips, bank = cache
    spec = fam.make_spec(layout(fam.config.audio))
    torch.manual_seed(seed)
    model = fam.build(spec)
    data = fam.load_training_data(spec, clips, str(bank))
    fam.prepare_model(model, spec, data)
    return spec, model, data


def test_presets_fill_what_the_user_leaves_out_and_the_union_validates_it():
    union = TypeAdapter(registry.config_union())
    s2 = union.validate_python({"family": "musetalk2", "training_stage": "stage2"})
    assert s2.n_sample_frames == 16 and s2.losses.sync == 0.05 and s2.sampling.dms.enabled
    assert s2.mhc.enabled and s2.engram.enabled and s2.gated_attention.enabled and s2.dsa.enabled
    s1 = union.validate_python({"family": "musetalk2"})
    assert s1.training_stage == "stage1" and s1.n_sample_frames == 1 and not s1.mhc.enabled
    assert (s1.losses.l1_pixel, s1.losses.pmf, s1.losses.vgg, s1.losses.sync) == (1, 0.1, 0.01, 0)
    mine = union.validate_python(
        {"family": "musetalk2", "training_stage": "stage2", "mhc": {"streams": 2}}
    )
    assert mine.mhc.enabled and mine.mhc.streams == 2
    with pytest.raises(ValidationError, match="n_sample_frames"):
        union.validate_python({"family": "musetalk2", "dsa": {"enabled": True}})
    with pytest.raises(ValidationError):
        union.validate_python({"family": "musetalk2", "training_stage": "stage9"})
    assert Musetalk2Config.model_validate_json(s2.model_dump_json()) == s2


def test_features_and_assets_follow_the_config_and_the_spec():
    s1 = Musetalk2Family(Musetalk2Config())
    assert s1.features == {
        "vae_latents": "latents",
        "sensevoice": "features",
        "liveportrait_motion": "motion",
        "emoca_flame": "flame",
    }
    assert s1.extra_tensors == {"sensevoice": ("frame_index",)} and not s1.uses_memory_bank
    assert set(s1.config.asset_specs()) == {"vgg19"} and s1.needs_vae_decoder()
    s2 = Musetalk2Family(Musetalk2Config(training_stage="stage2", audio="hubert"))
    assert set(s2.features) == {"vae_latents", "hubert", "liveportrait_motion", "emoca_flame"}
    assert s2.uses_memory_bank and set(s2.config.asset_specs()) == {"vgg19", "syncnet"}
    spec = s2.make_spec(layout("hubert"))
    default = registry.get("musetalk2")()  # what a stage holding only the checkpoint has
    assert default.features_for(spec) == s2.features and default.uses_memory_bank_for(spec)
    lp = Musetalk2Family(Musetalk2Config(perceptual="lpips", losses={"vgg": 0, "lpips": 0.1}))
    assert set(lp.config.asset_specs()) == {"lpips"}
    assert not _family(losses=NO_PIXELS).needs_vae_decoder()


def test_batches_depend_on_seed_and_step_only_and_ranks_slice_one_global_batch(cache):
    fam = _family(training_stage="stage2", n_sample_frames=4, losses=NO_PIXELS | {"sync": 0})
    _spec, _, data = _ready(fam, cache)
    whole = fam.training_batch(data, 3, 7, 4, 0, 4)
    again = fam.training_batch(data, 3, 7, 4, 0, 4)
    parts = [fam.training_batch(data, 3, 7, 4, r, r + 2) for r in (0, 2)]
    for k, v in whole.items():
        assert torch.equal(v, again[k])
        if v.ndim and k != "frames":
            assert torch.equal(v, torch.cat([parts[0][k], parts[1][k]])), k
    assert whole["target"].shape == (16, 4, 8, 8) and whole["audio"].shape == (16, 10, 12)
    assert whole["engram_rows"].shape == (16, 8) and int(whole["frames"]) == 4
    t = whole["t"].view(4, 4)
    assert (t == t[:, :1]).all() and (whole["r"] <= whole["t"]).all()
    assert not torch.equal(whole["noise"], fam.training_batch(data, 3, 8, 4, 0, 4)["noise"])
    mask = whole["mask"][:, 0]
    assert ((mask.sum(-1) == 0) | (mask.sum(-1) == 8)).all()  # whole rows, DMS-moved edge


def _assets(root: Path, syncnet: bool) -> TrainingAssets:
    paths = {
        "vgg19": ensure_model(ModelSpec(family="vgg19", source="vgg", tiny_random=True), root),
    }
    if syncnet:
        spec = ModelSpec(family="syncnet-latentsync", source="sn", tiny_random=True)
        paths["syncnet"] = ensure_model(spec, root)
    vae = ensure_model(ModelSpec(family="vae-sd", source="vae", tiny_random=True), root)
    return TrainingAssets(vae=str(vae), models={k: str(v) for k, v in paths.items()})


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_training_step_combines_the_stage_losses_through_the_frozen_models(cache, stage):
    fam = _family(training_stage=stage, perceptual_options={"input_size": 128})
    _spec, model, data = _ready(fam, cache)
    with pytest.raises(ValueError, match="VAE"):
        fam.training_step(model, fam.training_batch(data, 0, 1, 1, 0, 1))
    fam.set_training_assets(_assets(cache[0], syncnet=stage == "stage2"))
    batch = fam.training_batch(data, 0, 1, 1, 0, 1)
    out = fam.training_step(model, batch)
    w = fam.config.losses
    want = {"pmf", "pmf_raw_u", "l1_latent", "l1_pixel", "vgg"}
    if stage == "stage2":
        want |= {"sync", "indexer_kl"}
    assert set(out) == want | {"loss"}
    total = sum(getattr(w, k) * out[k] for k in ("pmf", "l1_pixel", "vgg", "l1_latent"))
    if stage == "stage2":
        total = total + w.sync * out["sync"] + w.indexer * out["indexer_kl"]
    torch.testing.assert_close(out["loss"], total)
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_weights_round_trip_and_sampling_is_deterministic_and_batch_independent(cache, tmp_path):
    _root, clips, _bank = cache
    fam = _family(losses=NO_PIXELS)
    spec, model, _ = _ready(fam, cache)
    fam.save_weights(tmp_path / "w.safetensors", model, spec)
    loaded = fam.load_model(tmp_path / "w.safetensors", fam.parse_spec(spec.to_json()))
    feats = {k: load_file(clips[0].paths[k])[n] for k, n in fam.features_for(spec).items()}
    prepared = fam.prepare_clip(spec, feats, None, 3)
    assert (
        prepared.references.shape == (40,)
        and (prepared.references - torch.arange(40)).abs().min() >= 5
    )
    with torch.no_grad():
        a = fam.sample(loaded, prepared, torch.arange(0, 6))
        b = torch.cat([fam.sample(loaded, prepared, torch.arange(i, i + 2)) for i in (0, 2, 4)])
        c = fam.sample(model.eval(), prepared, torch.arange(0, 6))
    assert a.shape == (6, 4, 8, 8)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    del feats["liveportrait_motion"], feats["emoca_flame"]  # no pose: the fixed reference
    assert (fam.prepare_clip(spec, feats, None, 3).references == 3).all()
    with pytest.raises(ValueError, match="do not fit"):
        fam.prepare_clip(spec, feats | {"vae_latents": feats["vae_latents"][:, :2]}, None, 0)


def test_sensevoice_sampling_reads_the_frame_index_and_engram_needs_the_bank(cache):
    _, clips, bank = cache
    fam = Musetalk2Family(Musetalk2Config(block_out_channels=[16, 32], losses=NO_PIXELS))
    spec = fam.make_spec(layout("sensevoice"))
    model = fam.build(spec)
    feats = {k: load_file(clips[0].paths[k])[n] for k, n in fam.features_for(spec).items()}
    with pytest.raises(ValueError, match="frame_index"):
        fam.prepare_clip(spec, feats, None, 0)
    feats["sensevoice/frame_index"] = load_file(clips[0].paths["sensevoice"])["frame_index"]
    with torch.no_grad():
        assert (
            fam.sample(model, fam.prepare_clip(spec, feats, None, 0), torch.arange(3)).shape[0] == 3
        )
    s2 = _family(training_stage="stage2", losses=NO_PIXELS | {"sync": 0})
    spec2 = s2.make_spec(layout("hubert"))
    f2 = {k: load_file(clips[0].paths[k])[n] for k, n in s2.features_for(spec2).items()}
    with pytest.raises(ValueError, match="memory bank"):
        s2.prepare_clip(spec2, f2, None, 0)
    assert s2.prepare_clip(spec2, f2, read_bank(bank), 0).codes.shape == (40,)


def test_engram_ctc_keys_come_from_the_sensevoice_file_without_a_memory_bank(cache):
    _, clips, _ = cache
    off = {"enabled": False}
    fam = _family(
        training_stage="stage2",
        n_sample_frames=2,
        losses=NO_PIXELS | {"sync": 0},
        engram={"keys": "ctc", "vocab_size": CTC_VOCAB},
        mhc=off,
        dsa=off,
        gated_attention=off,
    )
    assert not fam.uses_memory_bank and fam.extra_tensors == {"sensevoice": ("ctc_tokens",)}
    assert set(fam.features) == {
        "vae_latents",
        "hubert",
        "sensevoice",
        "liveportrait_motion",
        "emoca_flame",
    }
    spec = fam.make_spec(layout("hubert"))
    default = registry.get("musetalk2")()
    assert default.extra_tensors_for(spec) == fam.extra_tensors
    assert not default.uses_memory_bank_for(spec)
    torch.manual_seed(0)
    model = fam.build(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = fam.load_training_data(spec, clips, None)  # no bank is read
    fam.prepare_model(model, spec, data)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    module = next(iter(model.levels.engram.values()))
    tokens = load_file(clips[0].paths["sensevoice"])["ctc_tokens"]
    assert len(set(tokens.tolist())) > 3 and 0 in tokens.tolist()  # blanks and tokens
    np.testing.assert_array_equal(data.clips[0].rows.numpy(), module.rows(tokens.numpy()))
    out = fam.training_step(model, fam.training_batch(data, 0, 1, 2, 0, 2))
    out["loss"].backward()
    assert float(module.value.weight.grad.abs().sum()) > 0

    feats = {k: load_file(clips[0].paths[k])[n] for k, n in fam.features_for(spec).items()}
    with pytest.raises(ValueError, match="ctc_tokens"):
        fam.prepare_clip(spec, feats, None, 0)
    prepared = fam.prepare_clip(spec, feats | {"sensevoice/ctc_tokens": tokens}, None, 0)
    np.testing.assert_array_equal(prepared.codes, tokens.numpy())
    shifted = (tokens + 1) % CTC_VOCAB
    other = fam.prepare_clip(spec, feats | {"sensevoice/ctc_tokens": shifted}, None, 0)
    with torch.no_grad():
        module.value.weight.normal_(0, 0.5)
        a = fam.sample(model.eval(), prepared, torch.arange(4))
        b = fam.sample(model, other, torch.arange(4))
    assert not torch.allclose(a, b, atol=1e-4)  # the tokens reach the output
    with pytest.raises(ValueError, match="vocab_size"):
        fam.prepare_clip(spec, feats | {"sensevoice/ctc_tokens": tokens + CTC_VOCAB}, None, 0)
    wrong = _family(
        training_stage="stage2",
        n_sample_frames=2,
        losses=NO_PIXELS | {"sync": 0},
        engram={"keys": "ctc", "vocab_size": 2 * CTC_VOCAB},
        mhc=off,
        dsa=off,
    )
    with pytest.raises(ValueError, match=f"engram.vocab_size to {CTC_VOCAB}"):
        wrong.load_training_data(wrong.make_spec(layout("hubert")), clips, None)
    old = Path(clips[0].paths["sensevoice"]).with_name("old_sensevoice.safetensors")
    save_file(
        {k: v for k, v in load_file(clips[0].paths["sensevoice"]).items() if k != "ctc_tokens"},
        str(old),
    )
    stale = clips[0].model_copy(update={"paths": clips[0].paths | {"sensevoice": str(old)}})
    with pytest.raises(ValueError, match="no tensor 'ctc_tokens'"):
        fam.load_training_data(spec, [stale], None)


@pytest.mark.parametrize(
    ("stage", "frozen_prefix", "trained_prefix"),
    [
        ("adapter_only", "unet.down_blocks.0.resnets.", "adapter."),
        ("encoder_decoder", "unet.mid_block.", "unet.down_blocks."),
    ],
)
def test_migration_phases_freeze_exactly_their_patterns(
    cache, stage, frozen_prefix, trained_prefix
):
    fam = _family(training_stage=stage, losses=NO_PIXELS)
    _spec, model, data = _ready(fam, cache)
    fam.training_step(model, fam.training_batch(data, 0, 1, 2, 0, 2))["loss"].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        if name.startswith(frozen_prefix):
            assert not p.requires_grad, name
    assert any(
        n.startswith(trained_prefix) and p.grad.abs().sum() > 0
        for n, p in model.named_parameters()
        if p.grad is not None
    )
    if stage == "adapter_only":
        trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"adapter", "v_head", "unet"}
        unet = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("unet.")]
        assert all("conv_out" in n or "class_embedding" in n or ".attn2.to_" in n for n in unet)


def test_stage2_starts_from_stage1_and_stage1_adapter_only_from_the_official_15(cache, tmp_path):
    s1 = _family(losses=NO_PIXELS)
    spec1, m1, _ = _ready(s1, cache)
    s1.save_weights(tmp_path / "s1.safetensors", m1, spec1)
    s2 = _family(training_stage="stage2", n_sample_frames=4, losses=NO_PIXELS | {"sync": 0})
    spec2, m2, _ = _ready(s2, cache, seed=1)
    s2.init_from_parent(m2, spec2, tmp_path / "s1.safetensors", spec1.to_json())
    counts = s2.last_transfer
    assert counts["transferred"] == len(m1.state_dict()) and counts["unused"] == 0
    assert counts["initialised"] > 0 and counts["reshaped"] == 0
    torch.testing.assert_close(m2.unet.conv_in.weight, m1.unet.conv_in.weight)
    official = ensure_model(
        ModelSpec(family="musetalk15-official", source="mt15", tiny_random=True), tmp_path
    )
    mig = _family(training_stage="adapter_only", losses=NO_PIXELS)
    spec_m, m3, _ = _ready(mig, cache)
    counts = mig.transfer_weights(m3, spec_m, official, "musetalk15-official")
    assert counts["transferred"] > 0 and counts["reshaped"] > 0  # Whisper 384-d → 12-d audio
    with pytest.raises(ValueError, match="musetalk15-official"):
        mig.transfer_weights(m3, spec_m, official, "dualforce")


# ---------------------------------------------------------------------------- DDP


def _ddp_rank(rank: int, world: int, port: int, root: str, out: str) -> None:
    import torch.distributed as dist

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    fam, model, data = _ddp_setup(Path(root))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    batch = fam.training_batch(data, 0, 1, 2, rank, rank + 1)
    fam.training_step(ddp, batch)["loss"].backward()
    grads = {n: p.grad for n, p in unwrap(ddp).named_parameters()}
    torch.save(grads, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _ddp_setup(root: Path):
    clips = [clip_features(root, f"c{i}", 40, seed=i) for i in range(2)]
    fam = _family(training_stage="stage2", n_sample_frames=2, losses=NO_PIXELS, dsa={"top_k": 8})
    spec = fam.make_spec(layout("hubert"))
    torch.manual_seed(0)
    model = fam.build(spec)
    data = fam.load_training_data(spec, clips, str(root / "bank.safetensors"))
    fam.prepare_model(model, spec, data)
    return fam, model, data


def test_ddp_wrapped_training_step_synchronises_gradients_over_two_gloo_ranks(tmp_path):
    clips = [clip_features(tmp_path, f"c{i}", 40, seed=i) for i in range(2)]
    memory_bank(clips, tmp_path / "bank.safetensors")
    port = 29_500 + os.getpid() % 2000
    mp.spawn(_ddp_rank, args=(2, port, str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    g0, g1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    fam, model, data = _ddp_setup(tmp_path)

    def grads(start: int, stop: int) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        fam.training_step(model, fam.training_batch(data, 0, 1, 2, start, stop))["loss"].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    full, own = grads(0, 2), grads(0, 1)
    for name in full:
        torch.testing.assert_close(g0[name], g1[name], rtol=0, atol=0)  # synchronised
        torch.testing.assert_close(g0[name], full[name], rtol=1e-4, atol=1e-6)  # global batch
    assert any(not torch.allclose(g0[n], own[n], atol=1e-6) for n in full)  # not rank-local
