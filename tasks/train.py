"""Train stage: fit the audio-conditioned latent UNet on all training clips (aggregate).

The stage itself does no training. It writes a manifest (training clips' feature files,
the Engram bank, hyper-parameters) into a **persistent** work dir
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

from pydantic import Field

from models.unet import build_unet_from_spec, save_unet_weights
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
    tensor_shape,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
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


class TrainConfig(StageConfig):
    steps: int = Field(20, ge=1, description="optimizer steps in total (resumes count)")
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(4, ge=1, description="frames per process per step")
    num_processes: int = Field(2, ge=1, le=64, description="DDP ranks (CPU processes)")
    checkpoint_every: int = Field(5, ge=1, description="steps between resumable checkpoints")
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    audio_window_frames: int = Field(2, ge=0, le=16, description="w: frames t-w..t+w")
    unet: Literal["tiny"] = "tiny"


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


class TrainStage(Stage[TrainConfig]):
    """Aggregate stage: all training clips in, one ``unet.safetensors`` checkpoint out."""

    name: ClassVar[str] = "train"
    code_version: ClassVar[str] = "1"
    requires: ClassVar[tuple[str, ...]] = ("features", "engram")
    aggregate: ClassVar[bool] = True
    config_type: ClassVar[type[StageConfig]] = TrainConfig

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

        A clip with unreadable or misaligned features is skipped (listed in the manifest's
        ``skipped`` with the reason) rather than failing the whole training run.
        """
        cfg = self.config
        bank = self._bank(inputs)
        entries: list[ClipEntry] = []
        skipped: list[str] = []
        shapes: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
        vae_shas: set[str] = set()
        for item in sorted(inputs.items, key=lambda it: it.item_id):
            if is_heldout(item.item_id, self.env):
                continue
            try:
                feats = item.get("features", ClipFeatures)
                lat_file, hub_file = feats.file("vae_latents"), feats.file("hubert")
            except (KeyError, TypeError) as exc:
                skipped.append(f"{item.item_id}: {exc}")
                continue
            lat_path = ctx.local_path(lat_file.artifact)
            hub_path = ctx.local_path(hub_file.artifact)
            try:
                lat = tensor_shape(lat_path, "latents")
                hub = tensor_shape(hub_path, "features")
            except Exception as exc:  # any unreadable header: skip the clip, keep training
                skipped.append(f"{item.item_id}: unreadable features ({exc})")
                continue
            if len(lat) != 4 or len(hub) != 3 or lat[0] != hub[0] or lat[0] != feats.num_frames:
                skipped.append(f"{item.item_id}: latents {lat} / hubert {hub} misaligned")
                continue
            shapes.add((tuple(lat[1:]), tuple(hub[1:])))
            vae_shas.add(lat_file.model.sha256)
            entries.append(
                ClipEntry(
                    clip_id=item.item_id,
                    latents_path=str(lat_path),
                    hubert_path=str(hub_path),
                    latents_sha256=lat_file.artifact.sha256,
                    hubert_sha256=hub_file.artifact.sha256,
                    num_frames=lat[0],
                )
            )
        if not entries:
            raise ItemFailure(
                FailureKind.FORMAT, f"train: no usable training clips ({'; '.join(skipped[:3])})"
            )
        if len(shapes) > 1 or len(vae_shas) > 1:
            raise ItemFailure(
                FailureKind.FORMAT,
                f"train: clips disagree on feature shapes {sorted(shapes)} or VAE "
                f"({len(vae_shas)} VAEs)",
            )
        (lat_shape, hub_shape) = shapes.pop()
        if lat_shape[1] % 2:
            raise ItemFailure(FailureKind.FORMAT, f"train: latent height {lat_shape[1]} is odd")
        manifest = TrainManifest(
            work_dir=str(work),
            clips=entries,
            bank_path=str(ctx.local_path(bank.bank)),
            bank_sha256=bank.bank.sha256,
            latent_shape=list(lat_shape),
            audio_steps=hub_shape[0],
            audio_dim=hub_shape[1],
            steps=cfg.steps,
            learning_rate=cfg.learning_rate,
            batch_size=cfg.batch_size,
            num_processes=cfg.num_processes,
            checkpoint_every=cfg.checkpoint_every,
            seed=cfg.seed,
            audio_window_frames=cfg.audio_window_frames,
            unet=cfg.unet,
            skipped=skipped,
        )
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
                cmd,
                cwd=REPO_ROOT,
                env=launch_env(cfg.num_processes),
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
        spec = manifest.spec()
        unet = build_unet_from_spec(spec)
        unet.load_state_dict(state.model, strict=True)
        out = ctx.scratch / "unet.safetensors"
        save_unet_weights(out, unet, spec)
        ref: ArtifactRef = ctx.commit(out, "unet.safetensors", kind="checkpoint")

        history = [
            TrainStep(**json.loads(line))
            for line in (work / HISTORY_NAME).read_text().splitlines()
            if line.strip()
        ]
        if [h.step for h in history] != list(range(1, cfg.steps + 1)):
            raise ItemFailure(FailureKind.INTERNAL, "train: loss history is not steps 1..N")
        return TrainedCheckpoint(
            checkpoint=ref,
            model_config_json=spec.to_json(),
            steps=state.step,
            num_processes=cfg.num_processes,
            train_clips=[c.clip_id for c in manifest.clips],
            resumed_from_step=int(rank0["resumed_from_step"]),
            history=history,
        )
