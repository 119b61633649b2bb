"""Pixel MeanFlow (pMF): x-prediction average-velocity objective, time sampler, one-step sampler.

Conventions (MeanFlow, Geng et al. 2505.13447; pMF 2601.22158, official ``Lyy-iiis/pMF``):

- path ``z_t = (1 - t)·x + t·ε`` (t = 0 data, t = 1 noise), conditional velocity ``v = ε - x``;
- the network predicts the *denoised* sample for two heads, ``x̂_u`` and ``x̂_v``; velocities
  are ``u = (z_t - x̂_u) / clip(t, t_min, 1)`` and ``v = (z_t - x̂_v) / clip(t, t_min, 1)``;
- the loss stays in velocity space (iMF form): ``V = u + (t - r)·sg(du/dt)`` with
  ``du/dt = ∂_z u·v_c + ∂_t u`` from one ``torch.func.jvp`` whose tangent is the model's own
  conditional velocity ``v_c`` (v-head, detached: pMF's "predicted v in the jvp");
  ``loss_u = w(‖V - v_t‖²)``, ``loss_v = w(‖v - v_t‖²)``, per-sample sums, with the adaptive
  weight ``w(l) = l / sg(l + eps)^p``;
- one-step sampling: ``x̂ = z_1 - u(z_1, r=0, t=1)``, i.e. the u-head at ``(t, r) = (1, 0)``.

Cost trade-off: one differentiable forward of every row gives ``u``, ``v`` and the tangent
``v_c = sg(v)`` (no separate forward for it); ``du/dt`` is then needed, without gradient
recording, only on the rows with ``r < t`` (for ``r = t`` the ``(t - r)·du/dt`` term is
exactly zero). Two ways to get it (:attr:`generators.blocks.config.PMFConfig.jvp`):

- ``exact`` (default: no step size to tune, and it holds DSA's top-k selection fixed
  where a difference quotient can straddle a switch): one ``torch.func.jvp`` —
  forward-mode AD, exact to rounding. Every op
  needs a forward-AD formula; none of the fused SDPA kernels has one (flash, memory-
  efficient, cuDNN, CPU flash: torch 2.14's ``derivatives.yaml`` lists backward formulas
  only), so the pass runs under the math SDPA backend (:func:`jvp_attention_backend`), and
  forward mode carries a tangent through every op (step costs:
  ``benchmarks/bench_musetalk2.py``);
- ``finite_difference``: ``du/dt`` as a difference quotient of ``u`` along the same tangent
  ``(v_c, dr = 0, dt = 1)``, in plain no-grad forwards that keep the fused attention kernels.
  ``central`` (default scheme): ``[u(z + h·v_c, t + h) - u(z - h·v_c, t - h)] / 2h``, two
  extra forwards of the ``r < t`` rows batched into one call, truncation error
  ``O(h²·‖d³u/dt³‖)``; ``one_sided``: ``[u(z + h·v_c, t + h) - u(z, t)] / h`` reusing the
  differentiable forward's ``u``, one extra forward, error ``O(h·‖d²u/dt²‖)``. Both
  add rounding error ``≈ ε_mach·‖u‖/h``, so they run in IEEE float32: autocast off, and on
  CUDA TF32 off (a bf16 or TF32 difference quotient would be noise; under autocast or on
  CUDA ``one_sided`` therefore re-evaluates ``u(z, t)`` in float32 too). A stencil point
  never leaves ``[t_min, 1]``, where ``clip(t, t_min, 1)`` has its kinks: rows within ``h``
  of an end step inwards only. Accuracy against ``exact`` on the tiny stage-2 network in float32
  (‖du_fd − du_jvp‖ / ‖du_jvp‖, ``tests/test_musetalk2_network.py``): central 4e-4 at
  h = 5e-5 (2e-3 at 1e-4, 0.17 at 1e-3: truncation, since the 1000·t time embedding makes
  u oscillate on a 1e-3 scale in t; 2e-3 at 1e-5: rounding); one_sided 6e-3 at its best
  h = 1e-5. Top-k switches of DSA between stencil points are not differentiable and show up
  as outliers in the quotient (the exact JVP holds the selection fixed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from generators.blocks.config import PMFConfig

# f(z_t, t, r, rows) -> (x̂_u, x̂_v) or (x̂_u, x̂_v, aux): t, r are (len(rows),); ``rows``
# indexes the batch rows these inputs belong to, so the caller slices its conditioning to
# match. ``aux`` is an optional scalar auxiliary loss the network computes on the way (e.g.
# the DSA indexer's KL), returned as :attr:`PMFTerms.aux` with its gradient.
XPredFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]
]


def _split(out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xu, xv = out[0], out[1]
    aux = out[2] if len(out) > 2 else xu.new_zeros(())
    return xu, xv, aux


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def velocity(z_t: torch.Tensor, x_hat: torch.Tensor, t: torch.Tensor, t_min: float) -> torch.Tensor:
    """``(z_t - x̂) / clip(t, t_min, 1)``: finite for every ``t`` in ``[0, 1]``."""
    return (z_t - x_hat) / _bcast(t.clamp(t_min, 1.0), z_t)


def sample_times(
    batch: int, cfg: PMFConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, r)`` of shape ``(B,)``: both ``sigmoid(N(p_mean, p_std))``, ``t = max``, ``r = min``;
    exactly ``round(B·data_proportion)`` rows (a random subset) get ``r = t``."""
    a = torch.sigmoid(torch.randn(batch, generator=generator) * cfg.p_std + cfg.p_mean)
    b = torch.sigmoid(torch.randn(batch, generator=generator) * cfg.p_std + cfg.p_mean)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    equal = torch.randperm(batch, generator=generator)[: round(batch * cfg.data_proportion)]
    r[equal] = t[equal]
    return t, r


