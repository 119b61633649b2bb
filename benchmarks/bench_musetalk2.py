"""MuseTalk 2.0 costs, as ratios against baselines measured in the same run.

1. **pMF training step vs plain flow matching** on the same network and batch: forward +
   du/dt + backward of :func:`generators.blocks.pmf.pmf_objective` against forward +
   backward of :func:`~generators.blocks.pmf.flow_matching_objective` (target ≤ 1.6×), for
   each way of computing du/dt (``pmf.jvp``): ``exact`` (``torch.func.jvp``, forced onto the
   math SDPA backend: the flow step is also timed forced to math, their ratio is what the
   backend alone costs) and ``finite_difference`` (``central`` and ``one_sided``, fused
   kernels kept); plus whether the exact JVP runs through this device's fused SDPA kernels.
2. **DSA vs dense temporal attention** at ``L`` tokens and ``k`` selected keys, projections,
   indexer and top-k included (inference forward; target ≤ 0.4× dense at L = 4096, k = 512
   on this CPU), against the same block with ``scaled_dot_product_attention`` (default
   backend, math backend, and bf16), swept over ``L`` for the crossover below which dense is
   cheaper; with the split into shared projections / indexer projections / chunked scoring
   + top-k / sparse core at each ``L``, the previous full-matrix scoring and top-k for
   reference (up to ``--reference-max-len``, as the math backend: both hold ``(L, L)``
   matrices), and at ``--parts-at`` the scoring + top-k cost for other indexer sizes.
3. The full-size network's parameter count (built on the meta device).

On a machine shared with other work, wall-clock ratios swing with the load; ``--threads 1
--clock cpu`` times each function by its own process CPU time (exact for one thread).

Usage::

    python benchmarks/bench_musetalk2.py                 # CPU defaults (a few minutes)
    python benchmarks/bench_musetalk2.py --threads 1 --clock cpu --json figures.json
    python benchmarks/bench_musetalk2.py --device cuda --widths 320,640,1280,1280 --latent 32
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from generators.blocks.config import PMFConfig
from generators.blocks.dsa import (
    DSAConfig,
    LightningIndexer,
    SparseSelfAttention,
    index_scores,
    indexer_topk,
    select_topk,
    sparse_attention,
)
from generators.musetalk2.config import Musetalk2Config, make_spec
from generators.musetalk2.network import Musetalk2Net

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
# indexer (heads, dim): the default 4×32, the paper's H_I/H = 0.5 at 4 attention heads, smaller
INDEXER_SIZES = ((8, 32), (4, 32), (2, 32), (2, 16), (1, 32))


def timed(
    fns: dict[str, Callable[[], object]], repeats: int, device: str, clock: str = "wall"
) -> dict[str, float]:
    """Median seconds of each function, the functions run interleaved (one round each per
    repeat, after a warm-up round) so a load change on a shared machine hits all alike.
    ``clock="cpu"``: this process's CPU time instead of wall time (CPU device only)."""
    now = time.process_time if clock == "cpu" else time.perf_counter

    def once(fn: Callable[[], object]) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = now()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return now() - t0

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
        args.clock,
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


