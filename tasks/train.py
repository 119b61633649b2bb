"""Train stage: fit the configured model family on all training clips (aggregate).

The stage does not know the family: ``train.family`` (default ``musetalk15``) selects one
from :mod:`generators.registry`, whose config fields sit beside the stage's own
(``train: {family: musetalk15, steps: 20, audio_window_frames: 2}``), validated as one
discriminated union at start. The family declares which feature files it reads; the
stage checks their headers, and the ranks hand the data, batches and losses to the family.

The stage itself does no training. It writes a manifest (training clips' feature files,
the Engram bank, hyper-parameters, the family config) into a **persistent** work dir
``<data_root>/work/train/<item_key[:20]>/`` and runs ``accelerate launch`` as a subprocess;
the ranks (:mod:`tasks.train_worker`) checkpoint there. The item key changes with inputs,
code and config, so the same key means the same training run: a run interrupted for any
reason (killed worker, lost node, Ctrl-C) is retried by the engine, finds the work dir and
resumes from its last checkpoint instead of starting over.

**Two CPU processes with accelerate.** ``accelerate launch --cpu --num_processes 2`` starts
*one* process (the ``--cpu`` path uses the simple launcher, which only fans out through
``mpirun``); ``--multi_gpu --num_processes 2`` alone starts two processes that each train
alone on a machine without CUDA (distributed type NO). What gives two ranks with gloo DDP
is ``--multi_gpu`` (torchrun fan-out) plus ``ACCELERATE_USE_CPU=true`` in the environment
(each rank's ``Accelerator`` then picks ``MULTI_CPU``/gloo). A config file written here is
passed too, so a user's ``default_config.yaml`` cannot change the launch, and
``--main_process_port 0`` picks a free port so concurrent runs do not collide. The ranks'
reports are checked after the run: all trained, same final weights.

Trade-off: training runs on the worker's host in a child process group; the stage's
``resources.num_cpus`` should cover ``num_processes``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, TypeAdapter

from generators import registry
from generators.family import DataLayout
from generators.io import tensor_shape
from storage.store import ArtifactRef
from tasks.base import (
    AggregateInputs,
    FailureKind,
    ItemContext,
    ItemFailure,
    Record,
    Stage,
    StageConfig,
)
from tasks.lifetime import WorkDirBusy, WorkDirLock, guarded_command
from tasks.records import ClipFeatures, MemoryBank, TrainedCheckpoint, TrainStep
from tasks.split import is_heldout
from tasks.train_data import (
    CHECKPOINT_NAME,
    HISTORY_NAME,
    MANIFEST_NAME,
    RANKS_DIR,
    ClipEntry,
    TrainManifest,
    load_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_NAME = "model.safetensors"
ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: {distributed_type}
num_processes: {num_processes}
num_machines: 1
machine_rank: 0
mixed_precision: '{mixed_precision}'
use_cpu: true
gpu_ids: all
debug: false
rdzv_backend: static
same_network: true
main_training_function: main
downcast_bf16: 'no'
"""


class TrainStageConfig(StageConfig):
    """The stage's own fields; each registered family's config is merged in (``TrainConfig``)."""

    steps: int = Field(20, ge=1, description="optimizer steps in total (resumes count)")
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(4, ge=1, description="frames per process per step")
    num_processes: int = Field(2, ge=1, le=64, description="DDP ranks (CPU processes)")
    checkpoint_every: int = Field(5, ge=1, description="steps between resumable checkpoints")
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"


TrainConfig = registry.config_union(TrainStageConfig)


def train_config(**values: object) -> TrainStageConfig:
    """Validate a train section (``family`` selects the member; default musetalk15)."""
    return TypeAdapter(TrainConfig).validate_python(values)


def work_dir_for(data_root: str | Path, item_key: str) -> Path:
    return Path(data_root) / "work" / "train" / item_key[:20]


