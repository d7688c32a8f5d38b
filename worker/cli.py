"""``llava-worker``: load LLaVA-NeXT once, then serve jobs from Redis with a Celery threads pool."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, get_args

from pydantic import ValidationError

from producer.app import settings_problem
from worker.redis_policy import refuse_evicting_redis
from worker.settings import WorkerSettings, load_settings

if TYPE_CHECKING:
    from celery import Celery

    from worker.service import Service

log = logging.getLogger("llava.worker")


def package_version() -> str:
    """The installed llava-queue version (``unknown`` when running from a bare checkout)."""
    try:
        return version("llava-queue")
    except PackageNotFoundError:
        return "unknown"


def _choices(setting: str) -> tuple[str, ...]:
    """The values a ``Literal`` setting takes, as its flag's choices."""
    return get_args(WorkerSettings.model_fields[setting].annotation)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llava-worker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--config", help="YAML settings file (default: $LLAVA_CONFIG)")
    parser.add_argument("--model", help="hub id, local checkpoint dir, or tiny:<template>")
    parser.add_argument("--device", choices=_choices("device"))
    parser.add_argument(
        "--gpus", help="none (one process, default), all, or indices like 0,2: one worker per GPU"
    )
    parser.add_argument("--queues", help="comma-separated queues to consume")
    batch = "static scheduler: jobs per model call (1: batching off); sizes the task threads"
    parser.add_argument("--max-batch-size", type=int, help=batch)
    threads = "task threads (default: 2 x max batch size + fetch threads)"
    parser.add_argument("--concurrency", type=int, help=threads)
    parser.add_argument("--hostname", help="Celery node name, e.g. gpu0@%%h")
    parser.add_argument("--loglevel", choices=_choices("loglevel"))
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace) -> WorkerSettings:
    keys = ("model", "device", "queues", "concurrency", "hostname", "max_batch_size", "gpus")
    overrides = {key: getattr(args, key) for key in keys}
    return load_settings(WorkerSettings, config_file=args.config, loglevel=args.loglevel, **overrides)


def celery_argv(settings: WorkerSettings) -> list[str]:
    """The ``celery worker`` arguments this worker runs with (the threads pool: heartbeats keep flowing
    while the model thread computes)."""
    return [
        "worker",
        "--pool=threads",
        f"--concurrency={settings.threads}",
        f"--queues={','.join(settings.consumed_queues)}",
        f"--hostname={settings.hostname}",
        f"--loglevel={settings.loglevel}",
        "--without-mingle",
        "--without-gossip",
    ]


def _once_per_failure(record: logging.LogRecord) -> bool:
    """worker.service logs each coded failure once (job id + code); drop Celery's second line for it."""
    args = record.args
    return not (isinstance(args, dict) and args.get("description") == "raised expected")


def _launch_per_gpu(settings: WorkerSettings, argv: list[str]) -> int:
    """The parent of one worker per GPU: it never imports torch (see worker.launcher)."""
    from worker.launcher import LaunchError, launch, select_gpus

    try:
        gpus = select_gpus(settings.gpus)
    except LaunchError as exc:
        print(f"llava-worker: {exc}", file=sys.stderr)
        return 1
    return launch(gpus, _without(argv, "--gpus", "--hostname"), settings.metrics_port)


def _without(argv: list[str], *options: str) -> list[str]:
    """``argv`` minus ``--option value`` / ``--option=value`` pairs for ``options``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{option}=" for option in options)):
            kept.append(arg)
    return kept


def _check_peers(app: Any, settings: WorkerSettings) -> None:
    """Refuse to start beside live workers with another visibility timeout; warn, naming each setting, when
    workers of our queues would give a job another outcome (a rolling change of a cap passes through that
    state, so it is not refused; ``llava-queue status`` shows it as long as it lasts)."""
    from worker.delivery import conflicting_peers, disagreeing_peers, live_peers
    from worker.runtime import StartupError

    peers = live_peers(app, settings)
    if not peers:
        return
    conflicting = conflicting_peers(peers, settings)
    if conflicting:
        shown = ", ".join(f"{node}: {value}" for node, value in sorted(conflicting.items()))
        raise StartupError(
            f"live workers on this broker use another visibility timeout ({shown}; this worker: "
            f"{settings.visibility_timeout}): Redis would hand their running jobs to this worker or ours to "
            "them; give every worker of a broker the same LLAVA_VISIBILITY_TIMEOUT"
        )
    for line in disagreeing_peers(peers, settings):
        log.warning("workers of one queue disagree, a job's outcome depends on which takes it: %s", line)


def _without_result(record: logging.LogRecord) -> bool:
    """Celery logs each success with the task's return value (``LOG_SUCCESS``: the caption of a user's image):
    the line stays, the value goes, from the message and from ``data`` (Celery's ``extra``, which structured
    log handlers emit)."""
    if isinstance(record.args, dict) and "return_value" in record.args:
        kept = {key: value for key, value in record.args.items() if key != "return_value"}
        record.msg, record.args = _SUCCESS_LINE, kept
        if hasattr(record, "data"):
            record.data = kept
    return True


_SUCCESS_LINE = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"


def configure_logging(settings: WorkerSettings) -> None:
    """Log format and level; each failed job is logged once (by worker.service); no job's result is logged."""
    logging.basicConfig(level=settings.loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trace_log = logging.getLogger("celery.app.trace")
    for log_filter in (_once_per_failure, _without_result):
        trace_log.addFilter(log_filter)


def start_service(settings: WorkerSettings, service: Service, app: Celery) -> bool:
    """Load the model and start serving (and the metrics endpoint, if asked for) for ``app``. A start-up
    error is printed once, with what to do, and gives False."""
    from worker.runtime import StartupError

    try:
        _check_peers(app, settings)
        refuse_evicting_redis(app)
        service.start()
        if settings.metrics_port is not None:
            from worker.metrics import serve_metrics

            serve_metrics(settings.metrics_port, service, settings.metrics_address)
    except (StartupError, OSError, ValueError) as exc:
        print(f"llava-worker: cannot start: {exc}", file=sys.stderr)
        return False
    return True


def serve(app: Celery, settings: WorkerSettings) -> int:
    """Run Celery's worker for ``app`` until it stops; its exit status, read off the worker itself: neither
    ``worker_main`` nor ``app.start`` returns it (Celery's command exits through click, which ``app.start``
    swallows), and a consumer that cannot go on ("Unrecoverable error") must exit non-zero for a supervisor
    to restart it."""
    from celery.signals import worker_init

    workers: list[Any] = []

    def remember(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            workers.append(sender)

    worker_init.connect(remember, weak=False)
    try:
        status = app.start(celery_argv(settings))
    finally:
        worker_init.disconnect(remember)
    if workers:
        status = workers[-1].exitcode
    return status if isinstance(status, int) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = build_settings(args)
    except (ValidationError, FileNotFoundError) as exc:
        print(f"llava-worker: invalid settings: {settings_problem(exc)}", file=sys.stderr)
        return 2
    if settings.gpus != "none":
        return _launch_per_gpu(settings, argv if argv is not None else sys.argv[1:])
    configure_logging(settings)
    from worker.app import create_app
    from worker.service import Service

    service = Service(settings)
    app = create_app(settings, service)
    if not start_service(settings, service, app):
        return 1
    try:
        return serve(app, settings)
    finally:
        service.stop()


if __name__ == "__main__":
    raise SystemExit(main())
