"""Image references as any Celery client may send them, through a real worker: MIME-wrapped base64 in a
``data:`` URI is an image like any other; an unparsable URL is the request's fault (``invalid_request``)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from producer import Job, LlavaClient, LlavaError
from producer.contract import TASK_CAPTION
from tests.integration.image_server import GOOD_PNG


def send(client: LlavaClient, queue: str, image: str) -> Job[Any]:
    request = {"image": image, "generation": {"max_new_tokens": 2}}
    return client.job(client.app.send_task(TASK_CAPTION, kwargs={"request": request}, queue=queue).id)


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_mime_wrapped_base64_is_captioned(client: LlavaClient, shared_worker, newline: str) -> None:
    text = base64.b64encode(GOOD_PNG).decode()
    wrapped = newline.join(text[i : i + 76] for i in range(0, len(text), 76))
    result = send(client, shared_worker[2], "data:image/png;base64," + wrapped).get(timeout=60)
    assert result.image_tokens > 0


@pytest.mark.parametrize("url", ["http://[::1", "https://[::1/x.png", "http://host:99999/x.png"])
def test_an_unparsable_url_is_an_invalid_request(client: LlavaClient, shared_worker, url: str) -> None:
    with pytest.raises(LlavaError) as error:
        send(client, shared_worker[2], url).get(timeout=60)
    assert error.value.code == "invalid_request"
