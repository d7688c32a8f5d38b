"""The site's one :class:`~producer.LlavaClient`, built on first use from ``settings.LLAVA`` over the
``LLAVA_*`` environment, and rebuilt when a test overrides ``LLAVA``. Thread-safe: one Celery app serves
every request thread."""

from __future__ import annotations

import threading
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from producer import ClientSettings, LlavaClient, load_settings

_lock = threading.Lock()
_client: LlavaClient | None = None


def get_client() -> LlavaClient:
    """The shared client (created on the first request, not at import)."""
    global _client
    with _lock:
        if _client is None:
            _client = LlavaClient(load_settings(ClientSettings, **getattr(settings, "LLAVA", {})))
        return _client


@receiver(setting_changed)
def _forget_client(*, setting: str, **_: Any) -> None:
    global _client
    if setting == "LLAVA":
        with _lock:
            if _client is not None:
                _client.close()
            _client = None
