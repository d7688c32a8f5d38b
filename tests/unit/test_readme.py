"""The documentation stays true: every setting documented (the README and docs/), the two commands given in
the README, CI runs the README's command."""

from __future__ import annotations

import os
from pathlib import Path

from producer.settings import ClientSettings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# The README and the pages it points to (docs/): what is documented may stand in either.
DOCUMENTED = "\n".join([README, *(path.read_text() for path in sorted((ROOT / "docs").glob("*.md")))])


def test_every_setting_is_in_the_readme() -> None:
    fields = set(ClientSettings.model_fields) | set(WorkerSettings.model_fields)
    variables = (f"LLAVA_{name.upper()}" for name in fields)
    missing = sorted(variable for variable in variables if f"`{variable}`" not in DOCUMENTED)
    assert not missing, f"settings missing from README.md and docs/: {missing}"


def test_readme_gives_the_two_commands_and_ci_runs_make_test() -> None:
    assert "make demo" in README and "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_config_is_named_in_the_readme() -> None:
    for config in (ROOT / "configs").glob("*.yaml"):
        assert config.name in DOCUMENTED, config.name


def test_checkpoint_table_is_computed_from_the_architectures() -> None:
    from worker.runtime.architectures import table

    assert table() in DOCUMENTED, "regenerate it: python -m worker.runtime.architectures --table"


def test_nothing_links_outside_the_repository() -> None:
    """No file names the team's notes outside the repo (a reader of the repo alone cannot follow them)."""
    outside = ("../" + "shared", "DESIGN" + ".md")
    suffixes = {".py", ".md", ".toml", ".yml", ".yaml", ".cfg", ".txt", ".html", ".example", ""}
    skip = {".git", ".venv", "node_modules", ".mypy_cache", ".ruff_cache", ".pytest_cache", "build", ".run"}
    offenders = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [name for name in dirs if name not in skip and not name.endswith(".egg-info")]
        for name in files:
            path = Path(folder) / name
            if path.suffix in suffixes and any(text in path.read_text(errors="ignore") for text in outside):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"files pointing outside the repository: {offenders}"


def test_the_readme_stays_a_short_guide_pointing_at_every_page_of_docs() -> None:
    assert len(README.splitlines()) <= 150, "deep material belongs in docs/"
    for page in (ROOT / "docs").glob("*.md"):
        assert page.name == "README.md" or f"docs/{page.name}" in README, page.name
