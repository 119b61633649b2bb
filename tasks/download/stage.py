"""The download stage: dataset metadata in, normalised clips out.

``read_manifests`` reads each configured dataset's published metadata (and, when enabled,
the offline sample dataset, built on first use) into :class:`SourceClip` records plus typed
per-row failures (see :mod:`tasks.download.datasets`). ``process`` fetches the clip's
source video once into the shared raw cache (see :mod:`tasks.download.fetch`), cuts and
normalises the clip (:mod:`tasks.download.normalize`) and commits three artifacts:

- ``clip.mp4`` (kind ``video``): H.264 at ``fps`` with 16 kHz mono AAC;
- ``audio.wav`` (kind ``audio``): 16 kHz mono pcm_s16le;
- ``source.mp4`` (kind ``raw_video``): the raw download, committed once per source video
  under the owner ``<dataset>-<source_id>`` and shared by all its clips.

Config fields that only change how work runs, not what it produces (``datasets``,
``sample``, ``cookies_file``, ``max_concurrent_downloads``, timeouts and retries), are left
out of
:meth:`DownloadConfig.params_hash`, so adding a dataset or a cookie file does not
invalidate clips already cut; each clip's own metadata is part of its input.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.store import UnsafeIdError, safe_id
from tasks.base import (
    FailureKind,
    ItemContext,
    ItemFailure,
    ItemInputs,
    ManifestSource,
    SourceManifest,
    SourceStage,
    StageConfig,
    StageEnv,
    stable_hash,
)
from tasks.download.datasets import (
    DatasetSource,
    read_dataset,
    source_fingerprint,
    stream_dataset,
)
from tasks.download.errors import RetryPolicy
from tasks.download.fetch import (
    RESERVED_YTDLP_OPTIONS,
    FetchOptions,
    check_source_id,
    commit_raw,
    ensure_raw,
)
from tasks.download.normalize import NormalizeSettings, normalize_clip
from tasks.download.sample import (
    SAMPLE_LICENCE,
    SAMPLE_SUBSET,
    build_sample_dataset,
    sample_metadata_dir,
    sample_videos_dir,
)
from tasks.records import NormalizedClip, SourceClip


class SampleConfig(BaseModel):
    """The offline sample dataset (:mod:`tasks.download.sample`), built under data_root."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    dir: str = "sample"  # relative to data_root
    seed: int = 0


class DownloadConfig(StageConfig):
    datasets: list[DatasetSource] = Field(default_factory=list)
    sample: SampleConfig = SampleConfig()
    fps: float = Field(25.0, gt=0, le=120)
    audio_sample_rate_hz: int = Field(16000, ge=8000, le=96000)
    target_height: int = Field(720, ge=144, le=4320)
    apply_crop: bool = False
    crf: int = Field(17, ge=0, le=51)
    cookies_file: str | None = None
    ytdlp_options: dict[str, str | int | bool] = Field(default_factory=dict)
    max_concurrent_downloads: int = Field(2, ge=1, le=64)
    socket_timeout_s: float = Field(30.0, gt=0, le=600)
    download_attempts: int = Field(4, ge=1, le=20)
    retry_base_delay_s: float = Field(2.0, ge=0, le=600)
    retry_max_delay_s: float = Field(60.0, ge=0, le=3600)
    max_retry_after_s: float = Field(300.0, ge=0, le=3600)

    OPERATIONAL_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "resources",
            "datasets",
            "sample",
            "cookies_file",
            "max_concurrent_downloads",
            "socket_timeout_s",
            "download_attempts",
            "retry_base_delay_s",
            "retry_max_delay_s",
            "max_retry_after_s",
        }
    )

    @model_validator(mode="after")
    def _unique_dataset_names(self) -> DownloadConfig:
        names = [d.dataset for d in self.datasets] + (["sample"] if self.sample.enabled else [])
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"dataset names must be unique; repeated: {repeated} (set name:)")
        return self

    @field_validator("ytdlp_options")
    @classmethod
    def _no_reserved_options(cls, value: dict[str, str | int | bool]) -> dict:
        reserved = RESERVED_YTDLP_OPTIONS & set(value)
        if reserved:
            raise ValueError(f"ytdlp_options may not set {sorted(reserved)} (owned by the fetcher)")
        return value

    def params_hash(self) -> str:
        return stable_hash(self.model_dump(mode="json", exclude=set(self.OPERATIONAL_FIELDS)))

    def fetch_options(self) -> FetchOptions:
        return FetchOptions(
            target_height=self.target_height,
            cookies_file=self.cookies_file,
            ytdlp_options=dict(self.ytdlp_options),
            max_concurrent_downloads=self.max_concurrent_downloads,
            socket_timeout_s=self.socket_timeout_s,
            retry=RetryPolicy(
                attempts=self.download_attempts,
                base_delay_s=self.retry_base_delay_s,
                max_delay_s=self.retry_max_delay_s,
                max_retry_after_s=self.max_retry_after_s,
            ),
        )

    def normalize_settings(self) -> NormalizeSettings:
        return NormalizeSettings(
            fps=self.fps,
            audio_sample_rate_hz=self.audio_sample_rate_hz,
            crf=self.crf,
            apply_crop=self.apply_crop,
        )


