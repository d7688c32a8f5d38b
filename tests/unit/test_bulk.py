"""The pure pieces of bulk tagging: input discovery, resume parsing, the output file, records, ordering."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from producer.bulk import (
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
    walk_images,
)
from producer.contract import CaptionResult, Timings
from producer.errors import FetchFailed, InvalidImage, InvalidRequest


def tree(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_walk_finds_image_files_recursively_in_a_stable_order(tmp_path: Path) -> None:
    names = ["b.jpg", "a.PNG", "z/c.webp", "z/y/d.TIFF", "e.gif", "f.bmp", "g.tif", "h.jpeg", "i.txt", "j"]
    tree(tmp_path, *names)
    found = [Path(p).relative_to(tmp_path).as_posix() for p in walk_images(str(tmp_path))]
    assert found == ["a.PNG", "b.jpg", "e.gif", "f.bmp", "g.tif", "h.jpeg", "z/c.webp", "z/y/d.TIFF"]


def test_discover_expands_folders_keeps_the_rest_and_takes_each_image_once(tmp_path: Path) -> None:
    tree(tmp_path, "photos/a.jpg", "photos/notes.txt", "single.raw")
    folder, single = str(tmp_path / "photos"), str(tmp_path / "single.raw")
    url = "https://example.com/x.jpg?sig=1"
    images, walked = discover([url, folder, single, "data:image/png;base64,AAAA", url, "/missing.png"])
    assert images == [url, f"{folder}/a.jpg", single, "data:image/png;base64,AAAA", "/missing.png"]
    assert walked
    assert discover([single, url]) == ([single, url], False)  # explicit files: kept whatever their name


def test_read_image_list_skips_blanks_and_comments(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(
        "# header\n\nhttps://a/1.png\n   /data/2.jpg  \n  # indented comment\n\t\nhttps://a/3.png"
    )
    assert read_image_list(str(listing)) == ["https://a/1.png", "/data/2.jpg", "https://a/3.png"]
    with pytest.raises(InvalidRequest, match="cannot read the image list"):
        read_image_list(str(tmp_path / "nope.txt"))


def test_load_outcomes_last_line_wins_and_cut_lines_are_ignored(tmp_path: Path) -> None:
    out = tmp_path / "tags.jsonl"
    lines = [
        {"image": "a", "job_id": "1", "result": {"kind": "caption"}},
        {"image": "b", "error": {"code": "fetch_failed", "message": "503"}},
        {"image": "c", "error": {"code": "invalid_image", "message": "bad"}},
        {"image": "b", "job_id": "2", "result": {"kind": "caption"}},
        {"image": "d", "error": {"code": "timeout", "message": "late"}},
        {"no": "image"},
        ["not", "a", "record"],
    ]
    out.write_text("".join(json.dumps(line) + "\n" for line in lines) + 'garbage\n{"image": "e", "res')
    assert load_outcomes(out) == {"a": None, "b": None, "c": "invalid_image", "d": "timeout"}
    assert load_outcomes(tmp_path / "absent.jsonl") == {}
    with pytest.raises(InvalidRequest, match="cannot read the output file"):
        load_outcomes(tmp_path)  # a directory


@pytest.mark.parametrize(
    ("outcome", "settled"),
    [
        (None, True),
        ("invalid_image", True),
        ("invalid_request", True),
        ("internal_error", True),
        ("fetch_failed", False),
        ("timeout", False),
        ("worker_lost", False),
        ("result_timeout", False),
    ],
)
def test_which_earlier_outcomes_are_skipped(outcome: str | None, settled: bool) -> None:
    assert is_settled(outcome) is settled


def test_open_output_closes_a_cut_last_line(tmp_path: Path) -> None:
    cut, clean, new = tmp_path / "cut.jsonl", tmp_path / "clean.jsonl", tmp_path / "new.jsonl"
    cut.write_text('{"image": "a", "result": {}}\n{"image": "b", "res')
    clean.write_text('{"image": "a", "result": {}}\n')
    for path in (cut, clean, new):
        with open_output(str(path)) as output:
            jsonl_writer(output)({"image": "z", "result": {}})
    assert cut.read_text().splitlines()[1:] == ['{"image": "b", "res', '{"image": "z", "result": {}}']
    assert clean.read_text().count("\n") == 2
    assert new.read_text() == '{"image": "z", "result": {}}\n'
    with pytest.raises(InvalidRequest, match="cannot write the output file"):
        open_output(str(tmp_path / "no" / "such" / "dir.jsonl"))


def test_records_hold_the_result_or_the_coded_error() -> None:
    timings = Timings(image_ms=1, inference_ms=2, total_ms=3)
    result = CaptionResult(
        text="a sign",
        model="m",
        worker="w",
        prompt_tokens=5,
        image_tokens=4,
        generated_tokens=2,
        timings=timings,
    )
    ok = record_for("a.jpg", None, result)
    assert ok["image"] == "a.jpg" and ok["result"]["text"] == "a sign" and "job_id" not in ok
    failed = record_for("b.jpg", None, InvalidImage("not an image"))
    assert failed == {"image": "b.jpg", "error": {"code": "invalid_image", "message": "not an image"}}
    json.dumps(ok)  # JSON-ready


def test_ordered_sink_releases_records_in_input_order() -> None:
    seen: list[int] = []
    ordered = RecordSink(lambda record: seen.append(record["i"]), ordered=True)
    for index in (2, 0, 3, 1, 4):
        ordered.put(index, {"i": index})
    assert seen == [0, 1, 2, 3, 4]
    seen.clear()
    as_they_come = RecordSink(lambda record: seen.append(record["i"]))
    for index in (2, 0, 1):
        as_they_come.put(index, {"i": index})
    assert seen == [2, 0, 1]


def test_jsonl_writer_flushes_every_line() -> None:
    class Counting(io.StringIO):
        flushes = 0

        def flush(self) -> None:
            self.flushes += 1

    stream = Counting()
    write = jsonl_writer(stream)
    write({"image": "é", "error": FetchFailed("x").to_dict()})
    write({"image": "b", "result": {}})
    assert stream.flushes == 2
    assert json.loads(stream.getvalue().splitlines()[0])["image"] == "é"


def test_resume_job_id_is_stable_and_changes_with_what_changes_the_result(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"first")
    out = str(tmp_path / "tags.jsonl")
    params = {"prompt": None, "queue": "q", "max_new_tokens": 4, "priority": 4}
    first = resume_job_id(out, str(image), "caption", params)
    assert first == resume_job_id(out, str(image), "caption", {**params, "priority": 9})  # same work
    assert first.startswith("bulk-") and len(first) == 37
    others = {
        resume_job_id(str(tmp_path / "other.jsonl"), str(image), "caption", params),
        resume_job_id(out, str(image), "vqa", params),
        resume_job_id(out, str(image), "caption", {**params, "max_new_tokens": 5}),
        resume_job_id(out, "https://example.com/a.png", "caption", params),
    }
    image.write_bytes(b"edited, longer")  # an edited file is tagged again
    others.add(resume_job_id(out, str(image), "caption", params))
    assert first not in others and len(others) == 5


def test_image_arguments_become_paths_unless_urls() -> None:
    assert image_input("photos/a.jpg") == Path("photos/a.jpg")
    for reference in ("https://example.com/a.png", "HTTP://x/y", "data:image/png;base64,AAAA", "s3://b/k"):
        assert image_input(reference) == reference
