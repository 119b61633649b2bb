"""The assembled MuseTalk 2.0 network: the walk, each component on/off, reduction to 1.5,
weight transfer, and the paper tests that need the whole network (pMF through the UNet)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from diffusers import UNet2DConditionModel

from generators.blocks.config import PMFConfig
from generators.blocks.dsa import SparseSelfAttention
from generators.blocks.engram import Engram
from generators.blocks.gated_attention import GatedAttnProcessor
from generators.blocks.mhc import HyperConnection
from generators.blocks.pmf import pmf_objective, velocity
from generators.musetalk2.config import Musetalk2Config, make_spec
from generators.musetalk2.levels import Context, run_unet
from generators.musetalk2.network import Musetalk2Net, masked_input
from generators.musetalk2.transfer import transfer_from_official
from models.checkpoints import CheckpointError
from models.musetalk15_official import save_official_unet

C, HW, D, FRAMES = 4, 8, 12, 2
SHAPES = {"vae_latents": [C, HW, HW], "hubert": [2, D]}


def _spec(**over):
    base = {"training_stage": "stage1", "audio": "hubert", "block_out_channels": [16, 32]}
    return make_spec(Musetalk2Config(**(base | over)), SHAPES)


def _net(seed: int = 0, **over) -> Musetalk2Net:
    torch.manual_seed(seed)
    return Musetalk2Net(_spec(**over)).eval()


def _inputs(spec, samples: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = samples * spec.n_sample_frames
    t = torch.rand(samples, generator=g).repeat_interleave(spec.n_sample_frames)
    mask = torch.zeros(n, 1, HW, HW)
    mask[:, :, HW // 2 :] = 1
    out = {
        "target": torch.randn(n, C, HW, HW, generator=g),
        "reference": torch.randn(n, C, HW, HW, generator=g),
        "mask": mask,
        "audio": torch.randn(n, spec.audio_tokens, D, generator=g),
        "z_t": torch.randn(n, C, HW, HW, generator=g),
        "noise": torch.randn(n, C, HW, HW, generator=g),
        "t": t,
        "r": t * 0.5,
        "frames": torch.tensor(spec.n_sample_frames),
        "engram_rows": torch.randint(0, 1000, (n, 8), generator=g),
    }
    return out


def _perturb(module: torch.nn.Module, seed: int = 7, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_the_walk_computes_exactly_what_the_diffusers_unet_computes():
    net = _net()
    _perturb(net.unet.class_embedding)
    x = _inputs(net.spec)
    h = torch.randn(len(x["t"]), net.unet.config.in_channels, HW, HW)
    t, gap = x["t"] * 1000, (x["t"] - x["r"]) * 1000
    emb = net.unet.time_embedding(net.unet.get_time_embed(sample=h, timestep=t))
    emb = emb + net.unet.get_class_embed(sample=h, class_labels=gap)
    ref = net.unet(h, t, encoder_hidden_states=x["audio"], class_labels=gap).sample
    feats = run_unet(net.unet, net.levels, net.unet.conv_in(h), Context(emb, x["audio"], 1))
    torch.testing.assert_close(net.unet.conv_out(feats), ref, rtol=0, atol=1e-6)


COMPONENTS = {
    "mhc": ("levels.hc.", "levels.collapse."),
    "engram": ("levels.engram.",),
    "gated_attention": ("processor.gate",),
    "dsa": ("levels.temporal.",),
}


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_each_component_adds_its_parameters_and_changes_the_output_as_documented(name):
    frames = {"n_sample_frames": FRAMES}
    off = _net(**frames)
    on = _net(**frames, **{name: {"enabled": True, **({"top_k": 8} if name == "dsa" else {})}})
    names_off = {n for n, _ in off.named_parameters()}
    added = {n for n, _ in on.named_parameters()} - names_off
    assert added and all(any(p in n for p in COMPONENTS[name]) for n in added)
    assert names_off <= {n for n, _ in on.named_parameters()}
    on.load_state_dict(off.state_dict(), strict=False)
    x = _inputs(on.spec)
    with torch.no_grad():
        base = off(x)["x_u"]
        fresh = on(x)["x_u"]
    if name == "gated_attention":  # σ(init_bias) < 1 scales every attention output
        assert not torch.allclose(fresh, base, atol=1e-4)
    else:  # mHC streams start identical and 1/n-mixed, Engram values and DSA out are zero
        torch.testing.assert_close(fresh, base, rtol=1e-4, atol=1e-5)
    added_params = [p for n, p in on.named_parameters() if n in added]
    _perturb(torch.nn.ParameterList(added_params))  # as training would move them
    with torch.no_grad():
        trained = on(x)["x_u"]
    assert not torch.allclose(trained, base, atol=1e-3)


def test_the_network_uses_the_block_modules_themselves():
    net = _net(
        n_sample_frames=FRAMES,
        mhc={"enabled": True},
        engram={"enabled": True},
        gated_attention={"enabled": True},
        dsa={"enabled": True, "top_k": 8},
    )
    kinds = {type(m) for m in net.modules()}
    assert {HyperConnection, Engram, SparseSelfAttention} <= kinds
    procs = {type(p) for p in net.unet.attn_processors.values()}
    assert procs == {GatedAttnProcessor}


def _official(tmp_path, net: Musetalk2Net, as_safetensors: bool, cross: int = D):
    cfg = {k: v for k, v in net.spec.unet_config.items() if k != "class_embed_type"}
    cfg |= {"in_channels": 2 * C, "out_channels": C, "cross_attention_dim": cross}
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**cfg).eval()
    save_official_unet(tmp_path / "musetalkV15", unet, as_safetensors)
    return unet, tmp_path / "musetalkV15"


@pytest.mark.parametrize("as_safetensors", [False, True])
def test_with_neutral_components_the_transferred_network_is_the_15_function(
    tmp_path, as_safetensors
):
    net = _net(
        n_sample_frames=FRAMES,
        mhc={"enabled": True, "streams": 1},
        engram={"enabled": True},
        gated_attention={"enabled": True, "init_bias": 30.0},
        dsa={"enabled": True, "top_k": 4096},
    )
    official, folder = _official(tmp_path, net, as_safetensors)
    report = transfer_from_official(net, folder)
    unet_keys = {k for k in official.state_dict()}
    assert len(report.transferred) == len(unet_keys) and not report.reshaped
    assert not report.unused
    x = _inputs(net.spec)
    x["t"] = x["r"] = torch.zeros_like(x["t"])
    with torch.no_grad():
        got = net(x)["x_u"]
        masked = masked_input(x["target"], x["mask"])
        want = official(torch.cat([masked, x["reference"]], 1), 0, x["audio"]).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the 2.0 part is live: z_t and t now change the prediction
        x["t"] = torch.full_like(x["t"], 0.7)
        assert not torch.allclose(net(x)["x_u"], want, atol=1e-3)


def test_transfer_reports_reshaped_and_new_tensors_and_refuses_pickled_code(tmp_path):
    net = _net()
    _, folder = _official(tmp_path, net, False, cross=7)  # another audio encoder width
    report = transfer_from_official(net, folder)
    assert {n for n in report.reshaped} == {
        n for n in net.state_dict() if ".attn2.to_k." in n or ".attn2.to_v." in n
    }
    assert "adapter.weight" in report.initialised and "v_head.weight" in report.initialised
    assert "unet.class_embedding.linear_1.weight" in report.initialised
    assert report.counts()["transferred"] > 50
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "musetalk.json").write_text((folder / "musetalk.json").read_text())
    with open(bad / "unet.pth", "wb") as f:
        pickle.dump({"x": torch.nn.Linear(2, 2)}, f)
    with pytest.raises(CheckpointError):
        transfer_from_official(net, bad)


def test_sparse_phase_with_k_at_least_l_equals_the_dense_phase():
    dense = _net(n_sample_frames=FRAMES, dsa={"enabled": True, "phase": "dense"})
    _perturb(dense.levels.temporal)
    sparse = _net(n_sample_frames=FRAMES, dsa={"enabled": True, "phase": "sparse", "top_k": 10**4})
    sparse.load_state_dict(dense.state_dict())
    x = _inputs(dense.spec)
    a, b = dense(x), sparse(x)  # with gradients: the indexer KL is computed
    torch.testing.assert_close(a["x_u"], b["x_u"], rtol=1e-4, atol=1e-5)
    assert float(a["aux"]) > 0 and float(b["aux"]) > 0
    with torch.no_grad():
        assert float(sparse(x)["aux"]) == 0.0
    small = _net(n_sample_frames=FRAMES, dsa={"enabled": True, "phase": "sparse", "top_k": 3})
    small.load_state_dict(dense.state_dict())
    with torch.no_grad():
        assert not torch.allclose(small(x)["x_u"], a["x_u"].detach(), atol=1e-4)


def _stage2_net() -> Musetalk2Net:
    """All four components on and away from their init; DSA keeps every key (its top-k
    selection is piecewise constant, so finite differences across a switch are meaningless)."""
    net = _net(
        n_sample_frames=FRAMES,
        mhc={"enabled": True, "streams": 2},
        engram={"enabled": True},
        gated_attention={"enabled": True},
        dsa={"enabled": True, "top_k": 10**4},
    )
    _perturb(torch.nn.ModuleList([net.levels, net.adapter]), seed=5, scale=0.05)
    return net.double()


class Float64Timesteps(torch.nn.Module):
    """diffusers' ``Timesteps`` formula in float64 (the library computes it in float32, whose
    ≈6e-5 argument rounding at ``1000·t`` swamps a finite difference in ``t``)."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        p, half = self.proj, self.proj.num_channels // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float64)
        freq = torch.exp(exponent / (half - p.downscale_freq_shift))
        emb = p.scale * t.double()[:, None] * freq[None]
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], -1)
        return torch.cat([emb[:, half:], emb[:, :half]], -1) if p.flip_sin_to_cos else emb