def launch_command(
    manifest_path: Path, config_path: Path, num_processes: int, mp: str
) -> list[str]:
    """The ``accelerate launch`` argument list (run with :func:`launch_env`)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path)]
    if num_processes > 1:
        cmd += ["--multi_gpu", "--main_process_port", "0"]
    else:
        cmd += ["--cpu"]
    cmd += [
        "--num_processes", str(num_processes),
        "--num_machines", "1",
        "--mixed_precision", mp,
        "--dynamo_backend", "no",
        "-m", "tasks.train_worker",
        "--manifest", str(manifest_path),
    ]  # fmt: skip
    return cmd


def launch_env(num_processes: int) -> dict[str, str]:
    env = dict(os.environ)
    env["ACCELERATE_USE_CPU"] = "true"
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_processes))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the launcher (torchrun forwards it to the ranks, which run in their own
    sessions), then SIGKILL its process group if it has not exited within ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


_RANK_ERROR = re.compile(r"^\[rank(\d+)\]: ([A-Za-z_][\w.]*(?:Error|Exception)\b.*)$")


def failure_summary(stderr_log: Path, offset: int = 0, limit: int = 600) -> str:
    """One line from a failed launch's stderr: the first rank exception, torchrun's root cause.

    Only the bytes after ``offset`` (this launch's part of an appended log) are read.
    torchrun ends stderr with a summary whose last lines say little ("To enable traceback
    see ..."), so the rank's own exception line is searched for first.
    """
    try:
        with stderr_log.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return "no stderr"
    parts: list[str] = []
    for line in lines:
        m = _RANK_ERROR.match(line.strip())
        if m:
            parts.append(f"rank {m.group(1)}: {m.group(2)}")
            break
    if "Root Cause (first observed failure):" in lines:
        root = lines[lines.index("Root Cause (first observed failure):") :]
        parts += [ln.strip() for ln in root if ln.strip().startswith(("exitcode", "traceback"))][:2]
    if not parts:
        parts = [ln.strip() for ln in lines[-4:] if ln.strip()]
    return " | ".join(parts)[:limit]


class TrainStage(Stage[TrainStageConfig]):
    """Aggregate stage: all training clips in, one ``model.safetensors`` checkpoint out."""

    name: ClassVar[str] = "train"
    code_version: ClassVar[str] = "2"
    requires: ClassVar[tuple[str, ...]] = ("features", "engram")
    aggregate: ClassVar[bool] = True
    config_type: ClassVar[type[StageConfig]] = TrainStageConfig  # merged with a family's

    def accepts(self, item_id: str, shared: dict[str, Record]) -> bool:
        return not is_heldout(item_id, self.env)

    # ------------------------------------------------------------------ manifest

    def _bank(self, inputs: AggregateInputs) -> MemoryBank:
        rec = inputs.shared.get("engram")
        if rec is None:
            rec = next((it.shared["engram"] for it in inputs.items if "engram" in it.shared), None)
        if not isinstance(rec, MemoryBank):
            raise ItemFailure(FailureKind.INTERNAL, "train: no committed engram memory bank")
        return rec

    def build_manifest(
        self, inputs: AggregateInputs, ctx: ItemContext, work: Path
    ) -> TrainManifest:
        """Validate each clip's feature headers (no tensor data is read) into a manifest.

        The family says which feature files it reads; each must exist, be readable and have
        ``num_frames`` rows. A clip that fails is skipped (listed in the manifest's
        ``skipped`` with the reason) rather than failing the whole training run. All clips
        must agree on per-frame shapes and on the model that made each feature.
        """
        cfg = self.config
        family = registry.instantiate(cfg)
        bank = self._bank(inputs) if family.uses_memory_bank else None
        entries: list[ClipEntry] = []
        skipped: list[str] = []
        shapes: set[tuple[tuple[str, tuple[int, ...]], ...]] = set()
        model_shas: dict[str, set[str]] = {f: set() for f in family.features}
        for item in sorted(inputs.items, key=lambda it: it.item_id):
            if is_heldout(item.item_id, self.env):
                continue
            try:
                feats = item.get("features", ClipFeatures)
                files = {f: feats.file(f) for f in family.features}
                paths = {f: ctx.local_path(ff.artifact) for f, ff in files.items()}
                clip_shapes = {
                    f: tensor_shape(paths[f], name) for f, name in family.features.items()
                }
            except (KeyError, TypeError) as exc:
                skipped.append(f"{item.item_id}: {exc}")
                continue
            except Exception as exc:  # any unreadable header: skip the clip, keep training
                skipped.append(f"{item.item_id}: unreadable features ({exc})")
                continue
            if any(len(v) < 2 or v[0] != feats.num_frames for v in clip_shapes.values()):
                skipped.append(f"{item.item_id}: features {clip_shapes} misaligned")
                continue
            shapes.add(tuple(sorted((f, tuple(v[1:])) for f, v in clip_shapes.items())))
            for f, ff in files.items():
                model_shas[f].add(ff.model.sha256)
            entries.append(
                ClipEntry(
                    clip_id=item.item_id,
                    num_frames=feats.num_frames,
                    paths={f: str(p) for f, p in paths.items()},
                    sha256={f: ff.artifact.sha256 for f, ff in files.items()},
                )
            )
        if not entries:
            raise ItemFailure(
                FailureKind.FORMAT, f"train: no usable training clips ({'; '.join(skipped[:3])})"
            )
        mixed = sorted(f for f, shas in model_shas.items() if len(shas) > 1)
        if len(shapes) > 1 or mixed:
            raise ItemFailure(
                FailureKind.FORMAT,
                f"train: clips disagree on feature shapes {sorted(shapes)} or come from "
                f"several models ({mixed})",
            )
        layout = DataLayout(shapes={f: list(v) for f, v in shapes.pop()})
        manifest = TrainManifest(
            work_dir=str(work),
            model=registry.family_config(cfg),
            clips=entries,
            bank_path=str(ctx.local_path(bank.bank)) if bank else None,
            bank_sha256=bank.bank.sha256 if bank else None,
            layout=layout,
            steps=cfg.steps,
            learning_rate=cfg.learning_rate,
            batch_size=cfg.batch_size,
            num_processes=cfg.num_processes,
            checkpoint_every=cfg.checkpoint_every,
            seed=cfg.seed,
            skipped=skipped,
        )
        try:
            manifest.spec()
        except ValueError as exc:
            raise ItemFailure(FailureKind.FORMAT, f"train: {family.name}: {exc}") from exc
        return manifest

    # ------------------------------------------------------------------ run

    def run_training(self, manifest: TrainManifest) -> None:
        """Launch the ranks and wait; a non-zero exit becomes ``ItemFailure(INTERNAL)``."""
        cfg = self.config
        work = Path(manifest.work_dir)
        if cfg.mixed_precision == "fp16":
            raise ItemFailure(
                FailureKind.INTERNAL,
                "train: fp16 mixed precision needs CUDA; the ranks run on CPU (use bf16 or no)",
                retryable=False,
            )
        try:  # one trainer per work dir; a dead owner's orphaned ranks are ended first
            lock = WorkDirLock(work).acquire()
        except WorkDirBusy as exc:
            raise ItemFailure(FailureKind.INTERNAL, f"train: {exc}", retryable=True) from exc
        try:
            self._launch(manifest, lock)
        finally:
            lock.release()

    def _launch(self, manifest: TrainManifest, lock: WorkDirLock) -> None:
        cfg = self.config
        work = Path(manifest.work_dir)
        manifest_path = work / MANIFEST_NAME
        tmp = work / f".tmp-{MANIFEST_NAME}"
        tmp.write_text(manifest.model_dump_json(indent=1))
        os.replace(tmp, manifest_path)
        config_path = work / "accelerate_config.yaml"
        config_path.write_text(
            ACCELERATE_CONFIG.format(
                distributed_type="MULTI_GPU" if cfg.num_processes > 1 else "NO",
                num_processes=cfg.num_processes,
                mixed_precision=cfg.mixed_precision,
            )
        )
        for old in (work / RANKS_DIR).glob("rank-*.json"):
            old.unlink()
        cmd = launch_command(manifest_path, config_path, cfg.num_processes, cfg.mixed_precision)
        out_log, err_log = work / "launch.stdout.log", work / "launch.stderr.log"
        err_offset = err_log.stat().st_size if err_log.exists() else 0
        with out_log.open("ab") as out, err_log.open("ab") as err:
            proc = subprocess.Popen(
                guarded_command(cmd),  # dies with this process (parent-death signal)
                cwd=REPO_ROOT,
                env=lock.child_env(launch_env(cfg.num_processes)),
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group, stoppable as one
            )
            try:
                code = proc.wait()
            except BaseException:  # cancelled: stop the whole launch before re-raising
                _stop(proc)
                raise
        if code != 0:
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            raise ItemFailure(
                FailureKind.INTERNAL,
                f"train: accelerate launch {how}: {failure_summary(err_log, err_offset)}",
            )

    def check_ranks(self, work: Path) -> dict:
        """Every rank reported, trained if there was work, and ended with the same weights."""
        n = self.config.num_processes
        reports = [
            json.loads(p.read_text()) for p in sorted((work / RANKS_DIR).glob("rank-*.json"))
        ]
        if sorted(r["rank"] for r in reports) != list(range(n)):
            raise ItemFailure(FailureKind.INTERNAL, f"train: {len(reports)} of {n} ranks reported")
        if n > 1 and any(r["distributed_type"] != "MULTI_CPU" for r in reports):
            kinds = sorted({r["distributed_type"] for r in reports})
            raise ItemFailure(FailureKind.INTERNAL, f"train: ranks ran as {kinds}, not MULTI_CPU")
        if any(r["steps_run"] > 0 and r["samples_seen"] == 0 for r in reports):
            raise ItemFailure(FailureKind.INTERNAL, "train: a rank saw no samples")
        if len({r["state_sha256"] for r in reports}) != 1:
            raise ItemFailure(FailureKind.INTERNAL, "train: ranks ended with different weights")
        return next(r for r in reports if r["rank"] == 0)

    def process(self, inputs: AggregateInputs, ctx: ItemContext) -> TrainedCheckpoint:
        cfg = self.config
        work = work_dir_for(self.env.data_root, ctx.item_key)
        work.mkdir(parents=True, exist_ok=True)
        manifest = self.build_manifest(inputs, ctx, work)
        self.run_training(manifest)
        rank0 = self.check_ranks(work)

        state = load_checkpoint(work / CHECKPOINT_NAME)
        if state.step != cfg.steps or state.manifest_fingerprint != manifest.fingerprint():
            raise ItemFailure(
                FailureKind.INTERNAL,
                f"train: last checkpoint is step {state.step}, not {cfg.steps}",
            )
        family = manifest.family()
        spec = manifest.spec()
        model = family.build(spec)
        model.load_state_dict(state.model, strict=True)
        out = ctx.scratch / WEIGHTS_NAME
        family.save_weights(out, model, spec)
        ref: ArtifactRef = ctx.commit(out, WEIGHTS_NAME, kind="checkpoint")

        history = [
            TrainStep(**json.loads(line))
            for line in (work / HISTORY_NAME).read_text().splitlines()
            if line.strip()
        ]
        if [h.step for h in history] != list(range(1, cfg.steps + 1)):
            raise ItemFailure(FailureKind.INTERNAL, "train: loss history is not steps 1..N")
        return TrainedCheckpoint(
            family=family.name,
            checkpoint=ref,
            model_config_json=spec.to_json(),
            steps=state.step,
            num_processes=cfg.num_processes,
            train_clips=[c.clip_id for c in manifest.clips],
            resumed_from_step=int(rank0["resumed_from_step"]),
            history=history,
        )
