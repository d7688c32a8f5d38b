"""``llava-queue``: submit jobs from the command line and see the cluster's status.

    llava-queue caption [IMAGE|DIR]... [--from-file F] [--prompt P]
    llava-queue vqa [IMAGE|DIR]... [--from-file F] --question Q
    llava-queue classify [IMAGE|DIR]... [--from-file F] [--labels a,b,c] [--prompt P]
        [--multi-label [--threshold T|a=T,b=T] [--question "Is there {label}?"]]
    llava-queue status

Common options: --config FILE, --json, --out F.jsonl, --timeout S, --queue Q, --in-flight N, --no-progress.
A directory is walked for image files; ``--out`` resumes (see :mod:`producer.bulk`). Exit status: 0 when
every image has a result, 1 when any failed, 2 on bad usage, 3 when Redis does not answer (within
``broker_timeout``), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from pydantic import ValidationError
from rich.console import Console

from producer import __version__
from producer.app import settings_problem
from producer.broker import broker_guard
from producer.bulk import (
    BulkRun,
    Record,
    RecordSink,
    discover,
    image_input,
    is_settled,
    jsonl_writer,
    load_outcomes,
    open_output,
    read_image_list,
    record_for,
    resume_job_id,
)
from producer.client import KINDS, LlavaClient, check_params
from producer.contract import DEFAULT_PRIORITY, DEFAULT_THRESHOLD, MAX_PRIORITY
from producer.errors import BrokerUnavailable, InvalidRequest
from producer.flower import flower_command, flower_url
from producer.job import Job
from producer.report import Summary, make_progress, summary_table
from producer.settings import ClientSettings, load_settings
from producer.status import cluster_status

DEFAULT_IN_FLIGHT = 32
EXIT_USAGE = 2
EXIT_BROKER_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-queue", description="Submit LLaVA-NeXT jobs; show status.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", help="YAML settings file (default: $LLAVA_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("caption", "describe images"),
        ("vqa", "ask a question"),
        ("classify", "classify"),
    ):
        _job_arguments(commands.add_parser(name, help=help_text), name)
    status = commands.add_parser("status", help="workers online, what each serves, queue depths")
    status.add_argument("--json", action="store_true")
    flower = commands.add_parser(
        "flower", help="run Flower on the broker (needs the monitor extra; no torch)"
    )
    defaults = ClientSettings.model_fields
    address = f"address to bind (default {defaults['flower_address'].default}; others need basic auth)"
    flower.add_argument("--address", help=address)
    flower.add_argument("--port", type=int, help=f"port (default {defaults['flower_port'].default})")
    return parser


def _job_arguments(sub: argparse.ArgumentParser, name: str) -> None:
    sub.add_argument(
        "images", nargs="*", metavar="IMAGE", help="URL, data: URI, local file, or a directory (walked)"
    )
    sub.add_argument("--from-file", metavar="F", help="read URLs/paths from F, one per line (# comments)")
    if "prompt" in KINDS[name][2]:
        sub.add_argument("--prompt", help="the instruction (default: the kind's own)")
    if name == "vqa":
        sub.add_argument("--question", required=True, help="the question to answer")
    if name == "classify":
        sub.add_argument("--labels", help="comma-separated labels to pick from (default: free-text class)")
        multi = "score each label on its own (yes/no); the result's labels are those at or above threshold"
        sub.add_argument("--multi-label", action="store_true", default=None, help=multi)
        threshold = f"--multi-label: a label is given at or above it: {DEFAULT_THRESHOLD} (default), or per "
        threshold += "label: a=0.3,b=0.8"
        sub.add_argument("--threshold", type=_threshold, help=threshold)
        question = "--multi-label: the per-label question, with {label}"
        sub.add_argument("--question", help=question)
    sub.add_argument("--max-new-tokens", type=int)
    sub.add_argument("--model", help="send to the workers serving this model (queue llava.<model>)")
    sub.add_argument("--queue", help="queue to send to (default: settings.default_queue)")
    priority = f"0 (lowest) to {MAX_PRIORITY} (most urgent); default {DEFAULT_PRIORITY}"
    sub.add_argument("--priority", type=int, help=priority)
    sub.add_argument("--timeout", type=float, help="seconds to wait for each result, from its sending")
    in_flight = f"jobs queued or running at once (default {DEFAULT_IN_FLIGHT})"
    sub.add_argument("--in-flight", type=int, default=DEFAULT_IN_FLIGHT, help=in_flight)
    sub.add_argument("--json", action="store_true", help="print one JSON object per line")
    sub.add_argument(
        "--out", help="append one JSON line per image to this file instead of printing; resumes from it"
    )
    sub.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only on a terminal)")


def _threshold(text: str) -> float | dict[str, float]:
    """``0.7``, or per label ``nudity=0.3,violence=0.6``."""
    try:
        if "=" not in text:
            return float(text)
        pairs = (item.rsplit("=", 1) for item in text.split(","))
        return {label.strip(): float(value) for label, value in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or label=number list: {text!r}") from None


def _submitter(client: LlavaClient, args: argparse.Namespace) -> Callable[[str], Job[Any]]:
    """``image -> Job`` with the command's fields (each kind's parser has only its own) and options."""
    labels = getattr(args, "labels", None)
    given = {
        "prompt": getattr(args, "prompt", None),
        "question": getattr(args, "question", None),
        "labels": [label.strip() for label in labels.split(",")] if labels else None,
        "multi_label": getattr(args, "multi_label", None),
        "threshold": getattr(args, "threshold", None),
    }
    params = {key: given[key] for key in KINDS[args.command][2]}
    options = {
        "queue": args.queue,
        "model": args.model,
        "priority": args.priority,
        "max_new_tokens": args.max_new_tokens,
    }
    check_params(args.command, **params, **options)  # bad options are a usage error, not one per image

    def submit(image: str) -> Job[Any]:
        job_id = resume_job_id(args.out, image, args.command, {**params, **options}) if args.out else None
        return client.submit(args.command, image_input(image), **params, **options, job_id=job_id)

    return submit


def _print_human(record: dict[str, Any], stream: TextIO) -> None:
    if "error" in record:
        print(
            f"{record['image']}: ERROR {record['error']['code']}: {record['error']['message']}", file=stream
        )
    elif "scores" in record["result"] and record["result"]["scores"]:
        scores = ", ".join(f"{k}={v:.3f}" for k, v in record["result"]["scores"].items())
        given = record["result"].get("labels")  # multi-label: those at or above their threshold
        shown = record["result"]["label"] if given is None else ", ".join(given) or "(none)"
        print(f"{record['image']}: {shown} ({scores})", file=stream)
    else:
        answer = record["result"].get("text", record["result"].get("label"))
        print(f"{record['image']}: {answer!r}", file=stream)


@contextlib.contextmanager
def _emitter(args: argparse.Namespace) -> Iterator[Callable[[Record], None]]:
    """Where records go: the ``--out`` file (JSON lines, flushed), else stdout (JSON or human lines)."""
    if args.out:
        with open_output(args.out) as output:
            yield jsonl_writer(output)
    elif args.json:
        yield jsonl_writer(sys.stdout)
    else:
        yield lambda record: _print_human(record, sys.stdout)


def _images(args: argparse.Namespace) -> tuple[list[str], bool]:
    """The images to tag, and whether they come in input order (explicit IMAGE arguments only)."""
    if args.in_flight < 1:
        raise InvalidRequest(f"--in-flight must be at least 1, not {args.in_flight}")
    if args.timeout is not None and not args.timeout > 0:
        raise InvalidRequest(f"--timeout must be above 0 seconds, not {args.timeout}")
    if not args.images and not args.from_file:
        raise InvalidRequest("give IMAGE arguments, a directory, or --from-file F")
    listed = read_image_list(args.from_file) if args.from_file else []
    images, walked = discover([*args.images, *listed])
    return images, not (walked or args.from_file)


def run_jobs(client: LlavaClient, args: argparse.Namespace, console: Console) -> int:
    """Tag every image (skipping those settled in ``--out``); returns the exit status (0 or 1)."""
    submit = _submitter(client, args)
    images, ordered = _images(args)
    previous = load_outcomes(args.out) if args.out else {}
    summary = Summary()
    todo = []
    for image in images:
        if image in previous and is_settled(previous[image]):
            summary.skip(previous[image])
        else:
            todo.append(image)
    timeout = client.settings.result_timeout if args.timeout is None else args.timeout
    with _emitter(args) as emit, make_progress(console, not args.no_progress) as progress:
        bar = progress.add_task(args.command, total=len(todo))
        sink = RecordSink(emit, ordered)

        def done(index: int, image: str, job: Job[Any] | None, outcome: Any) -> None:
            record = record_for(image, job, outcome)
            summary.count(record)
            sink.put(index, record)
            progress.advance(bar)

        BulkRun(submit, done, args.in_flight, timeout).run(todo)
    if len(images) > 1:  # one image: its line says it all
        console.print(summary_table(summary, f"llava-queue {args.command}: {len(images)} image(s)"))
    return summary.exit_code()


def _print_status(status: dict[str, Any]) -> None:
    workers = status["workers"]
    print(f"workers online: {len(workers)}")
    for name, info in sorted(workers.items()):
        queues = ",".join(info.get("queues", []))
        print(
            f"  {name}: model={info.get('model')} device={info.get('device')} queues={queues} "
            f"done={info.get('jobs_done')} failed={info.get('jobs_failed')} "
            f"visibility_timeout={info.get('visibility_timeout')}"
        )
    for warning in status.get("warnings", []):
        print(f"WARNING: {warning}")
    print("queues:")
    for queue, depth in sorted(status["queues"].items()):
        served = "" if queue in status["served_queues"] else "  (no worker consumes this queue)"
        print(f"  {queue}: {depth} waiting{served}")


def _run_flower(settings: ClientSettings) -> int:
    """Replace this process with Flower (see :mod:`producer.flower`); 2 if the address needs auth."""
    try:
        command, env = flower_command(settings, os.environ)
    except InvalidRequest as exc:
        print(f"llava-queue: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    auth = "on" if settings.flower_basic_auth else "off (loopback only)"
    print(f"llava-queue: Flower on {flower_url(settings)} (basic auth {auth})", file=sys.stderr, flush=True)
    os.execvpe(command[0], command, env)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    flower_flags = {
        "flower_address": getattr(args, "address", None),
        "flower_port": getattr(args, "port", None),
    }
    try:
        settings = load_settings(ClientSettings, config_file=args.config, **flower_flags)
    except (ValidationError, FileNotFoundError) as exc:
        print(f"llava-queue: invalid settings: {settings_problem(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "flower":
        return _run_flower(settings)
    client = LlavaClient(settings)
    try:
        if args.command == "status":
            with broker_guard("reading the cluster status"):
                status = cluster_status(client.app, [settings.default_queue])
            print(json.dumps(status, indent=2)) if args.json else _print_status(status)
            return 0
        return run_jobs(client, args, Console(stderr=True))
    except InvalidRequest as exc:
        print(f"llava-queue: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except BrokerUnavailable as exc:
        print(f"llava-queue: broker unavailable: {exc.message}", file=sys.stderr)
        return EXIT_BROKER_UNAVAILABLE
    except KeyboardInterrupt:
        print("llava-queue: interrupted; rerun with the same --out to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        client.close()


if __name__ == "__main__":
    raise SystemExit(main())
