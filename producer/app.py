"""The settings both sides of the queue share and how they are read (:class:`QueueSettings`,
:func:`load_settings`: environment ``LLAVA_*`` over a YAML file over defaults), the Celery app factory built
from them, so both sides run the same configuration, and the health query both send (:func:`worker_health`).

The YAML file comes from ``load_settings(..., config_file=...)`` (the CLIs' ``--config``) or from the
``LLAVA_CONFIG`` environment variable. Keyword overrides (CLI flags) win over everything.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, TypeVar

from celery import Celery
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from redis.backoff import NoBackoff
from redis.retry import Retry

from producer.contract import (
    DEFAULT_PRIORITY,
    HEALTH_COMMAND,
    MAX_PRIORITY,
    OUTCOME_SETTINGS_KEY,
    redact_url,
    wire_priority,
)
from producer.transport import RESULT_BACKENDS, SENTINEL_TRANSPORT, TRANSPORT

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
    max_image_bytes: int = Field(
        default=20 * 1024 * 1024,
        ge=1024,
        description="image byte cap: workers refuse larger downloads and inline images, the producer refuses "
        "larger inline images before sending",
    )
    sentinel_master: str | None = Field(
        default=None,
        min_length=1,
        description="Redis Sentinel: the name of the master the Sentinels monitor (`sentinel monitor NAME "
        "...`). Required when broker_url or result_backend is a `sentinel://host:port/db;...` URL; "
        "the broker, the result backend and the blob store then follow the Sentinels to the current primary",
    )
    sentinel_password: SecretStr | None = Field(
        default=None,
        description="password of the Sentinels themselves (`requirepass` in sentinel.conf), when they have "
        "one; the Redis password goes in the URL (`sentinel://:PASSWORD@host:port/db`)",
    )

    sentinel_tls: bool = Field(
        default=False,
        description="Redis Sentinel over TLS: to the Sentinels and to the Redis servers they name (a "
        "`sentinel://` URL has no TLS scheme of its own); certificates are verified",
    )
    sentinel_tls_ca: Path | None = Field(
        default=None,
        description="CA bundle the Sentinels' and Redis servers' certificates are checked with "
        "(default: the system's)",
    )
    sentinel_tls_cert: Path | None = Field(
        default=None, description="client certificate, for servers that ask for one (`tls-auth-clients yes`)"
    )
    sentinel_tls_key: Path | None = Field(default=None, description="the client certificate's private key")

    @model_validator(mode="after")
    def _sentinel_needs_master(self) -> QueueSettings:
        urls = [url for url in (self.broker_url, self.result_backend) if url.startswith("sentinel://")]
        if urls and not self.sentinel_master:
            raise ValueError(
                f"{redact_url(urls[0].split(';')[0])!r} is a Redis Sentinel URL: set LLAVA_SENTINEL_MASTER "
                "(sentinel_master in the YAML) to the master name the Sentinels monitor"
            )
        if self.sentinel_tls and not self.sentinel_master:
            raise ValueError(
                "LLAVA_SENTINEL_TLS is for sentinel:// URLs (set LLAVA_SENTINEL_MASTER); use rediss://"
            )
        if (self.sentinel_tls_cert is None) != (self.sentinel_tls_key is None):
            raise ValueError("set both LLAVA_SENTINEL_TLS_CERT and LLAVA_SENTINEL_TLS_KEY, or neither")
        return self

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


def settings_problem(exc: Exception) -> str:
    """What is wrong with the settings, naming each variable (``LLAVA_…``) and never its value: pydantic's own
    message repeats the input, a broker URL's password or the Sentinels' included."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        problems.append(f"{'LLAVA_' + field.upper() if field else 'settings'}: {error['msg']}")
    return "; ".join(problems)


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