def adaptive_weight(per_sample: torch.Tensor, cfg: PMFConfig) -> torch.Tensor:
    """``l / sg(l + eps)^p`` per sample (MeanFlow's adaptive loss weighting)."""
    return per_sample / (per_sample.detach() + cfg.norm_eps) ** cfg.norm_p


def jvp_attention_backend() -> AbstractContextManager:
    """SDPA backend for forward-mode AD: math only (fused kernels have no JVP formula)."""
    return sdpa_kernel([SDPBackend.MATH])


@contextmanager
def ieee_float32(device_type: str) -> Iterator[None]:
    """Full float32 matmuls and convolutions on CUDA (cuDNN convolutions default to TF32,
    whose 10-bit mantissa would swamp a difference quotient); restored on exit."""
    if device_type != "cuda":
        yield
        return
    knobs = [
        (torch.backends.cuda.matmul, "fp32_precision"),
        (torch.backends.cudnn.conv, "fp32_precision"),
    ]
    saved = [getattr(obj, name) for obj, name in knobs]
    try:
        for obj, name in knobs:
            setattr(obj, name, "ieee")
        yield
    finally:
        for (obj, name), value in zip(knobs, saved, strict=True):
            setattr(obj, name, value)


def finite_difference_du_dt(
    fn: XPredFn,
    z: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    rows: torch.Tensor,
    v_c: torch.Tensor,
    u_base: torch.Tensor,
    cfg: PMFConfig,
) -> torch.Tensor:
    """``du/dt`` along ``(v_c, 0, 1)`` by a difference quotient (``cfg.fd_scheme``), no grad.

    ``u_base`` is ``u(z, t)`` from the caller's forward (``one_sided`` reuses it on a CPU
    without autocast, and evaluates ``u(z, t)`` itself otherwise). The stencil points are
    evaluated in one batched float32 call of ``fn`` (``rows`` repeated per point, so whole
    samples stay together)."""
    dtype = torch.promote_types(z.dtype, torch.float32)  # never below float32
    zf, vf, tf = z.to(dtype), v_c.to(dtype), t.to(dtype)
    h, zero = torch.full_like(tf, cfg.fd_step), torch.zeros_like(tf)
    if cfg.fd_scheme == "central":
        lo = torch.where(tf - h >= cfg.t_min, -h, zero)
        hi = torch.where(tf + h <= 1.0, h, zero)
    else:
        lo = zero
        hi = torch.where(tf + h <= 1.0, h, -h)
    device = z.device.type
    # the caller's u is IEEE float32 only on CPU without autocast (CUDA convs default to TF32)
    reuse = cfg.fd_scheme == "one_sided" and device == "cpu"
    reuse = reuse and not torch.is_autocast_enabled(device)
    offsets = [hi] if reuse else [lo, hi]
    with torch.no_grad(), torch.autocast(device, enabled=False), ieee_float32(device):
        zs = torch.cat([zf + _bcast(o, zf) * vf for o in offsets])
        ts = torch.cat([tf + o for o in offsets])
        xu = _split(fn(zs, ts, r.repeat(len(offsets)), rows.repeat(len(offsets))))[0]
        us = velocity(zs, xu.to(dtype), ts, cfg.t_min).split(len(t))
        low = u_base.to(dtype) if reuse else us[0]
        return ((us[-1] - low) / _bcast(hi - lo, zf)).to(z.dtype)


