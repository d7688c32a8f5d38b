"""Local image paths open regular files only: a FIFO, a device, a socket or a directory under an allowed
root is refused at once with ``invalid_image`` (opening a FIFO never waits for a writer), and the job's
deadline bounds the read. Each read runs in a thread joined with a bound: a read that blocks fails the test
instead of hanging it."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from producer.errors import InvalidImage, JobTimeout
from worker.images import ImageLoader, read_image_bytes
from worker.settings import WorkerSettings


def settings_for(root: Path) -> WorkerSettings:
    return WorkerSettings(local_image_roots=[root], max_image_bytes=1024 * 1024, max_image_pixels=10**9)


def outcome_within(read: Callable[[], object], seconds: float = 10.0) -> object:
    """What ``read`` returned or raised, failing the test if it is still blocked after ``seconds``."""
    box: list[object] = []

    def run() -> None:
        try:
            box.append(read())
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the read was still blocked after {seconds} s"
    return box[0]


def assert_refused(outcome: object, kind: str) -> None:
    assert isinstance(outcome, InvalidImage), outcome
    assert outcome.code == "invalid_image" and f"not a regular file ({kind})" in str(outcome)


def test_a_fifo_under_the_root_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "image.png")
    loader = ImageLoader(settings_for(tmp_path))
    outcome = outcome_within(lambda: loader.load(str(tmp_path / "image.png"), time.monotonic() + 5))
    assert_refused(outcome, "a FIFO")


def test_a_symlink_to_a_fifo_under_the_root_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "image.png").symlink_to(tmp_path / "pipe")
    outcome = outcome_within(lambda: read_image_bytes(str(tmp_path / "image.png"), settings_for(tmp_path)))
    assert_refused(outcome, "a FIFO")


def test_a_device_under_the_root_is_refused() -> None:
    """/dev/null: a character device like /dev/zero, whose endless read would fill memory before this
    check existed; /dev/null cannot, and answers with no bytes."""
    outcome = outcome_within(lambda: read_image_bytes("/dev/null", settings_for(Path("/dev"))))
    assert_refused(outcome, "a device")


def test_a_directory_under_the_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "album.png").mkdir()
    outcome = outcome_within(lambda: read_image_bytes(str(tmp_path / "album.png"), settings_for(tmp_path)))
    assert isinstance(outcome, InvalidImage) and outcome.code == "invalid_image"


def test_a_unix_socket_under_the_root_is_refused(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "s.png"))
        server.listen()
        outcome = outcome_within(lambda: read_image_bytes(str(tmp_path / "s.png"), settings_for(tmp_path)))
    assert isinstance(outcome, InvalidImage) and outcome.code == "invalid_image"


def test_the_jobs_deadline_bounds_the_read_of_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 4096)
    settings = settings_for(tmp_path)
    reference = str(tmp_path / "cat.png")
    with pytest.raises(JobTimeout) as exc:
        read_image_bytes(reference, settings, deadline=time.monotonic() - 1)
    assert exc.value.code == "timeout"
    assert len(read_image_bytes(reference, settings, deadline=time.monotonic() + 30)) == 4104


def test_a_regular_file_over_several_chunks_up_to_the_cap_reads_whole(tmp_path: Path) -> None:
    data = bytes(range(256)) * (10 * 1024)  # 2.5 MiB: three 1 MiB reads
    (tmp_path / "cat.png").write_bytes(data)
    settings = WorkerSettings(local_image_roots=[tmp_path], max_image_bytes=len(data), max_image_pixels=10**9)
    assert read_image_bytes(str(tmp_path / "cat.png"), settings) == data
