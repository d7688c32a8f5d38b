"""What a bulk run shows a person: a progress bar (rate, ETA) while it runs, a summary table at the end.

Both go to stderr through rich, so stdout stays for the records. The bar is drawn only on a terminal.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from producer.bulk import Record
from producer.errors import RETRYABLE_CODES

OK = "succeeded"


class RateColumn(ProgressColumn):
    """Images per second, from rich's moving estimate."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- images/s" if speed is None else f"{speed:.1f} images/s", style="progress.data.speed")


def make_progress(console: Console, enabled: bool) -> Progress:
    """A progress bar: what runs, bar, done/total, percent, rate, elapsed, ETA (``disable``d if not
    ``enabled`` or ``console`` is not a terminal)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
        transient=False,
    )


@dataclass
class Summary:
    """Counts of a run: this run's outcomes (``succeeded`` or an error code) and the images skipped because
    an earlier run settled them (with a result, or a permanent error: its code). ``ran``: the jobs a worker
    finished (refused before sending and given-up waits are not), the base of the rate."""

    outcomes: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    ran: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def count(self, record: Record) -> None:
        """Count one record of this run."""
        outcome = OK if "result" in record else str(record["error"]["code"])
        self.outcomes[outcome] += 1
        if "job_id" in record and outcome != "result_timeout":
            self.ran += 1

    def skip(self, previous: str | None) -> None:
        """Count an image skipped because an earlier run settled it (``None``: with a result)."""
        self.skipped[OK if previous is None else previous] += 1

    @property
    def done(self) -> int:
        return sum(self.outcomes.values())

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def exit_code(self) -> int:
        """0 when every image has a result (now or from an earlier run), else 1."""
        failed = [code for code in (*self.outcomes, *self.skipped) if code != OK]
        return 1 if failed else 0

    def rows(self) -> list[tuple[str, str]]:
        """(what, how many) lines of the summary table."""
        rows = [(OK, str(self.outcomes[OK]))]
        for code, count in sorted(self.outcomes.items()):
            if code != OK:
                retry = " (retried next run)" if code in RETRYABLE_CODES else ""
                rows.append((f"failed: {code}{retry}", str(count)))
        for code, count in sorted(self.skipped.items()):
            what = "skipped: done earlier" if code == OK else f"skipped: failed earlier ({code})"
            rows.append((what, str(count)))
        rows += [("images this run", str(self.done)), ("elapsed", f"{self.elapsed:.1f} s")]
        if self.ran >= 2 and self.elapsed > 0:  # one job's rate is its latency; refusals take no time
            rows.append(("rate", f"{self.ran / self.elapsed:.1f} images/s"))
        return rows


def summary_table(summary: Summary, title: str) -> Table:
    """The end-of-run table."""
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("outcome")
    table.add_column("images", justify="right")
    for what, count in summary.rows():
        style: Any = "red" if what.startswith("failed") else None
        table.add_row(what, count, style=style)
    return table