Role = Literal["worker", "producer"]
DEFAULT_BROKER_TIMEOUT = 5.0  # seconds: ClientSettings.broker_timeout's default (see fail_fast_config)
ATTEMPT_MAX = 1.0  # seconds: the longest a producer's single attempt on Redis may take
PAUSE_MAX = 0.25  # seconds: the longest pause between a producer's reconnects
# A worker's bound on one Redis connect or command: a hung primary is given up after this long and the
# connection made again (to the new primary, under Sentinel). Above kombu's 1 s BRPOP poll, which it must
# outlast; a healthy Redis answers in milliseconds.
WORKER_REDIS_TIMEOUT = 3.0
# Seconds idle after which a pooled connection is PINGed before its next use; kombu also drops its BRPOP
# connection when no reply came within 1 s (the BRPOP's own timeout) + this, the only bound on a hung primary
# for a connection that is waiting, not reading.
HEALTH_CHECK_INTERVAL = 3


def celery_config(settings: QueueSettings) -> dict[str, Any]:
    """Celery settings for llava-queue (the decisions are listed in the README, "Architecture")."""
    config: dict[str, Any] = {
        # JSON only: pickle from the broker would be remote code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A job is acknowledged only when done; a worker that dies gives it back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "result_expires": settings.result_expires,
        # Results and coded errors only: an extended result would copy the request (image bytes, URL
        # credentials) into the result backend for result_expires seconds.
        "result_extended": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,  # their results are kept: see app.py
        # Events so Flower sees every state (STARTED included). The result backend is not told of STARTED
        # (task_track_started): one Redis write less per job, 347 -> ~420 no-op jobs/s per worker (bench/).
        "task_track_started": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_default_queue": settings.default_queue,
        "task_default_priority": wire_priority(DEFAULT_PRIORITY, settings.broker_url),
        "task_queue_max_priority": MAX_PRIORITY,
        "worker_hijack_root_logger": False,
    } | _redis_config(settings)
    # redis:// and sentinel:// only: kombu turns on TLS for rediss:// by its transport's name, which a class
    # path would lose. Both are kombu's, with one client reused per channel (producer.transport).
    scheme = settings.broker_url.split("://", 1)[0]
    if scheme in ("redis", "sentinel"):
        config["broker_transport"] = TRANSPORT if scheme == "redis" else SENTINEL_TRANSPORT
    if tls := sentinel_tls_options(settings):
        config["broker_use_ssl"] = config["redis_backend_use_ssl"] = tls
    return config


def _redis_config(settings: QueueSettings) -> dict[str, Any]:
    """How a worker talks to Redis, broker and result backend: every connection bounded and checked, a
    restart or a failover waited out, never fatal."""
    transport_options = {
        "visibility_timeout": settings.visibility_timeout,
        # Priorities: kombu's default Redis steps (0, 3, 6, 9; one list each, 0 served first) and separator,
        # kept so that any Celery client, Flower included, talks to the same keys (custom ones broke
        # Flower's inspect replies).
        # Look for jobs of dead workers every few seconds (kombu's default scans every ~100 s).
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 2)),
        "unacked_restore_throttle": 1,
        "socket_timeout": WORKER_REDIS_TIMEOUT,
        "socket_connect_timeout": WORKER_REDIS_TIMEOUT,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        # Reconnect at once, then every second or two, never giving up (broker_connection_max_retries):
        # kombu's default pauses grow to 30 s, which would keep a worker idle long after a failover.
        "interval_start": 0,
        "interval_step": 1,
        "interval_max": 2,
    }
    return {
        "broker_transport_options": transport_options | sentinel_options(settings, WORKER_REDIS_TIMEOUT),
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout}
        | sentinel_options(settings, WORKER_REDIS_TIMEOUT),
        "redis_socket_timeout": WORKER_REDIS_TIMEOUT,
        "redis_socket_connect_timeout": WORKER_REDIS_TIMEOUT,
        "redis_socket_keepalive": True,
        "redis_backend_health_check_interval": HEALTH_CHECK_INTERVAL,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a Redis restart is waited out, never fatal
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
    }


