"""Parquet schemas of every catalog table.

Core tables (``runs``, ``plans``, ``items``, ``artifacts``) carry the pipeline's state; stats
tables carry per-item measurements that ops query with SQL. Every stats row starts with
the item columns (run, stage, item, key) so it can be joined to the item that produced it
and filtered to the current version.
"""

from __future__ import annotations

import pyarrow as pa

_TS = pa.timestamp("us", tz="UTC")

ITEM_COLUMNS = [
    pa.field("run_id", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("item_id", pa.string()),
    pa.field("item_key", pa.string()),
    pa.field("created_at", _TS),
]

CORE_TABLES: dict[str, pa.Schema] = {
    # one row when a run starts and one when it ends; the latest row per run wins
    "runs": pa.schema(
        [
            pa.field("run_id", pa.string()),
            pa.field("event", pa.string()),  # started / finished / failed / interrupted
            pa.field("event_at", _TS),
            pa.field("command", pa.string()),
            pa.field("stages", pa.list_(pa.string())),
            pa.field("config_path", pa.string()),
            pa.field("config_yaml", pa.string()),  # the resolved config of the run
            pa.field("config_hash", pa.string()),
            pa.field("options_json", pa.string()),  # limit, retry_failed, ...
            pa.field("message", pa.string()),
            # the catalog snapshot this event saw (the run's last commit before it);
            # `talkforge sql --as-of RUN` reads the run's own last snapshot
            pa.field("snapshot_id", pa.int64()),
        ]
    ),
    # a run holding a stage: 'acquired', then 'released' (see storage/lease.py)
    "leases": pa.schema(
        [
            pa.field("lease_id", pa.string()),
            pa.field("stage", pa.string()),
            pa.field("run_id", pa.string()),
            pa.field("event", pa.string()),  # acquired / released
            pa.field("host", pa.string()),
            pa.field("pid", pa.int64()),
            pa.field("event_at", _TS),
            pa.field("message", pa.string()),
        ]
    ),
    # one row per (run, stage) plan, committed with its plan rows: what `status` reads, so
    # a run's status costs one small query however large the stage or its history
    "stage_runs": pa.schema(
        [
            pa.field("run_id", pa.string()),
            pa.field("stage", pa.string()),
            pa.field("planned_at", _TS),
            pa.field("complete", pa.bool_()),  # every item planned (no --limit)
            # the plan wrote a `plans` row for every item it holds (else only for the items
            # that run or changed version: the others stay as the earlier rows say)
            pa.field("lists_all", pa.bool_()),
            pa.field("items", pa.int64()),  # held by the plan (not dropped)
            pa.field("to_run", pa.int64()),
            pa.field("retried", pa.int64()),  # to_run items with an earlier attempt
            pa.field("cached_done", pa.int64()),
            pa.field("cached_filtered", pa.int64()),
            pa.field("skip_failed", pa.int64()),
            pa.field("dropped", pa.int64()),
            pa.field("blocked_reason", pa.string()),
            pa.field("code_version", pa.string()),
            pa.field("config_hash", pa.string()),
            # what the plan was made from (candidates, their key material, stage version,
            # options) and the stage's `items` rows after its commit: a next plan with the
            # same digest and no item row since is the same plan (talkforge.planner)
            pa.field("inputs_digest", pa.string()),
            pa.field("stage_item_rows", pa.int64()),
        ]
    ),
    # the train / held-out split a run planned (tasks.split), written when it changes
    "splits": pa.schema(
        [
            pa.field("run_id", pa.string()),
            pa.field("planned_at", _TS),
            pa.field("split_hash", pa.string()),
            pa.field("rule", pa.string()),
            pa.field("clip_id", pa.string()),
            pa.field("group_key", pa.string()),  # <dataset>/speaker/<name> or .../video/<id>
            pa.field("side", pa.string()),  # train / heldout
        ]
    ),
    # what a run's plan changed: a row per item that runs or whose version (key) differs
    # from the current one, and per item dropped (key ''); the newest row per item is the
    # "current" version (view current_plans); the other items' counts are in stage_runs
    "plans": pa.schema(
        [
            pa.field("run_id", pa.string()),
            pa.field("stage", pa.string()),
            pa.field("item_id", pa.string()),
            pa.field("item_key", pa.string()),
            pa.field("action", pa.string()),  # run / cached / skip_failed / not_accepted
            pa.field("planned_at", _TS),
        ]
    ),
    # one row per processed item and attempt, committed with its stats and artifact rows
    "items": pa.schema(
        [
            *ITEM_COLUMNS,
            pa.field("status", pa.string()),  # done / filtered / failed
            pa.field("error_kind", pa.string()),
            pa.field("error_message", pa.string()),
            pa.field("retryable", pa.bool_()),
            pa.field("attempt", pa.int32()),
            pa.field("record_type", pa.string()),
            pa.field("record_json", pa.string()),
            pa.field("artifact_ids", pa.list_(pa.string())),
            pa.field("input_keys_json", pa.string()),
            pa.field("code_version", pa.string()),
            pa.field("config_hash", pa.string()),
            pa.field("model_fingerprints_json", pa.string()),
            pa.field("duration_s", pa.float64()),
            pa.field("worker", pa.string()),
        ]
    ),
    "artifacts": pa.schema(
        [
            pa.field("artifact_id", pa.string()),
            pa.field("kind", pa.string()),
            pa.field("name", pa.string()),
            *ITEM_COLUMNS,
            pa.field("uri", pa.string()),
            pa.field("size_bytes", pa.int64()),
            pa.field("sha256", pa.string()),
            pa.field("code_version", pa.string()),
            pa.field("config_hash", pa.string()),
            pa.field("model_fingerprints_json", pa.string()),
            pa.field("input_artifact_ids", pa.list_(pa.string())),
            pa.field("status", pa.string()),
            pa.field("error", pa.string()),
        ]
    ),
}


# what the datasets' published metadata says, before anything is fetched (talkforge ingest)
MANIFEST_TABLES: dict[str, pa.Schema] = {
    # one row per dataset and ingest; an unchanged manifest is not ingested again
    "datasets": pa.schema(
        [
            pa.field("ingest_id", pa.string()),
            pa.field("ingested_at", _TS),
            pa.field("run_id", pa.string()),
            pa.field("dataset", pa.string()),
            pa.field("kind", pa.string()),
            pa.field("licence", pa.string()),
            pa.field("metadata_files", pa.list_(pa.string())),
            pa.field("metadata_sha256", pa.string()),
            pa.field("content_sha256", pa.string()),
            # what the manifest was read from (files' bytes, dataset settings, reader code):
            # equal on the next run -> the stored rows are used and nothing is parsed again
            pa.field("source_sha256", pa.string()),
            pa.field("clips", pa.int64()),
            pa.field("problems", pa.int64()),
            pa.field("warnings", pa.list_(pa.string())),
            pa.field("summary_json", pa.string()),
        ]
    ),
    # one row per clip (status ok) or unusable metadata row (status bad_metadata)
    "manifest": pa.schema(
        [
            pa.field("ingest_id", pa.string()),
            pa.field("dataset", pa.string()),
            pa.field("clip_id", pa.string()),
            pa.field("status", pa.string()),
            pa.field("error_kind", pa.string()),
            pa.field("error_message", pa.string()),
            pa.field("subset", pa.string()),
            pa.field("source_id", pa.string()),
            pa.field("url", pa.string()),
            pa.field("start_s", pa.float64()),
            pa.field("end_s", pa.float64()),
            pa.field("duration_s", pa.float64()),
            pa.field("declared_width", pa.int32()),
            pa.field("declared_height", pa.int32()),
            pa.field("declared_fps", pa.float64()),
            pa.field("has_crop", pa.bool_()),
            pa.field("speaker", pa.string()),
            pa.field("language", pa.string()),
            pa.field("gender", pa.string()),
            pa.field("age_group", pa.string()),
            pa.field("ethnicity", pa.string()),
            pa.field("category", pa.string()),
            pa.field("emotion", pa.string()),
            pa.field("appearance", pa.list_(pa.string())),
            pa.field("actions", pa.list_(pa.string())),
            pa.field("dover_score", pa.float64()),
            pa.field("cotracker_ratio", pa.float64()),
            pa.field("head_detail_json", pa.string()),
            pa.field("record_sha256", pa.string()),  # the source stage's key material
            pa.field("record_json", pa.string()),  # the whole record, for items that run
        ]
    ),
}


def _stats(*fields: pa.Field) -> pa.Schema:
    return pa.schema([*ITEM_COLUMNS, *fields])


STATS_TABLES: dict[str, pa.Schema] = {
    "clips": _stats(
        pa.field("dataset", pa.string()),
        pa.field("source_id", pa.string()),
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("duration_s", pa.float64()),
        pa.field("fps", pa.float64()),
        pa.field("num_frames", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("audio_sample_rate_hz", pa.int32()),
        pa.field("audio_channels", pa.int32()),
    ),
    "faces": _stats(
        pa.field("detector", pa.string()),
        pa.field("num_frames", pa.int64()),
        pa.field("detected_frames", pa.int64()),
        pa.field("tracked_frames", pa.int64()),
        pa.field("lost_frames", pa.int64()),
        pa.field("median_face_size_px", pa.float64()),
        pa.field("min_face_size_px", pa.float64()),
        pa.field("max_faces_in_frame", pa.int32()),
        pa.field("max_second_face_ratio", pa.float64()),
        pa.field("crop_size_px", pa.int32()),
    ),
    "quality": _stats(
        pa.field("rule", pa.string()),
        pa.field("value", pa.float64()),
        pa.field("threshold", pa.float64()),
        pa.field("passed", pa.bool_()),
        pa.field("hard", pa.bool_()),
        pa.field("reason", pa.string()),
        pa.field("accepted", pa.bool_()),
        # False: the rule could not measure and passed by default (not a measured pass)
        pa.field("measured", pa.bool_()),
    ),
    "features": _stats(
        pa.field("family", pa.string()),
        pa.field("shape", pa.string()),
        pa.field("dtype", pa.string()),
        pa.field("num_frames", pa.int64()),
        pa.field("frame_rate_hz", pa.float64()),
        pa.field("model_name", pa.string()),
        pa.field("model_source", pa.string()),
        pa.field("model_sha256", pa.string()),
        pa.field("model_origin", pa.string()),
    ),
    "speech": _stats(
        pa.field("language", pa.string()),
        pa.field("emotion", pa.string()),
        pa.field("event", pa.string()),
        pa.field("transcript", pa.string()),
        pa.field("model_origin", pa.string()),
    ),
    "engram_stats": _stats(
        pa.field("ngram_order", pa.int32()),
        pa.field("occupied_slots", pa.int64()),
        pa.field("collision_rate", pa.float64()),
        pa.field("codebook_size", pa.int32()),
        pa.field("used_codes", pa.int32()),
        pa.field("table_size", pa.int64()),
        pa.field("num_frames", pa.int64()),
    ),
    "train_metrics": _stats(
        pa.field("step", pa.int64()),
        pa.field("loss", pa.float64()),
        pa.field("lr", pa.float64()),
        pa.field("num_processes", pa.int32()),
        pa.field("grad_norm", pa.float64()),  # before clipping
        pa.field("samples_per_s", pa.float64()),
        pa.field("terms_json", pa.string()),  # every other loss term: {"l1": ..., "pmf": ...}
        pa.field("family", pa.string()),
        pa.field("training_stage", pa.string()),
    ),
    "eval_metrics": _stats(
        pa.field("metric", pa.string()),
        pa.field("value", pa.float64()),
        pa.field("num_frames", pa.int64()),
        pa.field("family", pa.string()),  # model family that generated the clips
        pa.field("checkpoint", pa.string()),
        pa.field("setting", pa.string()),  # self (own audio) / cross (another clip's audio)
        pa.field("row", pa.string()),  # generated / ground_truth (the reference row)
        pa.field("level", pa.string()),  # clip (one row per clip) / set (FID, FVD)
        pa.field("model_origin", pa.string()),  # metric networks: random-init / pretrained
        pa.field("generator_origin", pa.string()),  # trained / official / ground_truth
        pa.field("audio_clip_id", pa.string()),  # whose audio drove the video
    ),
    # one evaluation run's table (evaluate_set): a metric of a family / checkpoint / setting;
    # family 'ground_truth' is the reference row
    "eval_summary": _stats(
        pa.field("family", pa.string()),
        pa.field("checkpoint", pa.string()),
        pa.field("setting", pa.string()),
        pa.field("metric", pa.string()),
        pa.field("level", pa.string()),
        pa.field("value", pa.float64()),  # mean over clips (clip level) or the set's value
        pa.field("std", pa.float64()),  # over clips (clip level)
        pa.field("num_clips", pa.int64()),
        pa.field("num_frames", pa.int64()),
        pa.field("higher_is_better", pa.bool_()),
        pa.field("generator_origin", pa.string()),
        pa.field("model_origin", pa.string()),
        pa.field("split_rule", pa.string()),
    ),
}

ALL_TABLES: dict[str, pa.Schema] = {**CORE_TABLES, **MANIFEST_TABLES, **STATS_TABLES}
