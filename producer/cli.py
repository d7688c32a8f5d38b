"""``llava-queue``: submit jobs from the command line and see the cluster's status.

    llava-queue caption IMAGE... [--prompt P]
    llava-queue vqa IMAGE... --question Q
    llava-queue classify IMAGE... [--labels a,b,c] [--prompt P]
    llava-queue status

Common options: --config FILE, --json, --out F.jsonl, --timeout S, --queue Q. Exit status: 0 when every
job succeeded, 1 when any failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from pydantic import ValidationError

from producer.client import Job, LlavaClient
from producer.errors import LlavaError
from producer.settings import ClientSettings, load_settings
from producer.status import cluster_status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-queue", description="Submit LLaVA-NeXT jobs; show status.")
    parser.add_argument("--config", help="YAML settings file (default: $LLAVA_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("caption", "describe images"),
        ("vqa", "ask a question"),
        ("classify", "classify"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("images", nargs="+", metavar="IMAGE", help="URL, data: URI or local file")
        sub.add_argument("--prompt", help="instruction (caption, classify)")
        sub.add_argument("--question", required=name == "vqa", help="the question (vqa)")
        sub.add_argument("--labels", help="comma-separated labels (classify)")
        sub.add_argument("--max-new-tokens", type=int)
        sub.add_argument("--model", help="send to the workers serving this model (queue llava.<model>)")
        sub.add_argument("--queue", help="queue to send to (default: settings.default_queue)")
        sub.add_argument("--priority", type=int, help="0 (lowest) to 9 (most urgent); default 4")
        sub.add_argument("--timeout", type=float, help="seconds to wait for each result")
        sub.add_argument("--json", action="store_true", help="print one JSON object per line")
        sub.add_argument("--out", help="append one JSON line per image to this file")
    status = commands.add_parser("status", help="workers online, what each serves, queue depths")
    status.add_argument("--json", action="store_true")
    commands.add_parser("flower", help="run Flower on the broker (needs the monitor extra; imports no torch)")
    return parser


def flower_argv(settings: ClientSettings) -> list[str]:
    """``celery --broker=... flower`` with the port and basic auth from settings."""
    argv = ["celery", f"--broker={settings.broker_url}", "flower", f"--port={settings.flower_port}"]
    if settings.flower_basic_auth:
        argv.append(f"--basic-auth={settings.flower_basic_auth}")
    return argv


def _submit(client: LlavaClient, args: argparse.Namespace, image: str) -> Job[Any]:
    options = {
        "queue": args.queue,
        "model": args.model,
        "priority": args.priority,
        "max_new_tokens": args.max_new_tokens,
    }
    if args.command == "caption":
        return client.caption(image, args.prompt, **options)
    if args.command == "vqa":
        return client.vqa(image, args.question, **options)
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
    return client.classify(image, labels, args.prompt, **options)


def _line(image: str, outcome: dict[str, Any]) -> dict[str, Any]:
    return {"image": image, **outcome}


def _print_human(record: dict[str, Any], stream: TextIO) -> None:
    if "error" in record:
        print(
            f"{record['image']}: ERROR {record['error']['code']}: {record['error']['message']}", file=stream
        )
    elif "scores" in record["result"] and record["result"]["scores"]:
        scores = ", ".join(f"{k}={v:.3f}" for k, v in record["result"]["scores"].items())
        print(f"{record['image']}: {record['result']['label']} ({scores})", file=stream)
    else:
        answer = record["result"].get("text", record["result"].get("label"))
        print(f"{record['image']}: {answer!r}", file=stream)


def run_jobs(client: LlavaClient, args: argparse.Namespace) -> int:
    """Submit every image, then collect in order; returns the number of failed jobs."""
    submitted: list[tuple[str, Job[Any] | LlavaError]] = []
    for image in args.images:
        try:
            submitted.append((image, _submit(client, args, image)))
        except LlavaError as exc:
            submitted.append((image, exc))
    failures = 0
    out = open(args.out, "a", encoding="utf-8") if args.out else None  # noqa: SIM115
    try:
        for image, job in submitted:
            try:
                if isinstance(job, LlavaError):
                    raise job
                record = _line(
                    image, {"job_id": job.id, "result": job.get(args.timeout).model_dump(mode="json")}
                )
            except LlavaError as exc:
                failures += 1
                record = _line(image, {"error": exc.to_dict()})
            if out is not None:
                out.write(json.dumps(record) + "\n")
            if args.json:
                print(json.dumps(record))
            else:
                _print_human(record, sys.stdout)
    finally:
        if out is not None:
            out.close()
    return failures


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
        return 1 if run_jobs(client, args) else 0
    finally:
        client.close()


if __name__ == "__main__":
    raise SystemExit(main())
