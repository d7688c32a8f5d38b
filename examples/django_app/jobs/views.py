"""Two views: enqueue a job (202 + its id and status URL) and report on it (state, result or error).

``POST /jobs/`` as multipart form (an ``image`` file upload) or JSON / urlencoded (an http(s) ``url``):
``kind`` = ``caption`` | ``vqa`` | ``classify``, plus ``prompt``, ``question`` (vqa), ``labels`` (classify:
a list, or comma-separated), ``max_new_tokens``. Bad input is 400 with ``{"error": {"code", "message"}}``
(413 for an image over the size cap). When Redis does not answer within the client's ``broker_timeout``
(default 5 s), both views answer 503 ``{"error": {"code": "broker_unavailable", "message"}}``.

``GET /jobs/<id>/``: ``{"job_id", "state": "PENDING"}`` while queued or running, then
``{"state": "SUCCESS", "result": {...}}`` or ``{"state": "FAILURE", "error": {"code", "message"}}``.
"""

from __future__ import annotations

import json
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from jobs.queue import get_client
from producer import BrokerUnavailable, ImageTooLarge, InvalidRequest, LlavaError


@csrf_exempt  # an API called by other services: put your own authentication here
@require_POST
def enqueue(request: HttpRequest) -> JsonResponse:
    """Enqueue one job; 202 with ``job_id``, ``task`` and ``status_url`` (also the Location header)."""
    client = get_client()
    try:
        fields = _fields(request)
        image = _image(request, fields, client.settings.max_image_bytes)
        job = client.submit(str(fields.get("kind", "")), image, **_params(fields))
    except BrokerUnavailable as exc:
        return _error(exc, 503)
    except LlavaError as exc:
        return _error(exc, 413 if isinstance(exc, ImageTooLarge) else 400)
    location = reverse("job-status", args=[job.id])
    body = {"job_id": job.id, "task": job.task_name, "status_url": request.build_absolute_uri(location)}
    response = JsonResponse(body, status=202)
    response["Location"] = location
    return response


@require_GET
def status(request: HttpRequest, job_id: str) -> JsonResponse:
    """The job's state; its result or coded error once it finished. Never waits for the job."""
    job = get_client().job(job_id)
    try:
        if not job.ready():
            return JsonResponse({"job_id": job_id, "state": "PENDING"})
        result = job.get(timeout=0)  # already in the handle: no wait
    except BrokerUnavailable as exc:
        return _error(exc, 503)
    except LlavaError as exc:
        return JsonResponse({"job_id": job_id, "state": "FAILURE", "error": exc.to_dict()})
    return JsonResponse({"job_id": job_id, "state": "SUCCESS", "result": result.model_dump(mode="json")})


def _error(exc: LlavaError, status: int) -> JsonResponse:
    return JsonResponse({"error": exc.to_dict()}, status=status)


def _fields(request: HttpRequest) -> dict[str, Any]:
    if request.content_type == "application/json":
        try:
            fields = json.loads(request.body or b"{}")
        except ValueError as exc:
            raise InvalidRequest(f"the body is not JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise InvalidRequest("the JSON body must be an object")
        return fields
    fields = {key: request.POST.get(key) for key in request.POST}
    if "labels" in request.POST:
        fields["labels"] = request.POST.getlist("labels")
    return fields


def _image(request: HttpRequest, fields: dict[str, Any], max_bytes: int) -> bytes | str:
    upload, url = request.FILES.get("image"), fields.get("url")
    if (upload is None) == (not url):
        raise InvalidRequest("send exactly one of: an 'image' file upload, or a 'url'")
    if upload is None:
        if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
            raise InvalidRequest("url must be an http(s) URL")  # never a path on this server
        return url
    if upload.size is not None and upload.size > max_bytes:
        raise ImageTooLarge(f"the upload is {upload.size} bytes, over the {max_bytes}-byte cap")
    return upload.read()


def _params(fields: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {k: fields[k] for k in ("prompt", "question") if fields.get(k)}
    labels = fields.get("labels")
    if isinstance(labels, str) or (isinstance(labels, list) and len(labels) == 1):
        labels = labels if isinstance(labels, str) else labels[0]
        labels = [label.strip() for label in labels.split(",") if label.strip()]
    if labels:
        params["labels"] = labels
    if fields.get("max_new_tokens") not in (None, ""):
        try:
            params["max_new_tokens"] = int(fields["max_new_tokens"])
        except (TypeError, ValueError):
            raise InvalidRequest("max_new_tokens must be an integer") from None
    return params
