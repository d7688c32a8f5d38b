"""``llava-queue flower``'s command: loopback by default, no open address without auth, no secret in argv."""

from __future__ import annotations

import pytest

from producer.errors import InvalidRequest
from producer.flower import flower_command, flower_url, is_loopback
from producer.settings import ClientSettings

BROKER = "redis://:s3cret@redis.internal:6379/0"


def settings(**values: object) -> ClientSettings:
    return ClientSettings(broker_url=BROKER, **values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.5", False), ("flower.example.com", False)],
)  # fmt: skip
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_default_binds_loopback_and_keeps_secrets_out_of_argv() -> None:
    argv, env = flower_command(
        settings(flower_basic_auth="admin:pw-123"), {"FLOWER_BASIC_AUTH": "x:y", "A": "1"}
    )
    assert argv[-6:] == [
        "celery",
        "-A",
        "producer.flower_app",
        "flower",
        "--address=127.0.0.1",
        "--port=5555",
    ]
    assert not any("s3cret" in arg or "pw-123" in arg for arg in argv)
    assert (
        env["CELERY_BROKER_URL"] == BROKER and env["FLOWER_BASIC_AUTH"] == "admin:pw-123" and env["A"] == "1"
    )
    _, no_auth = flower_command(settings(), {"FLOWER_BASIC_AUTH": "x:y"})
    assert "FLOWER_BASIC_AUTH" not in no_auth  # what the refusal checked is what Flower gets


def test_an_open_address_needs_auth() -> None:
    with pytest.raises(InvalidRequest, match="LLAVA_FLOWER_BASIC_AUTH"):
        flower_command(settings(flower_address="0.0.0.0"), {})
    argv, _ = flower_command(settings(flower_address="0.0.0.0", flower_basic_auth="a:b"), {})
    assert "--address=0.0.0.0" in argv


def test_url_shows_the_bound_address() -> None:
    assert flower_url(settings(flower_port=5601)) == "http://127.0.0.1:5601/"
    assert flower_url(settings(flower_address="::1")) == "http://[::1]:5555/"


def test_flower_runs_the_queues_own_app_with_the_sentinel_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Sentinel URL needs its master name: Flower's app is built from the same settings as the workers'."""
    sentinel = "sentinel://:s3cret@s1:26379/0;sentinel://:s3cret@s2:26379/0"
    given = ClientSettings(broker_url=sentinel, result_backend=sentinel[:-1] + "1", sentinel_master="llava")
    argv, env = flower_command(given, {})
    assert "sentinel" not in " ".join(argv)
    for key, value in env.items():
        if key.startswith("LLAVA_"):
            monkeypatch.setenv(key, value)
    import importlib

    import producer.flower_app

    app = importlib.reload(producer.flower_app).app
    assert app.conf.broker_url == sentinel and app.conf.broker_transport_options["master_name"] == "llava"
