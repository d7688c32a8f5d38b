"""docker-compose.yml and the Dockerfile stay in step with the CLIs and settings (Docker cannot run here)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from producer.memory_policy import MemoryPolicy
from worker.cli import build_settings, parse_args
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
ENV = {"REDIS_PASSWORD": "s3cret", "FLOWER_BASIC_AUTH": "admin:pw"}
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def interpolate(value: object) -> object:
    """Compose-style ${VAR}, ${VAR:?message} and ${VAR:-default} substitution with ENV."""
    if isinstance(value, str):
        pattern = r"\$\{(\w+)(?::([?-])([^}]*))?\}"

        def substitute(match: re.Match[str]) -> str:
            name, kind, text = match.groups()
            return ENV[name] if name in ENV or kind != "-" else text

        return re.sub(pattern, substitute, value).replace("$$", "$")
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolate(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))  # type: ignore[return-value]


def worker_services(compose: dict) -> dict[str, dict]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if svc.get("command", [""])[0] == "llava-worker"
    }


def default_services(compose: dict) -> dict[str, dict]:
    """What a plain `docker compose up` starts (no profile)."""
    return {name: svc for name, svc in compose["services"].items() if not svc.get("profiles")}


def settings_of(service: dict, monkeypatch: pytest.MonkeyPatch) -> WorkerSettings:
    for key in [k for k in os.environ if k.startswith("LLAVA_")]:
        monkeypatch.delenv(key)
    for key, value in service["environment"].items():
        monkeypatch.setenv(key, str(value))
    args = parse_args(service["command"][1:])
    config = Path(args.config.replace("/app/", f"{ROOT}/"))
    assert config.is_file(), f"{args.config} is not in the image"
    args.config = str(config)
    return build_settings(args)


def test_redis_keeps_jobs_aof_noeviction_password_from_env_healthcheck(compose: dict) -> None:
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    # The policy as the producer and the worker judge it: under the memory cap, nothing may be evicted.
    policy = re.search(r"--maxmemory-policy (\S+)", command)
    assert policy is not None and "--maxmemory " in command
    assert not MemoryPolicy(policy.group(1), maxmemory=1).evicts
    # requirepass comes from the environment through a config file: never on a command line `ps` shows.
    assert "requirepass" in command and '"$REDIS_PASSWORD"' in command and "s3cret" not in command
    assert "--requirepass" not in command
    assert redis["environment"]["REDIS_PASSWORD"] == "s3cret"
    assert redis["environment"]["REDISCLI_AUTH"] == "s3cret"
    check = " ".join(redis["healthcheck"]["test"])
    assert "ping" in check and " -a " not in check
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_redis_is_reachable_by_remote_workers(compose: dict) -> None:
    [port] = compose["services"]["redis"]["ports"]
    assert port == "6379:6379", "workers on other machines must reach Redis"


def test_every_worker_command_parses_with_llava_worker(
    compose: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    workers = worker_services(compose)
    assert set(workers) == {"worker-gpu0", "worker-gpu1"}
    for name, service in workers.items():
        settings = settings_of(service, monkeypatch)
        assert settings.broker_url == "redis://:s3cret@redis:6379/0"
        assert settings.result_backend == "redis://:s3cret@redis:6379/1"
        assert settings.device == "cuda"
        assert settings.hostname == f"gpu{name.removeprefix('worker-gpu')}@{name}", "fixed node names"
        env = service["environment"]
        unknown = {k for k in env if k.startswith("LLAVA_")} - {
            f"LLAVA_{field.upper()}" for field in WorkerSettings.model_fields
        }
        assert not unknown, f"{name}: environment names no setting: {unknown}"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "/data/huggingface" in " ".join(service["volumes"]) and env["HF_HOME"] == "/data/huggingface"


def test_one_gpu_by_default_the_second_gpu_is_a_profile(compose: dict) -> None:
    default_workers = set(worker_services(compose)) & set(default_services(compose))
    assert default_workers == {"worker-gpu0"}
    assert compose["services"]["worker-gpu1"]["profiles"] == ["gpu1"]


def test_warm_shutdown_grace_fits_inside_dockers(compose: dict) -> None:
    for service in worker_services(compose).values():
        grace = float(service["environment"]["LLAVA_SHUTDOWN_GRACE"])
        docker = service["stop_grace_period"]
        seconds = float(docker[:-1]) * (60 if docker.endswith("m") else 1)
        assert grace < seconds


def test_each_worker_reserves_its_own_gpu(compose: dict) -> None:
    seen: list[str] = []
    for name, service in worker_services(compose).items():
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert device["device_ids"] == [name.removeprefix("worker-gpu")]
        seen += device["device_ids"]
    assert len(seen) == len(set(seen))


def test_worker_healthcheck_asks_its_own_node_for_llava_health(compose: dict) -> None:
    for service in worker_services(compose).values():
        kind, check = service["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        words = shlex.split(check)
        assert words[:5] == ["celery", "-A", "worker.celery_app", "inspect", "llava_health"]
        assert words[words.index("--destination") + 1] == "$LLAVA_HOSTNAME"
        assert "model_loaded" in check
        assert service["healthcheck"]["start_period"].endswith("m"), "loading a 7B model takes minutes"


def test_weights_are_downloaded_once_then_workers_stay_offline(
    compose: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    download = compose["services"]["download"]
    assert download["command"][:2] == ["hf", "download"]
    assert download["restart"] == "no" and not download.get("profiles")
    [volume] = download["volumes"]
    for service in worker_services(compose).values():
        settings = settings_of(service, monkeypatch)
        revision = download["command"][download["command"].index("--revision") + 1]
        assert download["command"][2] == settings.model and revision == settings.model_revision
        assert service["depends_on"]["download"]["condition"] == "service_completed_successfully"
        assert volume in service["volumes"]
        assert service["environment"]["HF_HUB_OFFLINE"] == "1"


def test_flower_on_loopback_with_basic_auth_from_env(compose: dict) -> None:
    flower = compose["services"]["flower"]
    assert flower["command"] == ["celery", "flower"]
    assert "s3cret" not in " ".join(flower["command"]), "no secret on the command line"
    env = flower["environment"]
    assert env["CELERY_BROKER_URL"] == "redis://:s3cret@redis:6379/0"
    assert env["FLOWER_BASIC_AUTH"] == "admin:pw"
    assert flower["ports"] == [f"127.0.0.1:{env['FLOWER_PORT']}:5555"]


def test_prometheus_profile_scrapes_every_worker(compose: dict) -> None:
    prometheus = compose["services"]["prometheus"]
    assert prometheus["profiles"] == ["metrics"]
    assert all(port.startswith("127.0.0.1:") for port in prometheus["ports"])
    config = yaml.safe_load(compose["configs"]["prometheus"]["content"])
    [job] = config["scrape_configs"]
    [targets] = [static["targets"] for static in job["static_configs"]]
    expected = {
        f"{name}:{service['environment']['LLAVA_METRICS_PORT']}"
        for name, service in worker_services(compose).items()
    }
    assert set(targets) == expected


def test_dockerfile_lean_base_one_pinned_cuda_torch() -> None:
    [base] = re.findall(r"^FROM (\S+)", DOCKERFILE, re.MULTILINE)
    assert base.startswith("python:") and "slim" in base, "CUDA comes with the torch wheel, not the base"
    makefile_torch = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert makefile_torch is not None
    assert f"ARG TORCH_VERSION={makefile_torch.group(1)}" in DOCKERFILE, "the same torch as make install"
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cu\d+$", DOCKERFILE, re.MULTILINE)
    assert '--index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in DOCKERFILE


def test_dockerfile_installs_the_torchvision_release_made_for_its_torch() -> None:
    """torchvision (transformers' fast image processor) from the same CUDA index; PyTorch pairs torch 2.N
    with torchvision 0.(N+15) (2.13 with 0.28), and each torchvision requires exactly its torch."""
    torch = re.search(r"^ARG TORCH_VERSION=2\.(\d+)\.", DOCKERFILE, re.MULTILINE)
    vision = re.search(r"^ARG TORCHVISION_VERSION=0\.(\d+)\.", DOCKERFILE, re.MULTILINE)
    assert torch is not None and vision is not None
    assert int(vision.group(1)) == int(torch.group(1)) + 15
    assert '"torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"' in DOCKERFILE


def test_dockerfile_installs_dependencies_before_copying_code() -> None:
    lines = DOCKERFILE.splitlines()
    first_code_copy = next(i for i, line in enumerate(lines) if line.startswith("COPY producer"))
    deps = next(i for i, line in enumerate(lines) if "pip install -r /tmp/requirements.txt" in line)
    assert deps < first_code_copy
    assert "extras['worker']" in DOCKERFILE
    assert "'monitor'" not in DOCKERFILE, "Flower runs from its own image"
    assert "pip install --no-deps ." in DOCKERFILE


def test_dockerfile_runs_llava_worker_as_a_non_root_user() -> None:
    users = re.findall(r"^USER (\S+)", DOCKERFILE, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert '"llava-worker"' in DOCKERFILE
    assert "chown llava:llava /data/huggingface" in DOCKERFILE, "the cache volume must be writable"


def test_dockerignore_keeps_the_build_context_to_the_package() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "everything is ignored unless listed"
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "producer", "worker", "configs"}
    copied = set(re.findall(r"^COPY (\S+)", DOCKERFILE, re.MULTILINE))
    assert copied <= allowed