def sample_url_template(videos_dir: Path) -> str:
    """``file://`` template for the sample videos (braces in the path escaped for format)."""
    base = videos_dir.resolve().as_uri().replace("{", "{{").replace("}", "}}")
    return base + "/{id}.mp4"


class DownloadStage(SourceStage[DownloadConfig]):
    name = "download"
    code_version = "1"
    config_type = DownloadConfig

    @classmethod
    def read_manifests(cls, config: DownloadConfig, env: StageEnv) -> list[SourceManifest]:
        return [read_dataset(source) for source in cls.dataset_sources(config, env)]

    @classmethod
    def manifest_sources(cls, config: DownloadConfig, env: StageEnv) -> list[ManifestSource]:
        return [
            ManifestSource(
                s.dataset,
                source_fingerprint(s),
                partial(read_dataset, s),
                stream=partial(stream_dataset, s),
            )
            for s in cls.dataset_sources(config, env)
        ]

    @classmethod
    def dataset_sources(cls, config: DownloadConfig, env: StageEnv) -> list[DatasetSource]:
        """The configured datasets, then the offline sample (built on first use) if enabled."""
        sources = list(config.datasets)
        if config.sample.enabled:
            root = build_sample_dataset(Path(env.data_root) / config.sample.dir, config.sample.seed)
            sources.append(
                DatasetSource(
                    kind="hdtf",
                    name="sample",
                    metadata=str(sample_metadata_dir(root)),
                    subsets=[SAMPLE_SUBSET],
                    url_template=sample_url_template(sample_videos_dir(root)),
                    licence=SAMPLE_LICENCE,
                )
            )
        return sources

    def process(self, inputs: ItemInputs, ctx: ItemContext) -> NormalizedClip:
        clip = inputs.source
        if not isinstance(clip, SourceClip):
            raise ItemFailure(FailureKind.BAD_METADATA, f"{inputs.item_id}: no SourceClip input")
        try:
            safe_id(clip.clip_id)
        except UnsafeIdError as exc:
            raise ItemFailure(FailureKind.BAD_METADATA, str(exc)) from exc
        check_source_id(clip.source_id)
        raw = ensure_raw(
            Path(self.env.data_root),
            clip.dataset,
            clip.source_id,
            clip.url,
            self.config.fetch_options(),
        )
        files = normalize_clip(raw.path, clip, self.config.normalize_settings(), ctx.scratch)
        raw_ref = commit_raw(ctx, clip.dataset, clip.source_id, raw)
        video_ref = ctx.commit(files.video, "clip.mp4", "video")
        audio_ref = ctx.commit(files.audio, "audio.wav", "audio")
        return NormalizedClip(
            clip_id=clip.clip_id,
            dataset=clip.dataset,
            source_id=clip.source_id,
            start_s=files.start_s,
            end_s=files.end_s,
            duration_s=files.duration_s,
            fps=files.fps,
            num_frames=files.num_frames,
            width=files.width,
            height=files.height,
            audio_sample_rate_hz=files.audio_sample_rate_hz,
            audio_channels=files.audio_channels,
            video=video_ref,
            audio=audio_ref,
            raw=raw_ref,
        )
