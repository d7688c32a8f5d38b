"""Settings precedence: CLI overrides > LLAVA_* environment > YAML file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from producer.app import WORKER_REDIS_TIMEOUT, celery_config, fail_fast_config
from producer.settings import ClientSettings, QueueSettings, load_settings
from producer.transport import SENTINEL_TRANSPORT, TRANSPORT
from worker.faults import Faults
from worker.fetch_policy import FetchPolicy
from worker.settings import DEFAULT_MODEL, WorkerSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("LLAVA_"):
            monkeypatch.delenv(key)


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "worker.yaml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_settings(WorkerSettings)
    assert settings.broker_url == "redis://localhost:6379/0"
    assert settings.result_backend == "redis://localhost:6379/1"
    assert settings.model == DEFAULT_MODEL
    assert settings.consumed_queues == ["llava.llava-v1.6-mistral-7b-hf", "llava"]
    assert load_settings(WorkerSettings, model_name="m7", consume_default_queue=False).consumed_queues == [
        "llava.m7"
    ]


def test_yaml_over_defaults_env_over_yaml_overrides_over_env(tmp_path: Path, monkeypatch) -> None:
    config = write_yaml(tmp_path, "model: from-yaml\nmax_new_tokens: 10\ndevice: cpu\nconcurrency: 3\n")
    monkeypatch.setenv("LLAVA_MAX_NEW_TOKENS", "20")
    monkeypatch.setenv("LLAVA_CONCURRENCY", "5")
    settings = load_settings(WorkerSettings, config_file=config, concurrency=7, device=None)
    assert settings.model == "from-yaml"  # YAML over default
    assert settings.device == "cpu"  # YAML, since the override was None (flag not given)
    assert settings.max_new_tokens == 20  # env over YAML
    assert settings.concurrency == 7  # override over env


def test_llava_config_env_names_the_yaml(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LLAVA_CONFIG", str(write_yaml(tmp_path, "model: via-env-config\n")))
    assert load_settings(WorkerSettings).model == "via-env-config"


def test_worker_refuses_unknown_keys_but_client_ignores_them(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "model: m\nmax_new_tokenz: 3\n")
    with pytest.raises(ValidationError, match="max_new_tokenz"):
        load_settings(WorkerSettings, config_file=config)
    assert load_settings(ClientSettings, config_file=config).broker_url.startswith("redis://")


def test_lists_from_env_and_range_checks(monkeypatch) -> None:
    monkeypatch.setenv("LLAVA_QUEUES", "llava.a, llava.b")
    assert load_settings(WorkerSettings).consumed_queues == ["llava.a", "llava.b"]
    with pytest.raises(ValidationError, match="max_new_tokens_cap"):
        load_settings(WorkerSettings, max_new_tokens=600, max_new_tokens_cap=512)
    with pytest.raises(ValidationError):
        load_settings(WorkerSettings, device="tpu")


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_settings(WorkerSettings, config_file=tmp_path / "nope.yaml")


def test_shipped_configs_load() -> None:
    for config in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")):
        settings = load_settings(WorkerSettings, config_file=config)
        assert settings.model, config


def test_task_threads_are_the_model_supply_plus_a_fetch_allowance() -> None:
    assert load_settings(WorkerSettings, max_batch_size=4).threads == 2 * 4 + 4
    assert load_settings(WorkerSettings, max_batch_size=4, fetch_threads=0).threads == 8
    assert load_settings(WorkerSettings, max_batch_size=4, concurrency=3).threads == 3


def test_visibility_timeout_must_exceed_the_longest_job_fetch_included() -> None:
    # the fetch (all retries and pauses) ends by the job's deadline, so only job_timeout counts, plus the
    # decode of an image already fetched; retries and fetch deadlines no longer add up on top of it
    settings = load_settings(
        WorkerSettings, job_timeout=30, fetch_deadline=60, fetch_retries=10, visibility_timeout=33
    )
    assert settings.longest_job_seconds == 32
    with pytest.raises(ValidationError, match="visibility_timeout"):
        load_settings(WorkerSettings, job_timeout=30, visibility_timeout=32)


def test_settings_both_sides_share_are_defined_once() -> None:
    """The image byte cap, broker and backend are fields of QueueSettings, inherited alike by both sides."""
    shared = QueueSettings.model_fields
    assert {"broker_url", "result_backend", "max_image_bytes"} <= set(shared)
    for side in (ClientSettings, WorkerSettings):
        assert {name: repr(side.model_fields[name]) for name in shared} == {
            name: repr(field) for name, field in shared.items()
        }
    assert load_settings(ClientSettings).max_image_bytes == load_settings(WorkerSettings).max_image_bytes


def test_a_settings_group_takes_each_field_from_its_prefixed_setting() -> None:
    settings = WorkerSettings(fault_oom_marker="OOM", fault_slow_step_s=0.5, fetch_retries=4, fetch_timeout=3)
    faults = Faults.from_settings(settings)
    assert (faults.oom_marker, faults.slow_step_s, faults.crash_marker) == ("OOM", 0.5, None)
    policy = FetchPolicy.from_settings(settings)
    assert (policy.retries, policy.timeout, policy.max_bytes) == (4, 3, settings.max_image_bytes)


def test_only_redis_brokers_take_the_client_reusing_transport() -> None:
    def transport(url: str) -> object:
        return celery_config(QueueSettings(broker_url=url)).get("broker_transport")

    assert transport("redis://localhost:6379/0") == TRANSPORT
    # rediss: kombu turns TLS on by its own transport's name; amqp and sentinel keep theirs too
    assert transport("rediss://localhost:6380/0") is None
    assert transport("amqp://guest:guest@localhost:5672//") is None


def test_a_sentinel_url_without_its_master_name_is_refused_naming_the_setting() -> None:
    for url in ("broker_url", "result_backend"):
        with pytest.raises(ValidationError, match="set LLAVA_SENTINEL_MASTER"):
            QueueSettings(**{url: "sentinel://s1:26379/0;sentinel://s2:26379/0"})


def test_the_sentinel_master_reaches_broker_result_backend_and_the_producers_overrides() -> None:
    settings = QueueSettings(
        broker_url="sentinel://s1:26379/0;sentinel://s2:26379/0",
        result_backend="sentinel://s1:26379/1;sentinel://s2:26379/1",
        sentinel_master="llava",
        sentinel_password="secret",
    )
    worker = celery_config(settings)
    producer = worker | fail_fast_config(settings, broker_timeout=4.0)
    assert worker["broker_transport"] == SENTINEL_TRANSPORT
    for config, timeout in ((worker, WORKER_REDIS_TIMEOUT), (producer, 1.0)):
        for options in (config["broker_transport_options"], config["result_backend_transport_options"]):
            assert options["master_name"] == "llava"
            assert options["sentinel_kwargs"] == {
                "socket_timeout": timeout, "socket_connect_timeout": timeout, "password": "secret"
            }  # fmt: skip


def test_every_redis_connection_of_a_worker_is_bounded_and_checked() -> None:
    config = celery_config(QueueSettings())
    broker = config["broker_transport_options"]
    assert broker["socket_timeout"] == broker["socket_connect_timeout"] == WORKER_REDIS_TIMEOUT
    assert config["redis_socket_timeout"] == config["redis_socket_connect_timeout"] == WORKER_REDIS_TIMEOUT
    assert broker["health_check_interval"] == config["redis_backend_health_check_interval"] > 0
    assert broker["interval_max"] <= 2  # reconnects keep coming: a failover is over in seconds


def test_a_channel_of_a_closed_connection_raises_a_connection_error_not_an_attribute_error() -> None:
    """kombu's channel read the closed connection's address (None.hostname) when it made a client while
    restoring jobs: an AttributeError that stopped the worker, where a connection error is recovered from."""
    from types import SimpleNamespace

    import redis

    from producer.sentinel import SentinelChannel
    from producer.transport import Channel

    for channel_class in (Channel, SentinelChannel):
        channel = object.__new__(channel_class)  # a channel's state after Connection.close, without a Redis
        channel.connection = SimpleNamespace(client=None)
        with pytest.raises(redis.ConnectionError, match="closed"):
            channel._connparams()


def test_sentinel_tls_reaches_the_sentinels_the_broker_and_the_result_backend(tmp_path: Path) -> None:
    import ssl

    files = {name: tmp_path / name for name in ("ca.crt", "client.crt", "client.key")}
    settings = QueueSettings(
        broker_url="sentinel://s1:26379/0",
        result_backend="sentinel://s1:26379/1",
        sentinel_master="llava",
        sentinel_tls=True,
        sentinel_tls_ca=files["ca.crt"],
        sentinel_tls_cert=files["client.crt"],
        sentinel_tls_key=files["client.key"],
    )
    config = celery_config(settings)
    expected = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": str(files["ca.crt"]),
        "ssl_certfile": str(files["client.crt"]),
        "ssl_keyfile": str(files["client.key"]),
    }
    assert config["broker_use_ssl"] == config["redis_backend_use_ssl"] == expected
    for options in (config["broker_transport_options"], config["result_backend_transport_options"]):
        assert options["sentinel_kwargs"] == {"socket_timeout": WORKER_REDIS_TIMEOUT,
                                              "socket_connect_timeout": WORKER_REDIS_TIMEOUT,
                                              "ssl": True, **expected}  # fmt: skip
    assert "broker_use_ssl" not in celery_config(QueueSettings())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sentinel_tls": True}, "LLAVA_SENTINEL_TLS is for sentinel:// URLs"),
        ({"broker_url": "sentinel://s1:26379/0", "sentinel_master": "m", "sentinel_tls_cert": "c.crt"},
         "LLAVA_SENTINEL_TLS_CERT and LLAVA_SENTINEL_TLS_KEY"),
    ],
)  # fmt: skip
def test_incomplete_sentinel_tls_settings_are_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        QueueSettings(**values)  # type: ignore[arg-type]


def test_a_settings_problem_names_the_variable_never_its_value() -> None:
    """pydantic's message repeats the input: a broker URL's password, the Sentinels' password."""
    from producer.app import settings_problem

    with pytest.raises(ValidationError) as raised:
        QueueSettings(
            broker_url="sentinel://:url-pw@s1:26379/0",
            sentinel_password="sentinel-pw",
            visibility_timeout=0,  # type: ignore[arg-type]
        )
    problem = settings_problem(raised.value)
    assert "LLAVA_VISIBILITY_TIMEOUT: Input should be greater than or equal to 1" in problem
    assert "url-pw" not in problem and "sentinel-pw" not in problem
    with pytest.raises(ValidationError) as raised:
        QueueSettings(broker_url="sentinel://:url-pw@s1:26379/0", sentinel_password="sentinel-pw")
    problem = settings_problem(raised.value)
    assert problem.startswith("settings: Value error, 'sentinel://s1:26379/0' is a Redis Sentinel URL")
    assert "url-pw" not in problem and "sentinel-pw" not in problem and "sentinel-pw" in str(raised.value)
