"""BulkRun's window and deadlines, and the run's summary and progress bar, without services: the jobs are
stand-ins handed out by a collector stand-in that finishes the oldest waiting job each time it is asked."""

from __future__ import annotations

import io
import time
from typing import Any

from rich.console import Console

from producer.bulk import BulkRun, record_for
from producer.contract import CaptionResult
from producer.errors import InvalidRequest, ResultTimeout
from producer.report import Summary, make_progress, summary_table

RESULT = CaptionResult.model_validate(
    {
        "kind": "caption",
        "text": "a sign",
        "model": "m",
        "worker": "w",
        "prompt_tokens": 5,
        "image_tokens": 4,
        "generated_tokens": 2,
        "timings": {"image_ms": 1, "inference_ms": 2, "total_ms": 3},
    }
)


class StandIn:
    """A sent job: its result once the collector handed it out; a ``stuck`` one never finishes."""

    def __init__(self, stuck: bool) -> None:
        self.stuck = stuck

    def get(self, timeout: float) -> CaptionResult:
        return RESULT


class Collector:
    """ResultCollector's part that BulkRun uses: each wait hands out the oldest job that is not stuck."""

    def __init__(self) -> None:
        self.waiting: list[StandIn] = []
        self.closed = False

    def add(self, job: StandIn) -> None:
        self.waiting.append(job)

    def next_done(self, timeout: float) -> StandIn | None:
        runnable = [job for job in self.waiting if not job.stuck]
        if not runnable:
            time.sleep(timeout)  # the wait of a collector with nothing finished
            return None
        self.waiting.remove(runnable[0])
        return runnable[0]

    def discard(self, job: StandIn) -> None:
        self.waiting.remove(job)

    def close(self) -> None:
        self.closed = True


def test_the_window_stays_bounded_refills_and_expires_late_jobs() -> None:
    collector = Collector()
    sent: list[str] = []
    outcomes: dict[str, Any] = {}
    most_out = 0

    def submit(image: str) -> Any:
        nonlocal most_out
        if image == "unreadable":
            raise InvalidRequest("cannot read image file unreadable")
        sent.append(image)
        most_out = max(most_out, len(sent) - sum(1 for k in outcomes if k != "unreadable"))
        return StandIn(stuck=image == "stuck")

    def done(index: int, image: str, job: Any, outcome: Any) -> None:
        assert image not in outcomes
        outcomes[image] = outcome

    images = ["a", "stuck", "unreadable", "b", "c", "d", "e"]
    BulkRun(submit, done, in_flight=2, timeout=0.2, collector=collector).run(images)  # type: ignore[arg-type]
    assert set(outcomes) == set(images)
    assert most_out <= 2
    assert isinstance(outcomes["stuck"], ResultTimeout)
    assert isinstance(outcomes["unreadable"], InvalidRequest)
    assert all(outcomes[i] is RESULT for i in "abcde")
    assert collector.waiting == [] and collector.closed  # nothing left registered; closed with the run


def test_summary_counts_outcomes_skips_and_exit_code() -> None:
    summary = Summary()
    assert summary.exit_code() == 0
    summary.skip(None)
    summary.count(record_for("a", None, ResultTimeout("late")))
    summary.count({"image": "b", "result": {}})
    assert summary.exit_code() == 1
    rows = dict(summary.rows())
    assert rows["succeeded"] == "1" and rows["failed: result_timeout (retried next run)"] == "1"
    assert rows["skipped: done earlier"] == "1" and rows["images this run"] == "2"
    earlier = Summary()
    earlier.skip("invalid_image")  # a permanent failure from an earlier run keeps the exit status at 1
    assert earlier.exit_code() == 1 and dict(earlier.rows())["skipped: failed earlier (invalid_image)"] == "1"
    assert "rate" not in rows  # no job ran: a refusal or a given-up wait has no rate
    summary.count({"image": "c", "job_id": "1", "result": {}})
    assert "rate" not in dict(summary.rows())  # one job: its rate would be its latency
    summary.count({"image": "d", "job_id": "2", "error": {"code": "invalid_image", "message": "x"}})
    assert dict(summary.rows())["rate"].endswith(" images/s")
    console = Console(file=io.StringIO(), width=100)
    console.print(summary_table(summary, "llava-queue caption"))
    assert "result_timeout" in console.file.getvalue()  # type: ignore[attr-defined]


def test_progress_bar_shows_rate_and_eta_on_a_terminal_only() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True, width=140)
    with make_progress(terminal, enabled=True) as progress:
        bar = progress.add_task("classify", total=10)
        for _ in range(4):
            progress.advance(bar)
    shown = terminal.file.getvalue()  # type: ignore[attr-defined]
    assert "4/10" in shown and "images/s" in shown and "ETA" in shown
    for console, enabled in ((Console(file=io.StringIO()), True), (terminal, False)):
        assert make_progress(console, enabled).disable
