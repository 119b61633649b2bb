"""mHC hyper-connections: the six correctness tests of training.md §3.2 (generators.blocks.mhc)."""

from __future__ import annotations

import torch
from torch import nn

from generators.blocks.mhc import HyperConnection, StreamCollapse, expand, sinkhorn_knopp


def _conv_block(channels: int) -> nn.Module:
    torch.manual_seed(11)
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    return conv


def _sinkhorn_reference(logits: torch.Tensor, iters: int, eps: float = 1e-6) -> torch.Tensor:
    """Independent float64 loop over rows and columns (same algorithm, no broadcasting)."""
    m = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    m = m / m.sum(dim=-1, keepdim=True) + eps
    n = m.shape[-1]
    for _ in range(iters):
        m = torch.stack([m[..., :, j] / m[..., :, j].sum(-1, keepdim=True) for j in range(n)], -1)
        m = torch.stack([m[..., i, :] / m[..., i, :].sum(-1, keepdim=True) for i in range(n)], -2)
    return m


def test_sinkhorn_is_doubly_stochastic_and_its_gradient_matches_float64_autograd():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 4, 4, generator=gen)
    m = sinkhorn_knopp(logits, iters=20)
    assert torch.all(m >= 0)
    assert float((m.sum(-1) - 1).abs().max()) < 1e-5
    assert float((m.sum(-2) - 1).abs().max()) < 1e-3
    tighter = sinkhorn_knopp(logits, iters=60)
    assert float((tighter.sum(-2) - 1).abs().max()) < float((m.sum(-2) - 1).abs().max())

    x32 = logits[:4].clone().requires_grad_(True)
    x64 = logits[:4].double().requires_grad_(True)
    weights = torch.randn(4, 4, 4, generator=gen)
    (sinkhorn_knopp(x32, 20) * weights).sum().backward()
    (_sinkhorn_reference(x64, 20) * weights.double()).sum().backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)


def test_composite_of_projected_matrices_stays_bounded_and_unconstrained_blows_up():
    gen = torch.Generator().manual_seed(1)
    prod = torch.eye(4)
    free = torch.eye(4)
    for _ in range(50):
        prod = sinkhorn_knopp(torch.randn(4, 4, generator=gen), iters=20) @ prod
        free = (torch.eye(4) + 0.5 * torch.randn(4, 4, generator=gen)) @ free
    sums = torch.cat([prod.sum(0), prod.sum(1)])
    assert float((sums - 1).abs().max()) < 1e-2
    assert float(torch.linalg.matrix_norm(prod, ord=2)) <= 1 + 1e-2
    assert float(torch.linalg.matrix_norm(free, ord=2)) > 1e3


def test_conservation_of_the_stream_sum():
    torch.manual_seed(2)
    hc = HyperConnection(4, 8)
    with torch.no_grad():
        hc.fn.normal_(0, 0.5)
        hc.base.normal_(0, 1.0)
    conv = _conv_block(8)
    s = torch.randn(2, 4, 8, 5, 5)
    pre, post, _ = hc.coefficients(s)
    layer_input = (pre.unsqueeze(2) * s).sum(1)
    branch = conv(layer_input)
    new = hc(s, lambda x: x + conv(x))
    lhs = new.sum(1)
    rhs = s.sum(1) + post.sum(1, keepdim=True) * branch
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_single_stream_at_init_is_a_plain_residual():
    hc, collapse = HyperConnection(1, 8), StreamCollapse(1, 8)
    conv = _conv_block(8)
    x = torch.randn(3, 8, 6, 6)
    out = collapse(hc(expand(x, 1), lambda h: h + conv(h)))
    torch.testing.assert_close(out, x + conv(x), rtol=0, atol=1e-6)
    # and for n = 4 at init (identical streams, H_pre = 1/n): the same function
    out4 = StreamCollapse(4, 8)(HyperConnection(4, 8)(expand(x, 4), lambda h: h + conv(h)))
    torch.testing.assert_close(out4, x + conv(x), rtol=1e-5, atol=1e-5)


def test_vectorised_module_matches_a_per_position_reference_loop():
    torch.manual_seed(3)
    n, c = 3, 5
    hc = HyperConnection(n, c, sinkhorn_iters=20)
    with torch.no_grad():
        hc.fn.normal_(0, 0.3)
        hc.base.normal_(0, 1.0)
        hc.scale.copy_(torch.tensor([0.7, 1.3, 0.9]))
        hc.norm_weight.uniform_(0.5, 1.5)
    conv = _conv_block(c)
    s = torch.randn(2, n, c, 3, 4)
    got = hc(s, lambda h: h + conv(h))
    # reference: the TileKernels per-token math, one position at a time
    pre_all = torch.zeros(2, n, 3, 4)
    post_all = torch.zeros(2, n, 3, 4)
    res_all = torch.zeros(2, 3, 4, n, n)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                flat = s[b, :, :, i, j].reshape(-1)
                normed = flat / torch.sqrt(flat.pow(2).mean() + 1e-6) * hc.norm_weight
                mixes = hc.fn @ normed
                scale = torch.cat(
                    [hc.scale[:1].repeat(n), hc.scale[1:2].repeat(n), hc.scale[2:].repeat(n * n)]
                )
                mixes = mixes * scale + hc.base
                pre_all[b, :, i, j] = torch.sigmoid(mixes[:n])
                post_all[b, :, i, j] = 2 * torch.sigmoid(mixes[n : 2 * n])
                res_all[b, i, j] = sinkhorn_knopp(mixes[2 * n :].view(n, n), 20)
    layer_input = (pre_all.unsqueeze(2) * s).sum(1)
    branch = conv(layer_input)
    expected = torch.zeros_like(s)
    for jj in range(n):
        for m in range(n):
            expected[:, jj] += res_all[..., m, jj].unsqueeze(1) * s[:, m]
        expected[:, jj] += post_all[:, jj].unsqueeze(1) * branch
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_coefficient_layout_and_transposed_residual_mix():
    n, c = 3, 4
    hc = HyperConnection(n, c)
    base = torch.zeros(n * (n + 2))
    base[:n] = torch.tensor([-1.0, 0.0, 2.0])  # pre
    base[n : 2 * n] = torch.tensor([0.5, -0.5, 1.5])  # post
    cyc = torch.zeros(n, n)
    for m in range(n):
        cyc[m, (m + 1) % n] = 8.0  # stream m flows into stream m+1
    base[2 * n :] = cyc.reshape(-1)
    with torch.no_grad():
        hc.base.copy_(base)
    s = torch.randn(1, n, c, 2, 2)
    pre, post, res = hc.coefficients(s)
    torch.testing.assert_close(pre[0, :, 0, 0], torch.sigmoid(base[:n]))
    torch.testing.assert_close(post[0, :, 0, 0], 2 * torch.sigmoid(base[n : 2 * n]))
    torch.testing.assert_close(res[0, 0, 0], sinkhorn_knopp(cyc, 20))
    out = hc(s, lambda h: h)  # F = 0: only the residual mix remains
    transposed = torch.einsum("mj,bmchw->bjchw", res[0, 0, 0], s)
    plain = torch.einsum("jm,bmchw->bjchw", res[0, 0, 0], s)
    torch.testing.assert_close(out, transposed, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, plain, atol=1e-2)
    assert torch.allclose(out[:, 1], s[:, 0], atol=5e-3)  # stream 0 went to stream 1