def sentinel_options(settings: QueueSettings, timeout: float) -> dict[str, Any]:
    """Transport options (kombu's and Celery's alike) that point a ``sentinel://`` URL at the master, the
    Sentinels' own connections bounded by ``timeout``; none without a master name."""
    if not settings.sentinel_master:
        return {}
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if settings.sentinel_password is not None:
        sentinel_kwargs["password"] = settings.sentinel_password.get_secret_value()
    if settings.sentinel_tls:
        sentinel_kwargs |= {"ssl": True, **sentinel_tls_options(settings)}
    return {"master_name": settings.sentinel_master, "sentinel_kwargs": sentinel_kwargs}


def sentinel_tls_options(settings: QueueSettings) -> dict[str, Any]:
    """redis-py's TLS arguments from the ``sentinel_tls*`` settings (kombu's ``broker_use_ssl`` and
    Celery's ``redis_backend_use_ssl`` take the same names); empty without ``sentinel_tls``."""
    if not settings.sentinel_tls:
        return {}
    files = {
        "ssl_ca_certs": settings.sentinel_tls_ca,
        "ssl_certfile": settings.sentinel_tls_cert,
        "ssl_keyfile": settings.sentinel_tls_key,
    }
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED} | {key: str(path) for key, path in files.items() if path}


def backend_client(backend: Any, timeout: float, connect_timeout: float | None = None, **extra: Any) -> Any:
    """A Redis client of its own on ``backend``'s Redis, connected as the backend connects (its
    ``connparams``: Sentinel, TLS), each command bounded by ``timeout`` and each connect by
    ``connect_timeout`` (default: the same), tried once (callers retry where that is safe; Celery's backend
    client waits up to two minutes per read); None for a backend that is not Redis."""
    if not hasattr(backend, "connparams"):
        return None
    bounds = {"socket_timeout": timeout, "socket_connect_timeout": connect_timeout or timeout}
    return backend._create_client(**{**backend.connparams, **bounds, "retry": Retry(NoBackoff(), 0), **extra})


