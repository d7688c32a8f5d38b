"""``llava-queue``: submit jobs from the command line and see the cluster's status.

    llava-queue caption [IMAGE|DIR]... [--from-file F] [--prompt P]
    llava-queue vqa [IMAGE|DIR]... [--from-file F] --question Q
    llava-queue classify [IMAGE|DIR]... [--from-file F] [--labels a,b,c] [--prompt P]
        [--multi-label [--threshold T|a=T,b=T] [--question "Is there {label}?"]]
    llava-queue status

Common options: --config FILE, --json, --out F.jsonl, --timeout S, --queue Q, --in-flight N, --no-progress.
A directory is walked for image files; ``--out`` resumes (see :mod:`producer.bulk`). Exit status: 0 when
every image has a result, 1 when any failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from kombu.exceptions import OperationalError
from pydantic import ValidationError
from rich.console import Console

from producer.bulk import (
    BulkRun,
    Record,
    RecordSink,
    discover,
    is_settled,
    jsonl_writer,
    load_outcomes,
    open_output,
    read_image_list,
    record_for,
)
from producer.client import KINDS, Job, LlavaClient, check_params
from producer.errors import InvalidRequest
from producer.report import Summary, make_progress, summary_table
from producer.settings import ClientSettings, load_settings
from producer.status import cluster_status

DEFAULT_IN_FLIGHT = 32


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-queue", description="Submit LLaVA-NeXT jobs; show status.")
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
    commands.add_parser("flower", help="run Flower on the broker (needs the monitor extra; imports no torch)")
    return parser


def _job_arguments(sub: argparse.ArgumentParser, name: str) -> None:
    sub.add_argument(
        "images", nargs="*", metavar="IMAGE", help="URL, data: URI, local file, or a directory (walked)"
    )
    sub.add_argument("--from-file", metavar="F", help="read URLs/paths from F, one per line (# comments)")
    sub.add_argument("--prompt", help="instruction (caption, classify)")
    question = "the question (vqa); classify --multi-label: the per-label question, with {label}"
    sub.add_argument("--question", required=name == "vqa", help=question)
    sub.add_argument("--labels", help="comma-separated labels (classify)")
    multi = "classify: score each label on its own (yes/no); the result's labels are those over threshold"
    sub.add_argument("--multi-label", action="store_true", default=None, help=multi)
    threshold = "--multi-label: a label is given at or above it: 0.5 (default), or per label: a=0.3,b=0.8"
    sub.add_argument("--threshold", type=_threshold, help=threshold)
    sub.add_argument("--max-new-tokens", type=int)
    sub.add_argument("--model", help="send to the workers serving this model (queue llava.<model>)")
    sub.add_argument("--queue", help="queue to send to (default: settings.default_queue)")
    sub.add_argument("--priority", type=int, help="0 (lowest) to 9 (most urgent); default 4")
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


def flower_argv(settings: ClientSettings) -> list[str]:
    """``celery --broker=... flower`` with the port and basic auth from settings."""
    argv = ["celery", f"--broker={settings.broker_url}", "flower", f"--port={settings.flower_port}"]
    if settings.flower_basic_auth:
        argv.append(f"--basic-auth={settings.flower_basic_auth}")
    return argv


def _submitter(client: LlavaClient, args: argparse.Namespace) -> Callable[[str], Job[Any]]:
    """``image -> Job`` with the command's fields and options; options the kind does not take are refused."""
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
    given = {"prompt": args.prompt, "question": args.question, "labels": labels}
    given |= {"multi_label": args.multi_label, "threshold": args.threshold}
    takes = KINDS[args.command][2]
    wrong = sorted(
        f"--{key.replace('_', '-')}" for key, value in given.items() if value is not None and key not in takes
    )
    if wrong:
        raise InvalidRequest(f"{args.command} does not take {', '.join(wrong)}")
    params = {key: given[key] for key in takes}
    options = {
        "queue": args.queue,
        "model": args.model,
        "priority": args.priority,
        "max_new_tokens": args.max_new_tokens,
    }
    check_params(args.command, **params, **options)  # bad options are a usage error, not one per image
    return lambda image: client.submit(args.command, image, **params, **options)


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
    console.print(summary_table(summary, f"llava-queue {args.command}: {len(images)} image(s)"))
    return summary.exit_code()


def _print_status(status: dict[str, Any]) -> None:
    workers = status["workers"]
    print(f"workers online: {len(workers)}")
    for name, info in sorted(workers.items()):
        queues = ",".join(info.get("queues", []))
        print(
            f"  {name}: model={info.get('model')} device={info.get('device')} queues={queues} "
            f"done={info.get('jobs_done')} failed={info.get('jobs_failed')}"
        )
    print("queues:")
    for queue, depth in sorted(status["queues"].items()):
        served = "" if queue in status["served_queues"] else "  (no worker consumes this queue)"
        print(f"  {queue}: {depth} waiting{served}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(ClientSettings, config_file=args.config)
    except (ValidationError, FileNotFoundError) as exc:
        print(f"llava-queue: invalid settings: {exc}", file=sys.stderr)
        return 2
    if args.command == "flower":
        os.execvp(sys.executable, [sys.executable, "-m", "celery", *flower_argv(settings)[1:]])
    client = LlavaClient(settings)
    try:
        if args.command == "status":
            status = cluster_status(client.app, [settings.default_queue])
            print(json.dumps(status, indent=2)) if args.json else _print_status(status)
            return 0
        return run_jobs(client, args, Console(stderr=True))
    except InvalidRequest as exc:
        print(f"llava-queue: {exc.message}", file=sys.stderr)
        return 2
    except OperationalError as exc:
        print(f"llava-queue: the broker did not answer: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llava-queue: interrupted; rerun with the same --out to resume", file=sys.stderr)
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    raise SystemExit(main())