def dsa_vs_dense(length: int, args, sizes: bool = False) -> dict[str, object]:
    channels, heads, k, dev = args.dsa_channels, args.dsa_heads, args.top_k, args.device
    cfg = DSAConfig(
        heads=heads,
        indexer_heads=args.indexer_heads,
        indexer_dim=args.indexer_dim,
        top_k=k,
        query_chunk=args.query_chunk,
    )
    torch.manual_seed(0)
    block = SparseSelfAttention(channels, cfg).to(dev).eval()
    block_bf16 = copy.deepcopy(block).to(torch.bfloat16)
    x = torch.randn(1, length, channels, device=dev)
    frames = torch.arange(16, device=dev).repeat_interleave(max(1, length // 16))[:length]

    def dense(blk: SparseSelfAttention, inp: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            q, kk, v = (
                u.view(1, length, heads, -1).transpose(1, 2)
                for u in blk.qkv(blk.norm(inp)).chunk(3, -1)
            )
            y = F.scaled_dot_product_attention(q, kk, v)
            blk.out(y.transpose(1, 2).reshape(1, length, channels))

        return run

    with torch.no_grad():
        h = block.norm(x)
        q, kk, v = (u.view(1, length, heads, -1).transpose(1, 2) for u in block.qkv(h).chunk(3, -1))
        qi, ki, wi = block.indexer.project(h)
        idx, valid = indexer_topk(qi, ki, wi, k, None, cfg.query_chunk)
        fns = {
            "dense": dense(block, x),
            "dense_bf16": dense(block_bf16, x.bfloat16()),
            "dsa": lambda: block(x, frames),
            "projections": lambda: block.qkv(block.norm(x)),
            "indexer_projections": lambda: block.indexer.project(h),
            "score_topk": lambda: indexer_topk(qi, ki, wi, k, None, cfg.query_chunk),
            "core": lambda: sparse_attention(q, kk, v, idx, valid, "csr", need_probs=False),
        }
        if length <= args.reference_max_len:  # these hold (L, L) matrices
            fns["dense_math"] = math_backend(dense(block, x))
            scores = index_scores(qi, ki, wi, cfg.query_chunk)
            fns["full_matrix_scores"] = lambda: index_scores(qi, ki, wi, 1024)
            fns["full_matrix_topk"] = lambda: select_topk(scores, k, None)
        if sizes:
            for hi, di in INDEXER_SIZES:
                lin = LightningIndexer(channels, hi, di).to(dev)
                parts = lin.project(h)
                fns[f"score_topk_h{hi}_d{di}"] = partial(
                    indexer_topk, *parts, k, None, cfg.query_chunk
                )
        got = timed(fns, args.repeats, dev, args.clock)
    s = got["dsa"]
    row: dict[str, object] = {"L": length, "k": k, **{f"{n}_s": t for n, t in got.items()}}
    for base in ("dense", "dense_math", "dense_bf16"):
        if base in got:
            row[f"dsa_over_{base}"] = s / got[base]
    row["share_of_dsa"] = {
        n: got[n] / s for n in ("projections", "indexer_projections", "score_topk", "core")
    }
    return row


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
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--widths", default="64,128,128", help="UNet block_out_channels")
    parser.add_argument("--latent", type=int, default=16, help="latent height = width")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dsa-channels", type=int, default=640)
    parser.add_argument("--dsa-heads", type=int, default=8)
    parser.add_argument("--indexer-heads", type=int, default=4)
    parser.add_argument("--indexer-dim", type=int, default=32)
    parser.add_argument("--query-chunk", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=512)
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--parts-at", type=int, default=4096, help="L of the indexer-size rows")
    parser.add_argument(
        "--reference-max-len", type=int, default=4096, help="largest L for math / unchunked"
    )
    parser.add_argument("--skip", default="", help="comma list of: pmf, dsa")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu times CPU work only")
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    report: dict[str, object] = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "torch": torch.__version__,
    }
    report["full_size_params"] = full_size_params()
    print("full-size parameters:", report["full_size_params"], flush=True)
    if "pmf" not in skip:
        report["pmf_vs_flow"] = pmf_vs_flow(args)
        print("pmf vs flow:", json.dumps(report["pmf_vs_flow"]), flush=True)
    if "dsa" not in skip:
        sweep = []
        for length in (int(v) for v in args.lengths.split(",")):
            row = dsa_vs_dense(length, args, sizes=length == args.parts_at)
            sweep.append(row)
            print("dsa:", json.dumps(row), flush=True)
        report["dsa_sweep"] = sweep
        for base in ("dense", "dense_math", "dense_bf16"):
            cheaper = [r["L"] for r in sweep if r.get(f"dsa_over_{base}", 2.0) < 1.0]
            report[f"dsa_crossover_L_vs_{base}"] = min(cheaper) if cheaper else None
            print(f"DSA cheaper than {base} from L =", report[f"dsa_crossover_L_vs_{base}"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
