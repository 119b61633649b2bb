"""Gated attention processor: training.md §3.4 tests (generators.blocks.gated_attention).

§3.4's fifth item (attention-sink mass) is a training diagnostic, not a unit test; the fifth
test here checks the processors installed across a whole diffusers UNet instead.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from generators.blocks.gated_attention import GatedAttnProcessor, install_gated_attention

D, HEADS, DH = 16, 4, 4


def _attn(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention(D, cross_attention_dim=12, heads=HEADS, dim_head=DH)


def _inputs(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, D, generator=gen), torch.randn(2, 3, 12, generator=gen)


def test_saturated_gate_is_ungated_and_closed_gate_zeroes_the_heads():
    a = _attn()
    x, ctx = _inputs()
    ungated = a(x, ctx)
    a.set_processor(GatedAttnProcessor(a, "elementwise", init_bias=30.0))
    torch.testing.assert_close(a(x, ctx), ungated, rtol=0, atol=0)
    a.set_processor(GatedAttnProcessor(a, "headwise", init_bias=-200.0))
    closed = a(x, ctx)
    torch.testing.assert_close(closed, a.to_out[0].bias.expand_as(closed), rtol=0, atol=1e-7)


def _naive(a: Attention, proc: GatedAttnProcessor, x, where: str) -> torch.Tensor:
    """Self-attention by loops; the gate after softmax·V ("sdpa"), on each value token by
    its own gate ("value", position G2) or after the output projection ("after")."""
    q = a.to_q(x).view(2, 5, HEADS, DH)
    k = a.to_k(x).view(2, 5, HEADS, DH)
    v = a.to_v(x).view(2, 5, HEADS, DH)
    g = torch.sigmoid(proc.gate(x)).view(2, 5, HEADS, DH)
    y = torch.zeros(2, 5, HEADS, DH)
    for b in range(2):
        for h in range(HEADS):
            for i in range(5):
                scores = torch.stack([q[b, i, h] @ k[b, j, h] for j in range(5)]) / DH**0.5
                p = torch.softmax(scores, 0)
                vals = v[b, :, h] * (g[b, :, h] if where == "value" else 1.0)
                y[b, i, h] = (p[:, None] * vals).sum(0)
    if where == "sdpa":
        y = y * g
    out = a.to_out[0](y.reshape(2, 5, HEADS * DH))
    return out * g.reshape(2, 5, -1) if where == "after" else out


def test_gate_sits_after_softmax_v_and_before_the_output_projection():
    torch.manual_seed(0)
    a = Attention(D, heads=HEADS, dim_head=DH)
    proc = GatedAttnProcessor(a, "elementwise")
    with torch.no_grad():
        proc.gate.weight.normal_(0, 1.0)
        proc.gate.bias.normal_(0, 1.0)
        a.to_out[0].bias.normal_(0, 1.0)
    a.set_processor(proc)
    x, _ = _inputs()
    got = a(x)
    torch.testing.assert_close(got, _naive(a, proc, x, "sdpa"), rtol=1e-5, atol=1e-6)
    for wrong in ("after", "value"):
        assert not torch.allclose(got, _naive(a, proc, x, wrong), atol=1e-3)


def test_head_specificity():
    a = _attn()
    proc = GatedAttnProcessor(a, "elementwise")
    x, ctx = _inputs()
    y, xq = proc.attend(a, x, ctx, None)
    before = y * proc.gate_values(xq)
    with torch.no_grad():
        proc.gate.bias[2 * DH : 3 * DH] += 1.5  # head 2's gate logits
    after = y * proc.gate_values(xq)
    changed = (after - before).abs().amax(dim=(0, 1, 3)) > 0
    assert changed.tolist() == [False, False, True, False]


def test_gate_of_a_token_depends_only_on_its_own_hidden_state():
    a = _attn()
    proc = GatedAttnProcessor(a, "headwise")
    with torch.no_grad():
        proc.gate.weight.normal_(0, 1.0)
    x, _ = _inputs()
    g = proc.gate_values(x)
    x2 = x.clone()
    x2[:, 3] += torch.randn(2, D)
    g2 = proc.gate_values(x2)
    torch.testing.assert_close(g2[:, [0, 1, 2, 4]], g[:, [0, 1, 2, 4]], rtol=0, atol=0)
    assert not torch.allclose(g2[:, 3], g[:, 3])


def test_install_across_a_unet_adds_gates_to_self_and_cross_attention():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,
        cross_attention_dim=12,
    )
    unet.set_attn_processor(AttnProcessor2_0())
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.zeros(()), torch.randn(2, 3, 12)
    ref = unet(x, t, encoder_hidden_states=ctx).sample
    n = install_gated_attention(unet, "headwise", init_bias=30.0)
    gates = [k for k in unet.state_dict() if k.endswith("processor.gate.weight")]
    assert n == len(gates) == 8  # (attn1 + attn2) × 4 transformers: down 1, mid 1, up 2
    assert any(".attn2." in k for k in gates) and any(".attn1." in k for k in gates)
    torch.testing.assert_close(unet(x, t, encoder_hidden_states=ctx).sample, ref, rtol=0, atol=0)
