"""docker-compose.yml and the Dockerfile stay in step with the CLIs and settings (Docker cannot run here)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from worker.cli import build_settings, parse_args
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
ENV = {"REDIS_PASSWORD": "s3cret", "FLOWER_BASIC_AUTH": "admin:pw"}


def interpolate(value: object) -> object:
    """Compose-style ${VAR}, ${VAR:?message} and ${VAR:-default} substitution with ENV."""
    if isinstance(value, str):
        pattern = r"\$\{(\w+)(?::[?-][^}]*)?\}"
        return re.sub(pattern, lambda m: ENV[m.group(1)], value).replace("$$", "$")
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolate(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))  # type: ignore[return-value]


def worker_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if svc["command"][0] == "llava-worker"}


def test_redis_keeps_jobs_aof_noeviction_password_healthcheck(compose: dict) -> None:
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert "--requirepass s3cret" in command
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_every_worker_command_parses_with_llava_worker(compose: dict, monkeypatch) -> None:
    workers = worker_services(compose)
    assert workers, "no llava-worker service"
    for name, service in workers.items():
        env = service["environment"]
        for key in [k for k in os.environ if k.startswith("LLAVA_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        args = parse_args(service["command"][1:])
        config = Path(args.config.replace("/app/", f"{ROOT}/"))
        assert config.is_file(), f"{name}: {args.config} is not in the image"
        args.config = str(config)
        settings = build_settings(args)
        assert settings.broker_url == "redis://:s3cret@redis:6379/0"
        assert settings.result_backend == "redis://:s3cret@redis:6379/1"
        assert settings.device == "cuda" and settings.hostname.startswith("gpu")
        unknown = {k for k in env if k.startswith("LLAVA_")} - {
            f"LLAVA_{field.upper()}" for field in WorkerSettings.model_fields
        }
        assert not unknown, f"{name}: environment names no setting: {unknown}"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "/data/huggingface" in " ".join(service["volumes"]) and env["HF_HOME"] == "/data/huggingface"


def test_warm_shutdown_grace_fits_inside_dockers(compose: dict) -> None:
    for service in worker_services(compose).values():
        grace = float(service["environment"]["LLAVA_SHUTDOWN_GRACE"])
        docker = service["stop_grace_period"]
        seconds = float(docker[:-1]) * (60 if docker.endswith("m") else 1)
        assert grace < seconds
    hostnames = [parse_args(s["command"][1:]).hostname for s in worker_services(compose).values()]
    assert len(hostnames) == len(set(hostnames)) >= 2


def test_each_worker_reserves_its_own_gpu(compose: dict) -> None:
    seen: list[str] = []
    for service in worker_services(compose).values():
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        seen += device["device_ids"]
    assert len(seen) == len(set(seen))


def test_flower_runs_celery_flower_with_basic_auth(compose: dict) -> None:
    flower = compose["services"]["flower"]
    command = flower["command"]
    assert command[0] == "celery" and "flower" in command
    assert "--broker=redis://:s3cret@redis:6379/0" in command
    assert "--basic-auth=admin:pw" in command
    assert "5555:5555" in flower["ports"]


def test_dockerfile_installs_the_worker_extra_and_runs_llava_worker() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+runtime", dockerfile, re.MULTILINE)
    assert '".[worker,monitor]"' in dockerfile
    assert '"llava-worker"' in dockerfile