@dataclass
class PMFTerms:
    """Loss and diagnostics of one pMF evaluation (all but ``loss*`` detached)."""

    loss: torch.Tensor  # mean over the batch of loss_u + v_loss_weight·loss_v
    loss_u: torch.Tensor  # (B,) adaptively weighted
    loss_v: torch.Tensor  # (B,)
    raw_u: torch.Tensor  # (B,) unweighted ‖V - v_t‖² (what convergence is judged on)
    x_pred: torch.Tensor  # (B, ...) x̂ = z_t - t·u, with gradient (for pixel/perceptual terms)
    du_dt: torch.Tensor  # (B, ...) detached
    compound_v: torch.Tensor  # (B, ...) V, with gradient
    aux: torch.Tensor  # the network's auxiliary loss on the differentiable forward


def pmf_objective(
    fn: XPredFn,
    x: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    cfg: PMFConfig,
) -> PMFTerms:
    """The full pMF objective for data ``x``, noise ``eps`` and times ``t ≥ r`` (``(B,)``).

    ``fn`` is the network closed over its parameters and conditioning; it is called on row
    subsets (``rows``), for which it must slice its conditioning the same way. Gradients
    reach the parameters through ``u`` and ``v`` of one differentiable forward; ``du/dt``
    comes from a JVP under ``no_grad`` (stop-gradient by construction: no graph is recorded
    for the tangent, and none is kept for a double backward).
    """
    tb = _bcast(t, x)
    z_t = (1.0 - tb) * x + tb * eps
    v_t = velocity(z_t, x, t, cfg.t_min)  # = ε - x where t ≥ t_min
    everything = torch.arange(x.shape[0], device=x.device)
    xu, xv, aux = _split(fn(z_t, t, r, everything))
    u, v = velocity(z_t, xu, t, cfg.t_min), velocity(z_t, xv, t, cfg.t_min)
    du_dt = torch.zeros_like(u)
    jvp_rows = everything[(t - r) > 0]
    if len(jvp_rows):
        z_g, t_g, r_g = z_t[jvp_rows], t[jvp_rows], r[jvp_rows]
        v_c = v.detach()[jvp_rows]  # the model's own conditional velocity: the tangent
        if cfg.jvp == "exact":

            def u_fn(z: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
                return velocity(z, _split(fn(z, tt, r_g, jvp_rows))[0], tt, cfg.t_min)

            with torch.no_grad(), jvp_attention_backend():
                _, du_g = torch.func.jvp(u_fn, (z_g, t_g), (v_c, torch.ones_like(t_g)))
        else:
            du_g = finite_difference_du_dt(
                fn, z_g, t_g, r_g, jvp_rows, v_c, u.detach()[jvp_rows], cfg
            )
        du_dt = du_dt.index_copy(0, jvp_rows, du_g)
    compound = u + _bcast(t - r, x) * du_dt
    dims = tuple(range(1, x.ndim))
    raw_u = ((compound - v_t.detach()) ** 2).sum(dims)
    raw_v = ((v - v_t.detach()) ** 2).sum(dims)
    loss_u, loss_v = adaptive_weight(raw_u, cfg), adaptive_weight(raw_v, cfg)
    return PMFTerms(
        loss=(loss_u + cfg.v_loss_weight * loss_v).mean(),
        loss_u=loss_u,
        loss_v=loss_v,
        raw_u=raw_u.detach(),
        x_pred=z_t - tb * u,
        du_dt=du_dt,
        compound_v=compound,
        aux=aux,
    )


def flow_matching_objective(
    fn: XPredFn, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, cfg: PMFConfig
) -> torch.Tensor:
    """Plain flow matching on the same parameterisation (``r = t``, no JVP), plus the
    network's auxiliary loss: the baseline the benchmark compares a pMF step against."""
    tb = _bcast(t, x)
    z_t = (1.0 - tb) * x + tb * eps
    xu, xv, aux = _split(fn(z_t, t, t, torch.arange(x.shape[0], device=x.device)))
    v_t = velocity(z_t, x, t, cfg.t_min)
    dims = tuple(range(1, x.ndim))
    loss_u = ((velocity(z_t, xu, t, cfg.t_min) - v_t) ** 2).sum(dims)
    loss_v = ((velocity(z_t, xv, t, cfg.t_min) - v_t) ** 2).sum(dims)
    weighted = adaptive_weight(loss_u, cfg) + cfg.v_loss_weight * adaptive_weight(loss_v, cfg)
    return weighted.mean() + aux


def one_step_sample(fn: XPredFn, noise: torch.Tensor) -> torch.Tensor:
    """``x̂ = z_1 - u(z_1, 0, 1)`` with ``z_1 = noise``: the u-head's x̂ at ``(t, r) = (1, 0)``."""
    batch = noise.shape[0]
    ones = torch.ones(batch, dtype=noise.dtype, device=noise.device)
    rows = torch.arange(batch, device=noise.device)
    return _split(fn(noise, ones, torch.zeros_like(ones), rows))[0]
