"""Evaluation benchmark on the embedded default's held-out clips, in one invocation.

    .venv/bin/python benchmarks/bench_evaluate.py [--config configs/default.yaml]
        [--data-root DIR] [--set key=value ...] [--out DIR]

1. The pipeline up to ``train`` runs through the engine (local executor) on the config's
   data (the generated sample by default). ``--data-root`` keeps that work between
   invocations; only the steps below are timed.
2. **Generation**: the generate stage's ``process`` on every held-out clip the planner gives
   it (every committed checkpoint, both settings), committing into a fresh store so no video
   comes from the cache — the baseline every evaluation figure is a ratio against.
3. **Evaluation**: the evaluate stage's ``process`` on the same clips (fresh store: nothing
   cached), then ``evaluate_set``. Reported: wall time of both, evaluation as a share of
   generation time, and frames/s per metric family from the metric suite's own timers
   (``pixel`` = PSNR + SSIM; each network family; frames counted once per video it saw).
4. **Decode once**: each generated video and each ground truth is decoded once for all
   metrics; the decode time is measured on its own, and what decoding once *per metric
   family* would cost instead is that time × the number of frame-reading families.

Figures go to stdout and ``<out>/bench_evaluate.json``. The metric networks are the
config's (random-init stand-ins of the official architectures on the embedded default: the
same compute as the real weights, except the smaller ArcFace and 1/8-width LPIPS stand-ins).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.store import ArtifactStore
from talkforge.config import load_config
from talkforge.engine import Engine
from talkforge.executors import LocalExecutor
from talkforge.plan import RunOptions, select_stages
from tasks.base import AggregateInputs, ItemContext, ItemInputs
from tasks.evaluate import EvaluateStage, decode
from tasks.evaluate_set import EvaluateSetStage
from tasks.generate import GenerateStage
from tasks.records import ClipMetrics, GeneratedClip

REPO = Path(__file__).resolve().parents[1]


def upstream(engine: Engine, run_id: str) -> None:
    """Run (or find cached) every stage before generate."""
    for stage in select_stages(until="train"):
        summary = engine.run_stage(run_id, stage, RunOptions(stages=[stage]))
        print(f"  {stage:10s} ran {summary.done} cached {summary.cached} "
              f"failed {summary.failed} {summary.blocked_reason}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    root = args.data_root or Path(tempfile.mkdtemp(prefix="bench-eval-"))
    out_dir = args.out or root
    cfg = load_config(args.config, [f"project.data_root={root}", *args.overrides])
    engine = Engine(cfg, executor=LocalExecutor(cfg.ray))
    run_id = engine.start_run("bench_evaluate", RunOptions())
    print(f"data root {root}")
    upstream(engine, run_id)

    env = engine.stage_env(run_id, "generate")
    gen_stage = GenerateStage(cfg.stage("generate"), env)  # type: ignore[arg-type]
    plan = engine.plan(run_id, "generate", RunOptions(), dry_run=True)  # the planner's inputs
    inputs = list(plan.inputs_for(plan.to_run).values())
    if not inputs:
        raise SystemExit(f"no held-out clip to generate: {plan.blocked_reason}")
    fresh = Path(tempfile.mkdtemp(prefix="bench-eval-store-", dir=root))
    store = ArtifactStore(str(fresh))

    gen_stage.setup()
    generated: list[tuple[ItemInputs, GeneratedClip]] = []
    t0 = time.perf_counter()
    for item in inputs:
        ctx = ItemContext(store, "generate", item.item_id, "b" * 40)
        generated.append((item, gen_stage.process(item, ctx)))
        ctx.close()
    generate_s = time.perf_counter() - t0
    videos = [v for _, g in generated for v in g.videos]
    gen_frames = sum(v.num_frames for v in videos)

    ev = EvaluateStage(cfg.stage("evaluate"), engine.stage_env(run_id, "evaluate"))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    ev.setup()
    load_s = time.perf_counter() - t0
    results: list[ClipMetrics] = []
    t0 = time.perf_counter()
    for item, rec in generated:
        records = {k: item.records[k] for k in ("faces", "features")} | {"generate": rec}
        ctx = ItemContext(store, "evaluate", item.item_id, "c" * 40)
        results.append(ev.process(ItemInputs(item_id=item.item_id, records=records), ctx))
        ctx.close()
    evaluate_s = time.perf_counter() - t0
    agg = EvaluateSetStage(cfg.stage("evaluate_set"), engine.stage_env(run_id, "evaluate_set"))  # type: ignore[arg-type]
    items = [ItemInputs(item_id=r.clip_id, records={"evaluate": r}) for r in results]
    t0 = time.perf_counter()
    ctx = ItemContext(store, "evaluate_set", "evaluate_set", "d" * 40)
    table = agg.process(AggregateInputs(item_id="evaluate_set", items=items), ctx)
    ctx.close()
    set_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    decoded = 0
    for item, rec in generated:
        decoded += len(decode(store.local_path(item.records["faces"].crops.uri, fresh), 16))
        for v in rec.videos:
            decoded += len(decode(store.local_path(v.video.uri, fresh), 16))
    decode_s = time.perf_counter() - t0
    assert ev.suite is not None
    readers = [f for f in ev.suite.timings if f != "pixel"] + ["pixel"]
    families = {
        f: {
            "seconds": round(s, 3),
            "frames": int(n),
            "frames_per_s": round(n / s, 1) if s else None,
        }
        for f, (s, n) in sorted(ev.suite.timings.items())
    }
    eval_total = evaluate_s + set_s
    figures = {
        "held_out_clips": len(generated),
        "generated_videos": len(videos),
        "generated_frames": gen_frames,
        "generate_s": round(generate_s, 2),
        "generate_frames_per_s": round(gen_frames / generate_s, 2),
        "metric_networks_load_s": round(load_s, 2),
        "evaluate_s": round(evaluate_s, 2),
        "evaluate_set_s": round(set_s, 2),
        "evaluation_over_generation": round(eval_total / generate_s, 3),
        "evaluate_frames_per_s": round(gen_frames / evaluate_s, 2),
        "per_family": families,
        "decode_once_s": round(decode_s, 2),
        "decoded_frames": decoded,
        "decode_share_of_evaluation": round(decode_s / evaluate_s, 3),
        "decode_per_family_would_be_s": round(decode_s * len(readers), 2),
        "eval_summary_rows": len(table.summary),
    }
    print(f"held-out clips {len(generated)}, videos {len(videos)} ({gen_frames} frames)")
    print(f"generate {generate_s:.1f} s ({gen_frames / generate_s:.1f} frames/s)")
    print(f"evaluate {evaluate_s:.1f} s + set {set_s:.1f} s (+ network load {load_s:.1f} s) = "
          f"{eval_total / generate_s:.2f}x generation time")  # fmt: skip
    for f, d in families.items():
        print(
            f"  {f:22s} {d['frames_per_s']!s:>8} frames/s ({d['seconds']} s, {d['frames']} frames)"
        )
    print(f"decode once: {decode_s:.2f} s for {decoded} frames ({decode_s / evaluate_s:.1%} of "
          f"evaluation); once per family ({len(readers)} families) would be "
          f"{decode_s * len(readers):.2f} s")  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_evaluate.json").write_text(json.dumps(figures, indent=1))
    engine.finish_run(run_id, "finished", RunOptions())
    engine.close()


if __name__ == "__main__":
    main()