def test_pmf_jvp_through_the_whole_network_matches_finite_differences():
    net = _stage2_net()
    t = torch.rand(5) * 1000
    torch.testing.assert_close(
        Float64Timesteps(net.unet.time_proj)(t).float(), net.unet.time_proj(t)
    )
    net.unet.time_proj = Float64Timesteps(net.unet.time_proj)
    x = {k: (v.double() if v.is_floating_point() else v) for k, v in _inputs(net.spec).items()}
    cfg = PMFConfig()
    cond = {k: x[k] for k in ("target", "reference", "mask", "audio", "engram_rows")}
    fn = net._fn(cond, FRAMES)
    terms = pmf_objective(fn, x["target"], x["noise"], x["t"], x["r"], cfg)
    tb = x["t"][:, None, None, None]
    z = (1 - tb) * x["target"] + tb * x["noise"]
    rows = torch.arange(len(z))
    with torch.no_grad():
        v_c = velocity(z, fn(z, x["t"], x["r"], rows)[1], x["t"], cfg.t_min)

        def u(zz, tt):
            return velocity(zz, fn(zz, tt, x["r"], rows)[0], tt, cfg.t_min)

        delta = 1e-5
        fd = (u(z + delta * v_c, x["t"] + delta) - u(z - delta * v_c, x["t"] - delta)) / (2 * delta)
    rel = (terms.du_dt - fd).norm() / fd.norm()
    assert float(rel) < 1e-4  # ≈2e-5 (truncation at 1000·t); a wrong tangent gives ≈1
    assert not terms.du_dt.requires_grad
    (terms.loss + terms.aux).backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize(
    ("scheme", "step", "tolerance"), [("central", 5e-5, 2e-3), ("one_sided", 1e-5, 2e-2)]
)
def test_finite_difference_du_dt_agrees_with_the_exact_jvp_on_the_network_in_float32(
    scheme, step, tolerance
):
    """The documented accuracy (generators.blocks.pmf: central 4e-4, one-sided 6e-3 measured
    here); a wrong tangent or stencil gives ≈1, and h = 1e-3 (truncation) ≈0.2-0.4."""
    net = _stage2_net().float()
    x = _inputs(net.spec, samples=4)
    cond = {k: x[k] for k in ("target", "reference", "mask", "audio", "engram_rows")}
    fn = net._fn(cond, FRAMES)
    exact = pmf_objective(fn, x["target"], x["noise"], x["t"], x["r"], PMFConfig())
    cfg = PMFConfig(jvp="finite_difference", fd_scheme=scheme, fd_step=step)
    fd = pmf_objective(fn, x["target"], x["noise"], x["t"], x["r"], cfg)
    rel = (fd.du_dt - exact.du_dt).norm() / exact.du_dt.norm()
    assert float(rel) < tolerance
    coarse = pmf_objective(
        fn, x["target"], x["noise"], x["t"], x["r"], cfg.model_copy(update={"fd_step": 1e-3})
    )
    assert float((coarse.du_dt - exact.du_dt).norm() / exact.du_dt.norm()) > 5 * tolerance
    net.train()
    out = net(x, mode="pmf", pmf=cfg)
    (out["pmf"] + out["aux"]).backward()
    assert all(p.grad is not None for p in net.parameters())
    assert float(out["pmf"]) == pytest.approx(float(fd.loss), rel=1e-4)


