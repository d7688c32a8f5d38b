"""Typed settings (pydantic-settings): environment ``LLAVA_*`` over a YAML file over defaults.

The YAML file comes from ``load_settings(..., config_file=...)`` (the CLIs' ``--config``) or from the
``LLAVA_CONFIG`` environment variable. Keyword overrides (CLI flags) win over everything.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

_config_file: ContextVar[Path | None] = ContextVar("llava_config_file", default=None)

S = TypeVar("S", bound="QueueSettings")


class QueueSettings(BaseSettings):
    """Settings both sides of the queue must agree on.

    Unknown keys are ignored here so that a producer can read a worker's YAML; the worker forbids them.
    """

    model_config = SettingsConfigDict(env_prefix="LLAVA_", extra="ignore", validate_default=True)

    broker_url: str = Field(default="redis://localhost:6379/0", description="Celery broker URL")
    result_backend: str = Field(default="redis://localhost:6379/1", description="Celery result backend URL")
    default_queue: str = Field(default="llava", min_length=1, description="queue jobs go to unless routed")
    visibility_timeout: int = Field(
        default=3600, ge=1, description="seconds before an unacknowledged job is redelivered (Redis)"
    )
    result_expires: int = Field(default=86400, ge=60, description="seconds results are kept")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file.get()
        if config_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


class ClientSettings(QueueSettings):
    """Producer-side settings."""

    max_image_bytes: int = Field(
        default=20 * 1024 * 1024,
        ge=1024,
        description="inline images above this size are refused before sending",
    )
    result_timeout: float = Field(default=300.0, gt=0, description="default seconds Job.get() waits")
    broker_timeout: float = Field(
        default=5.0,
        gt=0,
        le=120,
        description="seconds a send or a result read waits on an unreachable Redis before BrokerUnavailable",
    )
    blob_store: Literal["redis", "off"] = Field(
        default="redis",
        description="redis: inline images stored once by hash in the result-backend Redis, the message "
        "carries blob:sha256:<hex>; off: sent as data: URIs in the message",
    )
    blob_min_bytes: int = Field(
        default=0,
        ge=0,
        description="inline images smaller than this stay in the message as data: URIs (0: every image)",
    )
    flower_port: int = Field(default=5555, ge=1, le=65535, description="port of `llava-queue flower`")
    flower_address: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="address `llava-queue flower` binds; one that is not loopback needs flower_basic_auth",
    )
    flower_basic_auth: str | None = Field(
        default=None, pattern=r"^[^:]+:.+$", description="user:password Flower asks for (unset: no auth)"
    )


def load_settings(cls: type[S], config_file: str | Path | None = None, **overrides: Any) -> S:
    """Build ``cls`` from overrides > ``LLAVA_*`` env > YAML (``config_file`` or ``LLAVA_CONFIG``) > defaults.

    Overrides whose value is ``None`` are ignored, so CLI flags that were not given fall through.
    """
    path = config_file or os.environ.get("LLAVA_CONFIG") or None
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    token = _config_file.set(Path(path) if path else None)
    try:
        return cls(**{key: value for key, value in overrides.items() if value is not None})
    finally:
        _config_file.reset(token)
