"""Train stage: fit the configured model family on all training clips (aggregate).

The stage does not know the family: ``train.family`` (default ``musetalk15``) selects one
from :mod:`generators.registry`, whose config fields sit beside the stage's own
(:mod:`tasks.train_config`), validated as one discriminated union at start. The family
declares which feature files it reads; the stage checks their headers, and the training
workers hand the data, batches and losses to the family (:mod:`tasks.train_loop`).

The stage itself does no training. It writes a manifest (training clips' feature files,
the Engram bank, loop settings, world size, the starting weights) into a **persistent**
work dir ``<data_root>/work/train/<item_key[:20]>/`` and hands a :class:`TrainJob` to the
launcher the executor attached (``self.trainer``: :class:`talkforge.ray_train.
RayTrainLauncher`, Ray Train's ``TorchTrainer`` on the pipeline's Ray). Checkpoints land in
the work dir. The item key changes with inputs, code and config, so the same key means the
same training run: a run interrupted for any reason (killed worker, killed driver, lost
node, Ctrl-C) is retried by the engine, finds the work dir and resumes from its last
checkpoint instead of starting over.

**Lifetime.** One trainer owns a work dir (:class:`tasks.lifetime.WorkDirLock`); its run
token travels in the environment of every training process, so a dead owner's leftovers
are found and ended before a new trainer starts, and each training process dies with the
stage process that owns it (see :mod:`tasks.lifetime`).

**Stages of training.** ``training_stage`` (a family config field) names what is trained;
``init_from`` says what step 0 starts from: ``{stage: stage1}`` is the latest committed
checkpoint of that training stage, found in the catalog when the stage is planned (its key
is part of this run's key, and its artifact is read through the item context, so lineage
records it); ``{weights: ..., source_family: ...}`` is an official checkpoint resolved and
fingerprinted by the model registry and converted by the family's ``transfer_weights``.

**Planning imports no torch**: it reads the family's config (``FamilyConfig.asset_specs``);
the family, the checkpoint format (:mod:`tasks.train_checkpoint`) and the loop load in runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar

from generators import registry
from generators.family_config import DataLayout, TrainingAssets
from generators.io import tensor_shape
from models.registry import ModelUnavailableError, ensure_model
from storage.store import ArtifactRef
from tasks.base import (
    AggregateInputs,
    FailureKind,
    ItemContext,
    ItemFailure,
    PriorOutput,
    Record,
    Resources,
    Stage,
    StageConfig,
)
from tasks.lifetime import WorkDirBusy, WorkDirLock
from tasks.records import (
    CheckpointParent,
    ClipFeatures,
    MemoryBank,
    QualityVerdict,
    TrainedCheckpoint,
)
from tasks.split import is_heldout
from tasks.train_config import (
    InitFromStage,
    InitFromWeights,
    TrainStageConfig,
    training_stage,
)
from tasks.train_data import (
    ATTEMPTS_NAME,
    HISTORY_NAME,
    MANIFEST_NAME,
    RANKS_DIR,
    ClipEntry,
    InitSource,
    TrainJob,
    TrainManifest,
    TrainResult,
    read_history,
)

WEIGHTS_NAME = "model.safetensors"
INIT_INPUT = "init"  # the shared input holding the parent checkpoint


def work_dir_for(data_root: str | Path, item_key: str) -> Path:
    return Path(data_root) / "work" / "train" / item_key[:20]


class TrainStage(Stage[TrainStageConfig]):
    """Aggregate stage: all training clips in, one ``model.safetensors`` checkpoint out."""

    name: ClassVar[str] = "train"
    code_version: ClassVar[str] = "3"
    requires: ClassVar[tuple[str, ...]] = ("quality", "features", "engram")
    aggregate: ClassVar[bool] = True
    config_type: ClassVar[type[StageConfig]] = TrainStageConfig  # merged with a family's
    uses_split: ClassVar[bool] = True  # held-out clips never train (tasks.split)

    @classmethod
    def actor_resources(cls, config: TrainStageConfig) -> Resources:
        """The stage process only drives Ray Train; ``resources`` size the workers. It
        reserves no CPU at all (a fraction would keep the last whole CPU from a worker),
        which ``Resources`` validation does not allow users, hence ``model_construct``."""
        return Resources.model_construct(num_cpus=0.0, num_gpus=0.0, num_workers=1, batch_size=1)

    def accepts(self, item_id: str, shared: dict[str, Record]) -> bool:
        return not is_heldout(item_id, self.env)

    def model_specs(self) -> list:
        """The family config's loss networks and official init weights (in the key)."""
        init = self.config.init_from
        assets = list(registry.family_config(self.config).asset_specs().values())
        return assets + ([init.weights] if isinstance(init, InitFromWeights) else [])

    def prior_outputs(self) -> dict[str, PriorOutput]:
        init = self.config.init_from
        if not isinstance(init, InitFromStage):
            return {}
        family = init.family or str(self.config.family)  # type: ignore[attr-defined]
        match = {"family": family, "training_stage": init.stage}
        return {INIT_INPUT: PriorOutput(stage=self.name, match=match)}

    # ------------------------------------------------------------------ manifest

    def _bank(self, inputs: AggregateInputs) -> MemoryBank:
        rec = inputs.shared.get("engram")
        if rec is None:
            rec = next((it.shared["engram"] for it in inputs.items if "engram" in it.shared), None)
        if not isinstance(rec, MemoryBank):
            raise ItemFailure(FailureKind.INTERNAL, "train: no committed engram memory bank")
        return rec

    def _clips(self, inputs: AggregateInputs, ctx: ItemContext, family) -> tuple:
        """Validate each clip's feature headers (no tensor data is read).

        The family says which feature files it reads; each must exist and be readable, and
        a frame-aligned one must have ``num_frames`` rows (``clip_features`` have no frame
        axis, ``row_features`` their own). A clip that fails is skipped (listed with the
        reason) rather than failing the run. All clips must agree on the per-frame shapes
        and on the model that made each feature. Each clip carries its quality soft-rule
        weight (sampling weight) and its wav.
        """
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
                full = {f: tensor_shape(paths[f], name) for f, name in family.features.items()}
            except (KeyError, TypeError) as exc:
                skipped.append(f"{item.item_id}: {exc}")
                continue
            except Exception as exc:  # any unreadable header: skip the clip, keep training
                skipped.append(f"{item.item_id}: unreadable features ({exc})")
                continue
            aligned = {
                f: v for f, v in full.items() if f not in family.clip_features | family.row_features
            }
            if any(len(v) < 2 or v[0] != feats.num_frames for v in aligned.values()):
                skipped.append(f"{item.item_id}: features {full} misaligned")
                continue
            shapes.add(
                tuple(
                    sorted(
                        (f, tuple(v if f in family.clip_features else v[1:]))
                        for f, v in full.items()
                    )
                )
            )
            for f, ff in files.items():
                model_shas[f].add(ff.model.sha256)
            verdict = item.records.get("quality")
            entries.append(
                ClipEntry(
                    clip_id=item.item_id,
                    num_frames=feats.num_frames,
                    paths={f: str(p) for f, p in paths.items()},
                    sha256={f: ff.artifact.sha256 for f, ff in files.items()},
                    sampling_weight=(
                        verdict.sampling_weight if isinstance(verdict, QualityVerdict) else 1.0
                    ),
                    audio_path=str(ctx.local_path(feats.audio)),
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
        return entries, skipped, DataLayout(shapes={f: list(v) for f, v in shapes.pop()})

    def _assets(self, family, inputs: AggregateInputs) -> TrainingAssets:
        """Local paths of the frozen models the family's losses need: the registry's specs
        (fingerprinted into the key by :meth:`model_specs`) and the features' own VAE."""
        models = {}
        for name, spec in family.config.asset_specs().items():
            try:
                path = ensure_model(spec, Path(self.env.data_root))
            except ModelUnavailableError as exc:
                raise ItemFailure(FailureKind.MODEL, f"train: {name}: {exc}") from exc
            models[name] = str(path) if path else spec.source
        vae = None
        if family.needs_vae_decoder():
            feats = inputs.items[0].get("features", ClipFeatures)
            vae = feats.file("vae_latents").model.resolved_path
        return TrainingAssets(vae=vae, models=models)

    def _init_source(
        self, inputs: AggregateInputs, ctx: ItemContext
    ) -> tuple[InitSource | None, CheckpointParent | None]:
        init = self.config.init_from
        if isinstance(init, InitFromStage):
            parent = inputs.shared.get(INIT_INPUT)
            if not isinstance(parent, TrainedCheckpoint):
                raise ItemFailure(FailureKind.INTERNAL, "train: the parent checkpoint is missing")
            source = InitSource(
                kind="parent",
                path=str(ctx.local_path(parent.checkpoint)),  # recorded as lineage
                sha256=parent.checkpoint.sha256,
                family=parent.family,
                spec_json=parent.model_config_json,
                label=f"{parent.family}/{parent.training_stage} {parent.checkpoint.artifact_id}",
            )
            return source, CheckpointParent(
                kind="parent",
                family=parent.family,
                training_stage=parent.training_stage,
                artifact_id=parent.checkpoint.artifact_id,
                sha256=parent.checkpoint.sha256,
            )
        if isinstance(init, InitFromWeights):
            try:
                path = ensure_model(init.weights, Path(self.env.data_root))
            except ModelUnavailableError as exc:
                raise ItemFailure(FailureKind.MODEL, f"train: init weights: {exc}") from exc
            if path is None:
                raise ItemFailure(
                    FailureKind.MODEL,
                    f"train: init weights {init.weights.source} must be a local file "
                    "(import it with `talkforge models import`)",
                    retryable=False,
                )
            fp = self.env.model_fingerprints.get(init.weights.family)
            sha = fp.sha256 if fp else ""
            source = InitSource(
                kind="weights",
                path=str(path),
                sha256=sha,
                family=init.source_family,
                label=f"{init.weights.family} {sha[:12]}",
            )
            return source, CheckpointParent(kind="weights", family=init.source_family, sha256=sha)
        return None, None

    def build_manifest(
        self, inputs: AggregateInputs, ctx: ItemContext, work: Path
    ) -> tuple[TrainManifest, CheckpointParent | None]:
        cfg = self.config
        family = registry.instantiate(cfg)
        bank = self._bank(inputs) if family.uses_memory_bank else None
        entries, skipped, layout = self._clips(inputs, ctx, family)
        init, parent = self._init_source(inputs, ctx)
        assets = self._assets(family, inputs)
        res = cfg.resources
        manifest = TrainManifest(
            work_dir=str(work),
            model=registry.family_config(cfg),
            settings=TrainStageConfig.model_validate(
                cfg.model_dump(include=set(TrainStageConfig.model_fields))
            ),
            world_size=res.num_workers,
            use_gpu=res.num_gpus > 0,
            clips=entries,
            bank_path=str(ctx.local_path(bank.bank)) if bank else None,
            bank_sha256=bank.bank.sha256 if bank else None,
            layout=layout,
            init=init,
            assets=assets,
            skipped=skipped,
        )
        try:
            manifest.spec()
        except ValueError as exc:
            raise ItemFailure(FailureKind.FORMAT, f"train: {family.name}: {exc}") from exc
        if cfg.mixed_precision != "no" and res.num_gpus == 0:
            raise ItemFailure(
                FailureKind.FORMAT,
                f"train: mixed_precision {cfg.mixed_precision} needs GPU workers "
                "(train.resources.num_gpus > 0); use 'no' on CPU",
                retryable=False,
            )
        return manifest, parent

    # ------------------------------------------------------------------ run

    def run_training(self, manifest: TrainManifest) -> TrainResult:
        """Hold the work dir, hand the job to the attached launcher (a
        :class:`~tasks.train_data.TrainLauncher`), return its last checkpoint."""
        if self.trainer is None:
            raise ItemFailure(FailureKind.INTERNAL, "train: no training launcher attached")
        work = Path(manifest.work_dir)
        try:  # one trainer per work dir; a dead owner's leftover processes are ended first
            lock = WorkDirLock(work).acquire()
        except WorkDirBusy as exc:
            raise ItemFailure(FailureKind.INTERNAL, f"train: {exc}", retryable=True) from exc
        try:
            manifest.write(work / MANIFEST_NAME)
            for old in (work / RANKS_DIR).glob("*"):
                old.unlink()
            run_name = f"ray-{manifest.fingerprint()[:16]}"
            for stale in work.glob("ray-*"):  # another world size's run of this item key
                if stale.name != run_name:
                    shutil.rmtree(stale)
            res = self.config.resources
            job = TrainJob(
                manifest_path=work / MANIFEST_NAME,
                work_dir=work,
                run_name=run_name,
                world_size=manifest.world_size,
                num_cpus=res.num_cpus,
                num_gpus=res.num_gpus,
                max_failures=self.config.max_failures,
                env=lock.child_env({}),
            )
            return self.trainer.fit(job)
        finally:
            lock.release()

    def check_ranks(self, work: Path, world: int) -> tuple[dict, int]:
        """Every worker reported and trained; DDP replicas agree. Returns worker 0's report
        and the number of worker-group restarts Ray Train made."""
        reports = [
            json.loads(p.read_text()) for p in sorted((work / RANKS_DIR).glob("rank-*.json"))
        ]
        if sorted(r["rank"] for r in reports) != list(range(world)):
            raise ItemFailure(FailureKind.INTERNAL, f"train: {len(reports)}/{world} reported")
        if any(r["world_size"] != world for r in reports):
            raise ItemFailure(FailureKind.INTERNAL, "train: workers disagree on the world size")
        shas = {r["state_sha256"] for r in reports if r["state_sha256"]}
        if len(shas) > 1:
            raise ItemFailure(FailureKind.INTERNAL, "train: workers ended with different weights")
        attempts = (work / RANKS_DIR / ATTEMPTS_NAME).read_text().splitlines()
        first = json.loads(attempts[0]) if attempts else {"resumed_from_step": 0}
        rank0 = next(r for r in reports if r["rank"] == 0)
        return {**rank0, "resumed_from_step": first["resumed_from_step"]}, len(attempts) - 1

    def process(self, inputs: AggregateInputs, ctx: ItemContext) -> TrainedCheckpoint:
        from tasks.train_checkpoint import load_checkpoint  # torch: only when training runs

        cfg = self.config
        work = work_dir_for(self.env.data_root, ctx.item_key)
        work.mkdir(parents=True, exist_ok=True)
        manifest, parent = self.build_manifest(inputs, ctx, work)
        result = self.run_training(manifest)
        rank0, restarts = self.check_ranks(work, manifest.world_size)

        state = load_checkpoint(result.checkpoint_dir, with_optimizer=False)
        if state.step != cfg.steps or state.fingerprint != manifest.fingerprint():
            raise ItemFailure(
                FailureKind.INTERNAL,
                f"train: last checkpoint is step {state.step}, not {cfg.steps}",
            )
        family, spec = manifest.family(), manifest.spec()
        model = family.build(spec)
        model.load_state_dict(state.model, strict=True)
        out = ctx.scratch / WEIGHTS_NAME
        family.save_weights(out, model, spec)
        ref: ArtifactRef = ctx.commit(out, WEIGHTS_NAME, kind="checkpoint")

        history = read_history(work / HISTORY_NAME)
        if [h.step for h in history] != list(range(1, cfg.steps + 1)):
            raise ItemFailure(FailureKind.INTERNAL, "train: loss history is not steps 1..N")
        if parent is not None and rank0.get("transfer"):
            parent = parent.model_copy(update={"transfer": rank0["transfer"]})
        return TrainedCheckpoint(
            family=family.name,
            checkpoint=ref,
            model_config_json=spec.to_json(),
            steps=state.step,
            num_processes=manifest.world_size,
            train_clips=[c.clip_id for c in manifest.clips],
            resumed_from_step=int(rank0["resumed_from_step"]),
            history=history,
            training_stage=training_stage(cfg),
            parent=parent,
            config_hash=cfg.params_hash(),
            bank_sha256=manifest.bank_sha256 or "",
            manifest_fingerprint=manifest.fingerprint(),
            worker_restarts=restarts,
        )
