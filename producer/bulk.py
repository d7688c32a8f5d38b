"""Bulk tagging: many images through a bounded window of jobs, one JSON line per image, resumable.

- **Inputs**: URLs and ``data:`` URIs as given, files as given, directories walked recursively for image
  files (:data:`IMAGE_EXTENSIONS`, any case), or a list file (one URL or path per line; blank lines and
  ``#`` comments skipped). Each image is taken once.
- **Window**: at most ``in_flight`` jobs are queued or running at once; a finished job makes room for the
  next. Each job's result is awaited ``timeout`` seconds from its sending, then recorded as
  ``result_timeout``.
- **Records**: ``{"image", "job_id", "result"}`` or ``{"image", "job_id"?, "error": {"code", "message"}}``,
  written as the jobs finish (or in input order, see :class:`RecordSink`), each line flushed.
- **Resume**: images whose last record in the output has a result, or a permanent error, are skipped; those
  whose last record has a transient error (:data:`~producer.errors.RETRYABLE_CODES`) are sent again. With an
  output file each job's id comes from :func:`resume_job_id`, so a rerun collects the results of jobs that
  finished while it was down (stopped, crashed, or given up waiting) instead of computing them again. A line
  cut short by a crash is ignored (and the file gets a newline before anything is appended), so the last line
  for an image wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from producer.broker import broker_guard
from producer.collector import ResultCollector
from producer.contract import image_kind
from producer.errors import RETRYABLE_CODES, BrokerUnavailable, InvalidRequest, LlavaError, ResultTimeout
from producer.job import Job

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})

Record = dict[str, Any]


def _is_reference(target: str) -> bool:
    """A URL or ``data:`` URI (sent as is), not a local path."""
    return image_kind(target) in ("url", "data") or "://" in target[:16]


def image_input(target: str) -> str | Path:
    """What the client gets for an IMAGE argument: a URL or ``data:`` URI as given, anything else as a local
    file (:class:`~pathlib.Path`; the client never reads a ``str`` as a path)."""
    return target if _is_reference(target) else Path(target)


def resume_job_id(output: str, image: str, kind: str, params: dict[str, Any]) -> str:
    """The job id of ``image`` in a run writing to ``output``: the same output file, image, kind and
    parameters give the same id, so a rerun finds the results of jobs that finished while it was down
    (``LlavaClient`` returns a stored success instead of sending again). A file is known by its resolved
    path, size and modification time (an edited file is tagged again); a URL or ``data:`` URI by itself.
    ``priority`` does not change the result, so it is not part of the id."""
    identity: list[Any] = [image]
    if not _is_reference(image):
        path = Path(image).resolve()
        try:
            stat = path.stat()
            identity = [str(path), stat.st_size, stat.st_mtime_ns]
        except OSError:  # unreadable: the send is refused anyway
            identity = [str(path)]
    chosen = {key: value for key, value in params.items() if key != "priority" and value is not None}
    key = [str(Path(output).resolve()), identity, kind, chosen]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return f"bulk-{digest[:32]}"


def walk_images(directory: str) -> Iterator[str]:
    """Image files under ``directory``, recursively, in a stable (sorted) order; symlinked folders are not
    followed (no loops)."""
    for root, folders, files in os.walk(directory):
        folders.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield os.path.join(root, name)


def read_image_list(path: str) -> list[str]:
    """The URLs or paths in a list file: one per line, surrounding blanks stripped, empty lines and
    ``#`` comments skipped. An unreadable file is an :class:`InvalidRequest`."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"cannot read the image list {path}: {exc}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def discover(targets: Iterable[str]) -> tuple[list[str], bool]:
    """Expand IMAGE arguments: directories become their image files, everything else stays as given.

    Returns the images (each once, first occurrence kept) and whether any directory was walked.
    """
    images: dict[str, None] = {}
    walked = False
    for target in targets:
        if not _is_reference(target) and os.path.isdir(target):
            walked = True
            images.update(dict.fromkeys(walk_images(target)))
        else:
            images.setdefault(target, None)
    return list(images), walked


def load_outcomes(path: str | Path) -> dict[str, str | None]:
    """From a previous output: image -> ``None`` (it has a result) or its error code. The last line for an
    image wins; lines that are not records (a line cut short by a crash) are ignored. No file: empty."""
    outcomes: dict[str, str | None] = {}
    try:
        handle = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except FileNotFoundError:
        return outcomes
    except OSError as exc:
        raise InvalidRequest(f"cannot read the output file {path}: {exc.strerror or exc}") from None
    with handle:
        for line in handle:
            record = _parse_line(line)
            if record is not None:
                outcomes[record["image"]] = None if "result" in record else str(record["error"].get("code"))
    return outcomes


def _parse_line(line: str) -> Record | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("image"), str):
        return None
    if "result" in record or isinstance(record.get("error"), dict):
        return record
    return None