def worker_health(
    app: Celery, timeout: float = 2.0, nodes: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """``{node name: health}`` for every worker that answers ``HEALTH_COMMAND`` within ``timeout`` seconds
    (a broadcast cannot know how many will: it waits the whole ``timeout``). ``nodes``: only those workers,
    and it returns as soon as all of them have answered (none: ``{}`` at once)."""
    addressed: dict[str, Any] = {}
    if nodes is not None:
        names = list(dict.fromkeys([nodes] if isinstance(nodes, str) else nodes))  # each once (the limit)
        if not names:
            return {}
        addressed = {"destination": names, "limit": len(names)}
    replies = app.control.broadcast(HEALTH_COMMAND, reply=True, timeout=timeout, **addressed) or []
    health: dict[str, dict[str, Any]] = {}
    for reply in replies:
        for node, info in reply.items():
            health[node] = info if isinstance(info, dict) else {"error": str(info)}
    return health


def outcome_differences(workers: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{queue: {setting: {node: value}}}`` for each outcome-changing setting that the workers consuming one
    queue (``workers``: :func:`worker_health` replies) do not agree on: the same job could succeed on one and
    fail on another. Workers that report no such settings (older ones) are left out."""
    members: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for node, info in workers.items():
        reported = info.get(OUTCOME_SETTINGS_KEY)
        if isinstance(reported, dict):
            for queue in info.get("queues") or []:
                members.setdefault(queue, []).append((node, reported))
    differences: dict[str, dict[str, dict[str, Any]]] = {}
    for queue, group in sorted(members.items()):
        for name in sorted({name for _, reported in group for name in reported}):
            values = {node: reported.get(name) for node, reported in group}
            if len({repr(value) for value in values.values()}) > 1:
                differences.setdefault(queue, {})[name] = values
    return differences


def attempt_timeout(broker_timeout: float) -> float:
    """Seconds one producer attempt on Redis (a connect, a command) may take: a quarter of
    ``broker_timeout``, at most a second (a live Redis answers in milliseconds)."""
    return round(min(ATTEMPT_MAX, broker_timeout / 4), 3)


def fail_fast_config(settings: QueueSettings, broker_timeout: float) -> dict[str, Any]:
    """Overrides for a producer: every call on an unreachable Redis (a dead port, or a server that accepts
    and never answers) raises within ``broker_timeout`` (+ one short pause), instead of being waited out as a
    worker does. The arithmetic, with ``a`` = :func:`attempt_timeout` (``broker_timeout / 4``, at most 1 s):

    - Each attempt (a connect or a command, broker or result backend) is bounded by ``a``.
    - A single read (``state``, ``ready``, a ``job_id``'s existence check) is one attempt: ``a``
      (``result_backend_always_retry`` off). A publish, a control broadcast or a status scan on a broker that
      is down: one connect or command and one retry, ``2a``.
    - A result subscription that fails (a send subscribes to its job's channel before publishing; ``get``,
      ``wait``, ``as_completed`` subscribe and wait) reconnects for one window, kombu's ``retry_over_time``
      with ``timeout = broker_timeout - 2a`` and pauses of at most ``PAUSE_MAX``: the first try (``a``), the
      window, then at most one pause and one try past its end: ``broker_timeout + PAUSE_MAX`` in all. So a
      waiting read rides out a Redis restart of up to ``broker_timeout - 2a`` seconds, and a pooled connection
      left dead by a restart is replaced on the next call (nothing needs restarting).
    - The inline-image blob store (``LlavaClient.blob_store``) has its own client, bounded the same way.

    ``result_extended`` and the rest stay as the worker has them.
    """
    attempt = attempt_timeout(broker_timeout)
    one_retry = {"max_retries": 1, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.1}
    # The backend's retry policy drives the result subscription's reconnects (kombu's retry_over_time:
    # ``timeout`` bounds the window, ``max_retries`` is only a backstop).
    window = broker_timeout - 2 * attempt  # > 0: never 0, which retry_over_time reads as no limit
    reconnects = {"max_retries": 100, "interval_start": 0, "interval_step": 0.1, "interval_max": PAUSE_MAX}
    transport = celery_config(settings)["broker_transport_options"] | sentinel_options(settings, attempt)
    transport |= {"socket_timeout": attempt, "health_check_interval": 0}
    # kombu's connection failover options (used where a connection is made outside a publish: control
    # broadcasts, status scans): one retry without its default 2 s pause, both tries within the window.
    transport |= {"socket_connect_timeout": attempt, "max_retries": 1, "interval_start": 0}
    transport |= {"interval_step": 0.1, "interval_max": PAUSE_MAX, "connect_retries_timeout": 2 * attempt}
    return {
        "broker_connection_timeout": attempt,
        "broker_connection_max_retries": 1,
        "broker_transport_options": transport,
        "task_publish_retry_policy": one_retry,
        "redis_socket_connect_timeout": attempt,
        "redis_socket_timeout": attempt,
        "result_backend_always_retry": False,
        "redis_backend_health_check_interval": 0,  # a waiting subscription reads stored results instead
        "result_backend_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            "retry_policy": {**reconnects, "timeout": window},
        }
        | sentinel_options(settings, attempt),
    }


def create_celery_app(
    settings: QueueSettings,
    main: str = "llava-queue",
    *,
    role: Role = "worker",
    broker_timeout: float = DEFAULT_BROKER_TIMEOUT,
) -> Celery:
    """A Celery app bound to ``settings`` (not set as the process-wide current app).

    ``role="worker"`` waits out a Redis restart, however long; ``role="producer"`` raises within about
    ``broker_timeout`` seconds instead (see :func:`fail_fast_config`).
    """
    app = Celery(main, broker=settings.broker_url, backend=settings.result_backend, set_as_current=False)
    app.conf.update(celery_config(settings))
    if role == "producer":
        app.conf.update(fail_fast_config(settings, broker_timeout))
        app.loader.override_backends = RESULT_BACKENDS  # subscribes to results only to wait (transport.py)
    return app
