"""``llava-queue flower``: Flower on the broker, safe by default.

- It binds ``flower_address`` (default ``127.0.0.1``); an address that is not loopback (``0.0.0.0``, a LAN
  address, a host name) is refused unless ``flower_basic_auth`` is set.
- Secrets travel in the environment, never on the command line (which ``ps`` shows to every local user):
  Celery's app (:mod:`producer.flower_app`) reads the settings from ``LLAVA_*`` (the ones given here are
  passed on, so a ``--config`` file's broker reaches it too), Celery the broker URL from
  ``CELERY_BROKER_URL`` and Flower its credentials from ``FLOWER_BASIC_AUTH``.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Mapping

from pydantic import SecretStr

from producer.errors import InvalidRequest
from producer.settings import ClientSettings


def is_loopback(address: str) -> bool:
    """Whether ``address`` (an IP address or ``localhost``) is reachable from this machine only."""
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost, or "" (every interface)
        return False


def flower_url(settings: ClientSettings) -> str:
    """Where Flower answers, as a browser would type it."""
    host = settings.flower_address.strip("[]")
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.flower_port}/"


def flower_command(settings: ClientSettings, environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command (``python -m celery flower --address=… --port=…``) and its environment.

    Raises :class:`InvalidRequest` for an address that is not loopback without basic auth.
    """
    auth = settings.flower_basic_auth
    if not auth and not is_loopback(settings.flower_address):
        raise InvalidRequest(
            f"Flower on {settings.flower_address!r} would be open to the network without a password: "
            "set LLAVA_FLOWER_BASIC_AUTH=user:password, or keep the default address 127.0.0.1"
        )
    argv = [
        sys.executable, "-m", "celery", "-A", "producer.flower_app", "flower",
        f"--address={settings.flower_address}", f"--port={settings.flower_port}",
    ]  # fmt: skip
    env = {key: value for key, value in environ.items() if key != "FLOWER_BASIC_AUTH"}
    env["CELERY_BROKER_URL"] = env["LLAVA_BROKER_URL"] = settings.broker_url
    env["LLAVA_RESULT_BACKEND"] = settings.result_backend
    env |= _sentinel_environment(settings)
    if auth:
        env["FLOWER_BASIC_AUTH"] = auth
    return argv, env


def _sentinel_environment(settings: ClientSettings) -> dict[str, str]:
    """The ``LLAVA_SENTINEL_*`` variables of the Sentinel settings that are set."""
    env = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if not name.startswith("sentinel_") or value is None or value is False:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"LLAVA_{name.upper()}"] = "true" if value is True else str(value)
    return env
