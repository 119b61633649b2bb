"""Typed pipeline configuration loaded from YAML.

``configs/default.yaml`` is the embedded default. Every key is validated into pydantic
models with ``extra="forbid"``: a misspelt key, a wrong type or a bad value stops the run
at start with one message naming the file, the key path and what was expected. The
resolved config (defaults filled in, overrides applied) is what every run stores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storage.lake import CatalogConfig
from tasks.base import StageConfig
from tasks.download.stage import DownloadConfig
from tasks.engram_config import EngramConfig
from tasks.evaluate_config import EvaluateConfig
from tasks.evaluate_set_config import EvaluateSetConfig
from tasks.faces_config import FacesConfig
from tasks.features_config import FeaturesConfig
from tasks.generate_config import GenerateConfig
from tasks.quality_config import QualityConfig
from tasks.train_config import TrainConfig, train_config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProjectConfig(_Strict):
    name: str = "talkforge"
    data_root: str = Field("data", description="catalog, artifacts, models; relative to cwd")
    store_uri: str | None = Field(None, description="artifact store URI; default <data_root>/store")


class RayConfig(_Strict):
    address: str | None = Field(None, description="existing cluster ('auto', 'ray://host:10001')")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local instance")
    num_gpus: int | None = Field(None, ge=0)
    namespace: str = "talkforge"
    start_timeout_s: float = Field(
        600.0, gt=0, description="a stage's actors must be placed and set up within this"
    )


class ExecutionConfig(_Strict):
    executor: Literal["ray", "local"] = "ray"
    shard_size: int = Field(16, ge=1, description="items per Prefect task")
    commit_every: int = Field(4, ge=1, description="results buffered before a catalog commit")
    max_attempts: int = Field(3, ge=1, description="retryable failures are retried this often")
    actor_restarts: int = Field(2, ge=0, description="times a dead worker's item is re-queued")


class SplitConfig(_Strict):
    """Train / held-out split by speaker or source video (see :mod:`tasks.split`)."""

    holdout_fraction: float = Field(0.34, ge=0.0, lt=1.0, description="share of groups (hash)")
    seed: int = 0
    group_by: Literal["speaker", "source_video"] = Field(
        "speaker", description="the unit that never straddles the split"
    )
    rule: Literal["hash", "musetalk_hdtf_val"] = Field(
        "hash", description="seeded hash of the group, or MuseTalk's 20 HDTF validation videos"
    )


class PipelineConfig(_Strict):
    project: ProjectConfig = ProjectConfig()
    catalog: CatalogConfig = CatalogConfig()
    ray: RayConfig = RayConfig()
    execution: ExecutionConfig = ExecutionConfig()
    split: SplitConfig = SplitConfig()
    download: DownloadConfig = DownloadConfig()
    faces: FacesConfig = FacesConfig()
    quality: QualityConfig = QualityConfig()
    features: FeaturesConfig = FeaturesConfig()
    engram: EngramConfig = EngramConfig()
    train: TrainConfig = Field(default_factory=train_config)  # family: musetalk15 by default
    generate: GenerateConfig = GenerateConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    evaluate_set: EvaluateSetConfig = EvaluateSetConfig()

    def stage(self, name: str) -> StageConfig:
        section = getattr(self, name, None)
        if not isinstance(section, StageConfig):
            raise KeyError(f"no stage section {name!r} in the config")
        return section

    @property
    def data_root(self) -> Path:
        return Path(self.project.data_root).expanduser().resolve()

    @property
    def store_uri(self) -> str:
        return self.project.store_uri or str(self.data_root / "store")

    def to_yaml(self) -> str:
        """The resolved config as stored with a run (data_root made absolute)."""
        data = self.model_dump(mode="json")
        data["project"]["data_root"] = str(self.data_root)
        return yaml.safe_dump(data, sort_keys=False)


class ConfigError(ValueError):
    """A config file that does not validate; the message is meant for the terminal."""


def load_config(path: Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load ``path`` (or the built-in defaults), apply ``key.path=value`` overrides, validate."""
    source = str(path) if path else "<defaults>"
    data = _read_yaml(Path(path), ()) if path is not None else {}
    for item in overrides or []:
        _apply_override(data, item, source)
    return parse_config(data, source)


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """One config file as a dict; ``extends: other.yaml`` (relative to the file) is read
    first and this file's keys are merged over it, section by section (mappings merge,
    anything else replaces), so a training-stage config states only what differs."""
    source = str(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{source}: file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    data = loaded or {}
    base = data.pop("extends", None)
    if base is None:
        return data
    base_path = (path.parent / str(base)).resolve()
    if base_path in chain:
        raise ConfigError(f"{source}: extends {base} forms a cycle")
    return _merge(_read_yaml(base_path, (*chain, path.resolve())), data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def parse_config(data: dict[str, Any], source: str) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid config"]
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            got = err.get("input")
            got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {err['msg']}{got_txt}")
        raise ConfigError("\n".join(lines)) from None


def _apply_override(data: dict[str, Any], item: str, source: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section in {source}")
        node = nxt
    node[parts[-1]] = yaml.safe_load(raw)
