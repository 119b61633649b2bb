"""MuseTalk 2.0 costs, as ratios against baselines measured in the same run.

1. **pMF training step vs plain flow matching** on the same network and batch: forward +
   JVP + backward of :func:`generators.blocks.pmf.pmf_objective` against forward + backward
   of :func:`~generators.blocks.pmf.flow_matching_objective` (target ≤ 1.6×). The JVP pass
   runs under the math SDPA backend (fused kernels have no forward-AD formula), so the flow
   step is timed under the default backend *and* forced to math: their ratio is what the
   backend alone costs.
2. **DSA vs dense temporal attention** at ``L`` tokens and ``k`` selected keys, indexer and
   top-k included (forward; target ≤ 0.4× dense at L = 4096, k = 512 on this CPU), against
   ``scaled_dot_product_attention`` on the same q, k, v (default backend, and math), swept
   over ``L`` for the crossover below which dense is cheaper; with the indexer / top-k /
   sparse-core split at each ``L``.
3. The full-size network's parameter count (built on the meta device).

Usage::

    python benchmarks/bench_musetalk2.py                 # CPU defaults (a few minutes)
    python benchmarks/bench_musetalk2.py --device cuda --widths 320,640,1280,1280 --latent 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from generators.blocks.pmf import PMFConfig
from generators.blocks.dsa import DSAConfig, SparseSelfAttention, select_topk, sparse_attention
from generators.musetalk2.config import Musetalk2Config, make_spec
from generators.musetalk2.network import Musetalk2Net

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")


def timed(fns: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each function, the functions run interleaved (one round each per
    repeat, after a warm-up round) so a load change on a shared machine hits all alike."""

    def once(fn: Callable[[], object]) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for fn in fns.values():
        fn()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(once(fn))
    return {name: statistics.median(v) for name, v in runs.items()}


