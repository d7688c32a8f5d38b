"""A FastAPI service in front of llava-queue: async endpoints that never block the event loop.

Run it (any LLAVA_* setting applies; a worker must consume the queue)::

    pip install . fastapi uvicorn python-multipart
    LLAVA_BROKER_URL=redis://localhost:6379/0 LLAVA_RESULT_BACKEND=redis://localhost:6379/1 \\
      uvicorn app:app --app-dir examples/fastapi_app

Endpoints:

- ``POST /jobs`` (a multipart ``image`` upload, or a JSON ``url``; ``kind`` caption | vqa | classify, plus
  ``prompt``, ``question``, ``labels``, ``max_new_tokens``): **202** with ``job_id`` and ``status_url``.
- ``GET /jobs/{job_id}``: ``PENDING``, then ``SUCCESS`` with the result or ``FAILURE`` with the coded error.
  Never waits.
- ``POST /caption?wait=30`` (an upload): enqueue and ``await job.wait(...)``; 200 with the result, or 504
  if it is not done in ``wait`` seconds (the job goes on: poll its ``status_url``).
- ``POST /captions`` (JSON ``{"urls": [...]}``): one job per URL, answered as NDJSON, one line per job as
  each finishes (``client.as_completed_async``).

Bad input is 400 with ``{"error": {"code", "message"}}`` (413 for an image over the cap); a broker that does
not answer is 503. Add your own authentication.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from kombu.exceptions import OperationalError
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile as FormFile

from producer import (
    ClientSettings,
    ImageTooLarge,
    InvalidRequest,
    Job,
    LlavaClient,
    LlavaError,
    ResultTimeout,
)


class UrlJob(BaseModel):
    """A job on an image URL (JSON body)."""

    kind: str
    url: str
    prompt: str | None = None
    question: str | None = None
    labels: list[str] | None = None
    max_new_tokens: int | None = None


class UrlList(BaseModel):
    urls: list[str] = Field(min_length=1, max_length=256)
    prompt: str | None = None
    timeout: float = Field(default=120, gt=0, le=600)


def create_app(settings: ClientSettings | None = None) -> FastAPI:
    """The service, with one LlavaClient for its whole life (``settings``: default from LLAVA_*)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.llava = LlavaClient(settings)
        yield
        app.state.llava.close()

    app = FastAPI(title="llava-queue FastAPI example", lifespan=lifespan)
    app.add_exception_handler(LlavaError, _llava_error)  # type: ignore[arg-type]
    app.add_exception_handler(OperationalError, _unavailable)  # type: ignore[arg-type]
    app.include_router(_routes())
    return app


def _routes() -> Any:
    from fastapi import APIRouter

    router = APIRouter()

    @router.post("/jobs", status_code=202)
    async def enqueue(request: Request) -> JSONResponse:
        client: LlavaClient = request.app.state.llava
        kind, image, params = await _job_fields(request, client.settings.max_image_bytes)
        job = client.submit(kind, image, **params)
        location = str(request.url_for("status", job_id=job.id))
        body = {"job_id": job.id, "task": job.task_name, "status_url": location}
        return JSONResponse(body, status_code=202, headers={"Location": location})

    @router.get("/jobs/{job_id}", name="status")
    async def status(job_id: str, request: Request) -> dict[str, Any]:
        job = request.app.state.llava.job(job_id)
        if not job.ready():
            return {"job_id": job_id, "state": "PENDING"}
        return _outcome(job)

    @router.post("/caption")
    async def caption_and_wait(
        request: Request, image: Annotated[UploadFile, File()], prompt: Annotated[str | None, Form()] = None,
        wait: float = 30,
    ) -> JSONResponse:  # fmt: skip
        client: LlavaClient = request.app.state.llava
        job = client.caption(await _read(image, client.settings.max_image_bytes), prompt=prompt)
        try:
            result = await job.wait(timeout=min(max(wait, 0.1), 120))
        except ResultTimeout:
            location = str(request.url_for("status", job_id=job.id))
            return JSONResponse({"job_id": job.id, "status_url": location}, status_code=504)
        return JSONResponse({"job_id": job.id, "result": result.model_dump(mode="json")})

    @router.post("/captions")
    async def captions(body: UrlList, request: Request) -> StreamingResponse:
        client: LlavaClient = request.app.state.llava
        for url in body.urls:
            _check_url(url)
        jobs = client.map("caption", body.urls, **({"prompt": body.prompt} if body.prompt else {}))
        urls = {job.id: url for job, url in zip(jobs, body.urls, strict=True)}

        async def lines() -> AsyncIterator[str]:
            try:
                async for job in client.as_completed_async(jobs, timeout=body.timeout):
                    yield json.dumps({"url": urls[job.id], **_outcome(job)}) + "\n"
            except ResultTimeout as exc:
                yield json.dumps({"error": exc.to_dict()}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return router


def _outcome(job: Job[Any]) -> dict[str, Any]:
    """A finished job as JSON: its result or its coded error."""
    try:
        result = job.get(timeout=0)  # finished: no wait
    except LlavaError as exc:
        return {"job_id": job.id, "state": "FAILURE", "error": exc.to_dict()}
    return {"job_id": job.id, "state": "SUCCESS", "result": result.model_dump(mode="json")}


async def _job_fields(request: Request, max_bytes: int) -> tuple[str, bytes | str, dict[str, Any]]:
    """(kind, image, params) from a multipart upload or a JSON body with a URL."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("image")
        if not isinstance(upload, FormFile):  # what request.form() gives for a file
            raise InvalidRequest("a multipart request needs an 'image' file")
        labels = [part.strip() for part in str(form.get("labels") or "").split(",") if part.strip()]
        fields = {k: form.get(k) for k in ("prompt", "question", "max_new_tokens") if form.get(k)}
        params = _params({**fields, "labels": labels or None})
        return str(form.get("kind") or ""), await _read(upload, max_bytes), params
    try:
        body = UrlJob.model_validate(await request.json())
    except ValueError as exc:
        raise InvalidRequest(f"the body must be a JSON job with kind and url: {exc}") from None
    _check_url(body.url)
    return body.kind, body.url, _params(body.model_dump(exclude={"kind", "url"}))


def _params(fields: dict[str, Any]) -> dict[str, Any]:
    params = {key: value for key, value in fields.items() if value not in (None, "", [])}
    if "max_new_tokens" in params:
        try:
            params["max_new_tokens"] = int(params["max_new_tokens"])
        except ValueError:
            raise InvalidRequest("max_new_tokens must be an integer") from None
    return params


def _check_url(url: str) -> None:
    if not url.lower().startswith(("http://", "https://")):
        raise InvalidRequest("url must be an http(s) URL")  # never a path on this server


async def _read(upload: FormFile, max_bytes: int) -> bytes:
    """The upload's bytes, refused past ``max_bytes`` without reading more."""
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"the upload is over the {max_bytes}-byte cap")
    return data


async def _llava_error(_: Request, exc: LlavaError) -> JSONResponse:
    return JSONResponse({"error": exc.to_dict()}, status_code=413 if isinstance(exc, ImageTooLarge) else 400)


async def _unavailable(_: Request, exc: OperationalError) -> JSONResponse:
    return JSONResponse({"error": {"code": "unavailable", "message": str(exc)}}, status_code=503)


app = create_app()
