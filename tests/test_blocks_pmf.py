"""pMF objective: the eight correctness tests of training.md §3.1, against generators.blocks.pmf."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from generators.blocks.config import PMFConfig
from generators.blocks.pmf import (
    adaptive_weight,
    ieee_float32,
    one_step_sample,
    pmf_objective,
    sample_times,
    velocity,
)

CFG = PMFConfig()


class TwoHead(nn.Module):
    """A small smooth x-prediction network over flat vectors, conditioned on (t, t - r)."""

    def __init__(self, dim: int = 6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim + 2, 32), nn.Tanh(), nn.Linear(32, 2 * dim))
        self.to(dtype)

    def forward(self, z, t, r):
        h = torch.cat([z, t[:, None], (t - r)[:, None]], dim=1)
        xu, xv = self.body(h).chunk(2, dim=1)
        return xu, xv


def as_fn(net):
    return lambda z, t, r, rows: net(z, t, r)


def times(batch: int, gen: torch.Generator, dtype=torch.float32):
    t = torch.rand(batch, generator=gen, dtype=dtype) * 0.9 + 0.1
    r = t * torch.rand(batch, generator=gen, dtype=dtype)
    return t, r


def test_analytic_single_point_has_zero_loss():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 5, generator=gen, dtype=torch.float64)
    fn = lambda z, t, r, rows: (x0.expand_as(z), x0.expand_as(z))  # noqa: E731 - x̂ ≡ x₀
    eps = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    t, r = times(64, gen, torch.float64)
    terms = pmf_objective(fn, x0.expand(64, 5), eps, t, r, CFG)
    torch.testing.assert_close(terms.compound_v, eps - x0, rtol=0, atol=1e-12)
    assert float(terms.loss) == pytest.approx(0.0, abs=1e-20)


def test_jvp_matches_central_finite_difference():
    torch.manual_seed(1)
    net = TwoHead()
    gen = torch.Generator().manual_seed(1)
    x, eps = torch.randn(16, 6, generator=gen), torch.randn(16, 6, generator=gen)
    t, r = times(16, gen)
    terms = pmf_objective(as_fn(net), x, eps, t, r, CFG)
    z = (1 - t[:, None]) * x + t[:, None] * eps
    with torch.no_grad():
        v_c = velocity(z, net(z, t, r)[1], t, CFG.t_min)
        delta = 1e-3

        def u(zz, tt):
            return velocity(zz, net(zz, tt, r)[0], tt, CFG.t_min)

        fd = (u(z + delta * v_c, t + delta) - u(z - delta * v_c, t - delta)) / (2 * delta)
    rel = (terms.du_dt - fd).norm() / fd.norm()
    assert float(rel) < 1e-3


def test_stop_gradient_on_du_dt_and_no_double_backward_graph():
    torch.manual_seed(2)
    net = TwoHead()
    gen = torch.Generator().manual_seed(2)
    x, eps = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
    t, r = times(8, gen)
    terms = pmf_objective(as_fn(net), x, eps, t, r, CFG)
    assert not terms.du_dt.requires_grad and terms.du_dt.grad_fn is None
    got = torch.autograd.grad(terms.loss, list(net.parameters()))

    def manual(detach: bool):
        z = (1 - t[:, None]) * x + t[:, None] * eps
        with torch.no_grad():
            v_c = velocity(z, net(z, t, r)[1], t, CFG.t_min)

        def u_fn(zz, tt):
            return velocity(zz, net(zz, tt, r)[0], tt, CFG.t_min)

        u, du = torch.func.jvp(u_fn, (z, t), (v_c, torch.ones_like(t)))
        du = du.detach() if detach else du
        big_v = u + (t - r)[:, None] * du
        v = velocity(z, net(z, t, r)[1], t, CFG.t_min)
        v_t = eps - x
        lu = adaptive_weight(((big_v - v_t) ** 2).sum(1), CFG)
        lv = adaptive_weight(((v - v_t) ** 2).sum(1), CFG)
        return torch.autograd.grad((lu + lv).mean(), list(net.parameters()))

    for a, b in zip(got, manual(detach=True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    differs = any(
        not torch.allclose(a, b, rtol=1e-3, atol=1e-5)
        for a, b in zip(got, manual(detach=False), strict=True)
    )
    assert differs, "the stop-gradient must change the gradient (else this test cannot fail)"


def test_rows_with_r_equal_t_are_plain_flow_matching_on_the_u_head():
    torch.manual_seed(3)
    net = TwoHead()
    gen = torch.Generator().manual_seed(3)
    x, eps = torch.randn(10, 6, generator=gen), torch.randn(10, 6, generator=gen)
    t, r = times(10, gen)
    r[::2] = t[::2]
    terms = pmf_objective(as_fn(net), x, eps, t, r, CFG)
    z = (1 - t[:, None]) * x + t[:, None] * eps
    u = velocity(z, net(z, t, r)[0], t, CFG.t_min)
    torch.testing.assert_close(terms.compound_v[::2], u[::2])
    assert torch.all(terms.du_dt[::2] == 0)
    assert not torch.allclose(terms.compound_v[1::2], u[1::2])


def test_time_sampler_order_share_and_logit_normal_moments():
    cfg = PMFConfig(p_mean=-0.4, p_std=1.0, data_proportion=0.75)
    t, r = sample_times(20_000, cfg, torch.Generator().manual_seed(4))
    assert torch.all(t >= r)
    assert int((t == r).sum()) == 15_000
    gap = t > r
    logits = torch.logit(torch.cat([t[gap], r[gap]]).double())
    assert float(logits.mean()) == pytest.approx(-0.4, abs=0.05)
    assert float(logits.std()) == pytest.approx(1.0, abs=0.05)


def test_one_step_sampler_identity():
    torch.manual_seed(5)
    net = TwoHead(dtype=torch.float64)
    z1 = torch.randn(7, 6, dtype=torch.float64)
    x_hat = one_step_sample(as_fn(net), z1)
    ones = torch.ones(7, dtype=torch.float64)
    xu = net(z1, ones, torch.zeros(7, dtype=torch.float64))[0]
    u = velocity(z1, xu, ones, CFG.t_min)
    torch.testing.assert_close(z1 - u, x_hat, rtol=0, atol=1e-14)
    torch.testing.assert_close(x_hat, xu, rtol=0, atol=0)


def test_t_near_zero_is_finite():
    torch.manual_seed(6)
    net = TwoHead()
    x, eps = torch.randn(4, 6), torch.randn(4, 6)
    t = torch.tensor([0.0, 1e-6, 0.0, 1e-6])
    r = torch.tensor([0.0, 0.0, 0.0, 1e-6])
    terms = pmf_objective(as_fn(net), x, eps, t, r, CFG)
    terms.loss.backward()
    assert torch.isfinite(terms.loss)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_adaptive_weight_gradient_by_hand():
    theta = torch.tensor(1.5, requires_grad=True)
    a = torch.tensor([0.3, 2.0])
    per_sample = (theta * a) ** 2  # l_i = θ² a_i²
    adaptive_weight(per_sample, CFG).mean().backward()
    # d/dθ mean(l_i / sg(l_i + 0.01)) = mean(2 θ a_i² / (θ² a_i² + 0.01))
    expected = sum(2 * 1.5 * ai**2 / (1.5**2 * ai**2 + 0.01) for ai in (0.3, 2.0)) / 2
    assert float(theta.grad) == pytest.approx(expected, rel=1e-6)
    assert math.isclose(float(adaptive_weight(per_sample, CFG)[1]), 9.0 / 9.01, rel_tol=1e-6)


def _du_dt(net, x, eps, t, r, **cfg) -> torch.Tensor:
    return pmf_objective(as_fn(net), x, eps, t, r, PMFConfig(**cfg)).du_dt


def test_finite_difference_du_dt_converges_to_the_jvp_at_its_stated_order():
    torch.manual_seed(7)
    net = TwoHead(dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    x, eps = (torch.randn(12, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    t, r = times(12, gen, torch.float64)
    t = t.clamp(0.2, 0.9)  # stencils away from the ends of [t_min, 1]
    exact = _du_dt(net, x, eps, t, r)
    errors = {}
    for scheme in ("central", "one_sided"):
        for h in (1e-2, 5e-3):
            fd = _du_dt(net, x, eps, t, r, jvp="finite_difference", fd_scheme=scheme, fd_step=h)
            errors[scheme, h] = float((fd - exact).norm() / exact.norm())
    # halving h divides the error by 4 (central, O(h²)) and by 2 (one-sided, O(h))
    assert 3.5 < errors["central", 1e-2] / errors["central", 5e-3] < 4.5
    assert 1.8 < errors["one_sided", 1e-2] / errors["one_sided", 5e-3] < 2.2
    assert errors["central", 5e-3] < 0.1 * errors["one_sided", 5e-3]


def test_finite_difference_stencils_stay_inside_t_min_and_one():
    torch.manual_seed(8)
    net = TwoHead(dtype=torch.float64)
    seen: list[torch.Tensor] = []

    def fn(z, t, r, rows):
        seen.append(t)
        return net(z, t, r)

    x, eps = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    t = torch.tensor([0.0505, 0.9995, 0.5, 0.999], dtype=torch.float64)
    r = t * 0.5
    exact = pmf_objective(fn, x, eps, t, r, CFG).du_dt
    for scheme in ("central", "one_sided"):
        seen.clear()
        cfg = PMFConfig(jvp="finite_difference", fd_scheme=scheme, fd_step=1e-3)
        fd = pmf_objective(fn, x, eps, t, r, cfg).du_dt
        stencil = torch.cat(seen[1:])  # seen[0]: the differentiable forward
        assert float(stencil.min()) >= CFG.t_min and float(stencil.max()) <= 1.0
        assert float(stencil.max()) > 0.999  # the rows near 1 were evaluated there
        torch.testing.assert_close(fd, exact, rtol=0.05, atol=0.05 * float(exact.abs().max()))


def test_finite_difference_mode_keeps_the_stop_gradient_and_one_batched_call():
    torch.manual_seed(9)
    net = TwoHead()
    calls: list[int] = []

    def fn(z, t, r, rows):
        calls.append(len(rows))
        return net(z, t, r)

    gen = torch.Generator().manual_seed(9)
    x, eps = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
    t, r = times(8, gen)
    r[:3] = t[:3]  # five rows need du/dt
    for scheme, extra in (("central", 10), ("one_sided", 5)):
        calls.clear()
        cfg = PMFConfig(jvp="finite_difference", fd_scheme=scheme, fd_step=1e-3)
        terms = pmf_objective(fn, x, eps, t, r, cfg)
        assert calls == [8, extra]
        assert not terms.du_dt.requires_grad and torch.all(terms.du_dt[:3] == 0)
        got = torch.autograd.grad(terms.loss, list(net.parameters()))
        z = (1 - t[:, None]) * x + t[:, None] * eps
        xu, xv = net(z, t, r)
        u, v = velocity(z, xu, t, CFG.t_min), velocity(z, xv, t, CFG.t_min)
        big_v = u + (t - r)[:, None] * terms.du_dt
        lu = adaptive_weight(((big_v - (eps - x)) ** 2).sum(1), CFG)
        lv = adaptive_weight(((v - (eps - x)) ** 2).sum(1), CFG)
        want = torch.autograd.grad((lu + lv).mean(), list(net.parameters()))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scheme", ["central", "one_sided"])
def test_finite_difference_under_bf16_autocast_differences_in_float32(scheme):
    torch.manual_seed(10)
    net = TwoHead()
    gen = torch.Generator().manual_seed(10)
    x, eps = torch.randn(16, 6, generator=gen), torch.randn(16, 6, generator=gen)
    t, r = times(16, gen)
    exact = _du_dt(net, x, eps, t, r)
    cfg = {"jvp": "finite_difference", "fd_scheme": scheme, "fd_step": 1e-3}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fd = _du_dt(net, x, eps, t, r, **cfg)
        bf16_u = net(x, t, r)[0]
    assert bf16_u.dtype == torch.bfloat16  # autocast is really on for the network
    assert fd.dtype == torch.float32
    assert float((fd - exact).norm() / exact.norm()) < 1e-2


def test_difference_quotients_run_in_ieee_float32_on_cuda_and_restore_the_setting():
    knobs = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    before = [k.fp32_precision for k in knobs]
    seen = []
    with ieee_float32("cuda"):
        seen = [k.fp32_precision for k in knobs]
    assert seen == ["ieee", "ieee"] and [k.fp32_precision for k in knobs] == before
    with pytest.raises(KeyError), ieee_float32("cuda"):
        raise KeyError("restored on error too")
    assert [k.fp32_precision for k in knobs] == before