def is_settled(outcome: str | None) -> bool:
    """Whether an image with this previous outcome (``None``: a result; else an error code) is skipped."""
    return outcome is None or outcome not in RETRYABLE_CODES


def record_for(image: str, job: Job[Any] | None, outcome: Any) -> Record:
    """The output line of one image: its result (a pydantic model) or its :class:`LlavaError`."""
    record: Record = {"image": image}
    if job is not None:
        record["job_id"] = job.id
    if isinstance(outcome, LlavaError):
        record["error"] = outcome.to_dict()
    else:
        record["result"] = outcome.model_dump(mode="json")
    return record


class RecordSink:
    """Writes records to an open text stream as JSON lines (each flushed) or via ``show``.

    ``ordered``: records leave in input order (a record waits for those before it); otherwise as they come.
    """

    def __init__(self, emit: Callable[[Record], None], ordered: bool = False) -> None:
        self._emit = emit
        self._ordered = ordered
        self._waiting: dict[int, Record] = {}
        self._next = 0

    def put(self, index: int, record: Record) -> None:
        """Hand over the record of the ``index``-th image submitted in this run."""
        if not self._ordered:
            self._emit(record)
            return
        self._waiting[index] = record
        while self._next in self._waiting:
            self._emit(self._waiting.pop(self._next))
            self._next += 1


def jsonl_writer(stream: IO[str]) -> Callable[[Record], None]:
    """A record emitter that appends one JSON line to ``stream`` and flushes it."""

    def write(record: Record) -> None:
        stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        stream.flush()

    return write


def open_output(path: str) -> IO[str]:
    """Open ``path`` for appending records; a last line cut short by a crash is closed with a newline first,
    so it stays one (ignored) broken line. A path that cannot be written is an :class:`InvalidRequest`."""
    try:
        output = open(path, "a+", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise InvalidRequest(f"cannot write the output file {path}: {exc.strerror or exc}") from None
    if output.tell() > 0:
        output.seek(output.tell() - 1)
        if output.read(1) != "\n":
            output.write("\n")
    return output


class BulkRun:
    """Sends images through ``submit`` keeping at most ``in_flight`` jobs out, and hands each outcome to
    ``done(index, image, job, result_or_error)`` as the jobs finish; ``collector`` (default: a new
    :class:`ResultCollector`) tells which job finished next and is closed when the run ends."""

    def __init__(
        self,
        submit: Callable[[str], Job[Any]],
        done: Callable[[int, str, Job[Any] | None, Any], None],
        in_flight: int,
        timeout: float,
        collector: ResultCollector | None = None,
    ) -> None:
        if in_flight < 1:
            raise InvalidRequest(f"in_flight must be at least 1, not {in_flight}")
        self._submit, self._done = submit, done
        self._in_flight, self._timeout = in_flight, timeout
        self._collector = collector if collector is not None else ResultCollector()
        self._flying: dict[Job[Any], tuple[int, str, float]] = {}  # in sending order: oldest first

    def run(self, images: Iterable[str]) -> None:
        """Send every image and wait for every job (each at most ``timeout`` s after its sending).

        An unreachable Redis stops the run with :class:`BrokerUnavailable` (records written so far stay)."""
        todo = enumerate(images)
        with broker_guard("bulk run"):
            try:
                while self._fill(todo) or self._flying:
                    self._collect()
            finally:
                self._collector.close()

    def _fill(self, todo: Iterator[tuple[int, str]]) -> bool:
        """Send until the window is full; False once every image was sent."""
        while len(self._flying) < self._in_flight:
            item = next(todo, None)
            if item is None:
                return False
            index, image = item
            try:
                job = self._submit(image)
            except BrokerUnavailable:
                raise
            except LlavaError as exc:  # refused before sending: unreadable file, too large, bad params
                self._done(index, image, None, exc)
                continue
            self._flying[job] = (index, image, time.monotonic() + self._timeout)
            self._collector.add(job)
        return True

    def _collect(self) -> None:
        if not self._flying:
            return
        oldest_deadline = next(iter(self._flying.values()))[2]
        job = self._collector.next_done(max(0.0, oldest_deadline - time.monotonic()))
        if job is None:
            self._expire()
            return
        index, image, _ = self._flying.pop(job)
        try:
            outcome: Any = job.get(0)
        except BrokerUnavailable:
            raise
        except LlavaError as exc:
            outcome = exc
        self._done(index, image, job, outcome)

    def _expire(self) -> None:
        now = time.monotonic()
        for job, (index, image, deadline) in list(self._flying.items()):
            if deadline > now:
                break
            self._collector.discard(job)
            del self._flying[job]
            error = ResultTimeout(f"no result within {self._timeout:g} s (the job may still finish)")
            self._done(index, image, job, error)