def test_one_step_sample_is_the_u_head_at_t1_r0():
    net = _stage2_net()
    x = {k: (v.double() if v.is_floating_point() else v) for k, v in _inputs(net.spec).items()}
    with torch.no_grad():
        got = net(x, mode="sample")["x"]
        ones = torch.ones_like(x["t"])
        want = net(x | {"z_t": x["noise"], "t": ones, "r": ones * 0})["x_u"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_full_size_network_is_buildable_and_its_size_is_known():
    cfg = Musetalk2Config(training_stage="stage2", unet="full")
    spec = make_spec(cfg, {"vae_latents": [16, 32, 32], "sensevoice": [512]})
    with torch.device("meta"):
        net = Musetalk2Net(spec)
    assert spec.unet_config["block_out_channels"] == [320, 640, 1280, 1280]
    assert spec.adapter_in_channels == 49 and spec.unet_config["in_channels"] == 8
    total = sum(p.numel() for p in net.parameters())
    assert 880e6 < total < 930e6  # 904.9 M: UNet 855.2 M + gates, mHC, Engram, DSA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pmf_step_on_cuda_under_bf16_autocast_is_finite_and_close_to_fp32():
    net = _stage2_net().float().cuda().train()
    x = {k: v.cuda() for k, v in _inputs(net.spec).items()}
    ref = net(x, mode="pmf")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(x, mode="pmf")
    (out["pmf"] + out["aux"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    rel = (out["x_pred"].float() - ref["x_pred"]).norm() / ref["x_pred"].norm()
    assert float(rel) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_finite_difference_du_dt_under_bf16_autocast_on_cuda_matches_the_fp32_jvp():
    net = _stage2_net().float().cuda()
    x = {k: v.cuda() for k, v in _inputs(net.spec, samples=4).items()}
    cond = {k: x[k] for k in ("target", "reference", "mask", "audio", "engram_rows")}
    fn = net._fn(cond, FRAMES)
    args = (x["target"], x["noise"], x["t"], x["r"])
    exact = pmf_objective(fn, *args, PMFConfig()).du_dt
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fd = pmf_objective(fn, *args, PMFConfig(jvp="finite_difference")).du_dt
    assert fd.dtype == torch.float32
    assert float((fd - exact).norm() / exact.norm()) < 1e-2
