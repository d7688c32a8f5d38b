"""Producer-side settings (:class:`ClientSettings`); the settings both sides share, and how they are read
(environment ``LLAVA_*`` over a YAML file over defaults), live beside the Celery app built from them:
:class:`~producer.app.QueueSettings` and :func:`~producer.app.load_settings`, re-exported here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from producer.app import DEFAULT_BROKER_TIMEOUT, QueueSettings, load_settings

__all__ = ["ClientSettings", "QueueSettings", "load_settings"]


class ClientSettings(QueueSettings):
    """Producer-side settings (with the shared ones of :class:`~producer.app.QueueSettings`)."""

    result_timeout: float = Field(default=300.0, gt=0, description="default seconds Job.get() waits")
    broker_timeout: float = Field(
        default=DEFAULT_BROKER_TIMEOUT,
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