def math_backend(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with sdpa_kernel([SDPBackend.MATH]):
            return fn()

    return run


def pmf_vs_flow(args) -> dict[str, float]:
    widths = [int(w) for w in args.widths.split(",")]
    cfg = Musetalk2Config(block_out_channels=widths, layers_per_block=1)
    c, hw, dim = 16, args.latent, 512
    spec = make_spec(cfg, {"vae_latents": [c, hw, hw], "sensevoice": [dim]})
    torch.manual_seed(0)
    net = Musetalk2Net(spec).to(args.device)
    n = args.batch
    g = torch.Generator().manual_seed(1)
    t = torch.rand(n, generator=g) * 0.9 + 0.05
    mask = torch.zeros(n, 1, hw, hw)
    mask[:, :, hw // 2 :] = 1
    batch = {
        "target": torch.randn(n, c, hw, hw, generator=g),
        "reference": torch.randn(n, c, hw, hw, generator=g),
        "mask": mask,
        "audio": torch.randn(n, spec.audio_tokens, dim, generator=g),
        "noise": torch.randn(n, c, hw, hw, generator=g),
        "t": t,
        "r": torch.where(torch.arange(n) % 2 == 0, t, t * 0.5),  # data_proportion 0.5
        "frames": torch.tensor(1),
    }
    batch = {k: v.to(args.device) for k, v in batch.items()}

    def step(mode: str, pmf: PMFConfig | None = None) -> Callable[[], None]:
        def run() -> None:
            net.zero_grad(set_to_none=True)
            out = net(batch, mode=mode, pmf=pmf)
            out[mode].backward()

        return run

    fd = {s: PMFConfig(jvp="finite_difference", fd_scheme=s) for s in ("central", "one_sided")}
    got = timed(
        {
            "flow": step("flow"),
            "flow_math": math_backend(step("flow")),
            "pmf_exact": step("pmf"),
            "pmf_fd_central": step("pmf", fd["central"]),
            "pmf_fd_one_sided": step("pmf", fd["one_sided"]),
        },
        args.repeats,
        args.device,
    )
    flow = got["flow"]
    return {
        "params": sum(p.numel() for p in net.parameters()),
        **{f"{name}_s": v for name, v in got.items()},
        **{f"{name}_over_flow": v / flow for name, v in got.items() if name != "flow"},
        "exact_jvp_with_fused_sdpa": fused_sdpa_forward_ad(args.device),
    }


def fused_sdpa_forward_ad(device: str) -> str:
    """Whether ``torch.func.jvp`` runs through this device's fused SDPA kernels (CPU: flash;
    CUDA: memory-efficient, then flash): "ok", or the error torch raises."""
    kinds = [SDPBackend.FLASH_ATTENTION]
    if device.startswith("cuda"):
        kinds = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]
    q, k, v = (torch.randn(1, 2, 64, 32, device=device) for _ in range(3))
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    found = []
    for kind in kinds:
        try:
            with sdpa_kernel([kind]):
                torch.func.jvp(lambda x: F.scaled_dot_product_attention(x, k, v), (q,), (q,))
            found.append(f"{kind.name}: ok")
        except (NotImplementedError, RuntimeError) as err:
            found.append(f"{kind.name}: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
    return "; ".join(found)


def dsa_vs_dense(length: int, k: int, channels: int, heads: int, args) -> dict[str, float]:
    cfg = DSAConfig(heads=heads, indexer_heads=4, indexer_dim=32, top_k=k, query_chunk=1024)
    torch.manual_seed(0)
    block = SparseSelfAttention(channels, cfg).to(args.device).eval()
    x = torch.randn(1, length, channels, device=args.device)
    frames = torch.arange(16, device=args.device).repeat_interleave(max(1, length // 16))[:length]

    def dense() -> None:
        h = block.norm(x)
        q, kk, v = (u.view(1, length, heads, -1).transpose(1, 2) for u in block.qkv(h).chunk(3, -1))
        y = F.scaled_dot_product_attention(q, kk, v)
        block.out(y.transpose(1, 2).reshape(1, length, channels))

    def sparse() -> None:
        block(x, frames)

    with torch.no_grad():
        h = block.norm(x)
        q, kk, v = (u.view(1, length, heads, -1).transpose(1, 2) for u in block.qkv(h).chunk(3, -1))
        scores = block.indexer(h)
        idx, valid = select_topk(scores, k, None)
        got = timed(
            {
                "dense": dense,
                "dense_math": math_backend(dense),
                "dsa": sparse,
                "indexer": lambda: block.indexer(h),
                "topk": lambda: select_topk(scores, k, None),
                "core": lambda: sparse_attention(q, kk, v, idx, valid),
            },
            args.repeats,
            args.device,
        )
    d, d_math, s = got["dense"], got["dense_math"], got["dsa"]
    parts = {f"{n}_s": got[n] for n in ("indexer", "topk", "core")}
    return {
        "L": length,
        "k": k,
        "dense_s": d,
        "dense_math_s": d_math,
        "dsa_s": s,
        **parts,
        "dsa_over_dense": s / d,
        "dsa_over_dense_math": s / d_math,
    }


def full_size_params() -> dict[str, int]:
    out = {}
    for stage in ("stage1", "stage2"):
        cfg = Musetalk2Config(training_stage=stage, unet="full")
        spec = make_spec(cfg, {"vae_latents": [16, 32, 32], "sensevoice": [512]})
        with torch.device("meta"):
            net = Musetalk2Net(spec)
        out[stage] = sum(p.numel() for p in net.parameters())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--widths", default="64,128,128", help="UNet block_out_channels")
    parser.add_argument("--latent", type=int, default=16, help="latent height = width")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dsa-channels", type=int, default=640)
    parser.add_argument("--dsa-heads", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=512)
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    report: dict[str, object] = {"device": args.device, "threads": torch.get_num_threads()}
    report["full_size_params"] = full_size_params()
    print("full-size parameters:", report["full_size_params"], flush=True)
    report["pmf_vs_flow"] = pmf_vs_flow(args)
    print("pmf vs flow:", json.dumps(report["pmf_vs_flow"]), flush=True)
    sweep = []
    for length in (int(v) for v in args.lengths.split(",")):
        row = dsa_vs_dense(length, args.top_k, args.dsa_channels, args.dsa_heads, args)
        sweep.append(row)
        print("dsa:", json.dumps(row), flush=True)
    report["dsa_sweep"] = sweep
    for base in ("dense", "dense_math"):
        cheaper = [r["L"] for r in sweep if r[f"dsa_over_{base}"] < 1.0]
        report[f"dsa_crossover_L_vs_{base}"] = min(cheaper) if cheaper else None
        print(f"DSA cheaper than {base} from L =", report[f"dsa_crossover_L_vs_{base}"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
