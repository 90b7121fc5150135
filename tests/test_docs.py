"""The docs stay in step with the code: the README's first commands are CI's, its links resolve,
docs/design.md's config table names every field, docs/usage.md covers every command, and the docs
carry no development history (results.md and CHANGELOG.md hold dates and commits by design)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from experiments.cli import COMMANDS
from tnt.config import ModelConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))


def read(name: str) -> str:
    return (ROOT / name).read_text()


def test_readme_starts_with_the_commands_ci_runs():
    first_block = read("README.md").split("```")[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    ci = [line.strip() for line in read(".ci/run").splitlines()]
    assert commands[1] in ci, "the README's test command must be .ci/run's, byte for byte"
    install = commands[0].split()
    ci_install = next(line for line in ci if line.startswith("pip install")).split()
    assert install == [w for w in ci_install if w != "--quiet"]


def test_readme_links_resolve():
    for name in re.findall(r"\b((?:docs/)?[A-Za-z_-]+\.md)\b", read("README.md")):
        assert (ROOT / name).is_file(), name


def test_design_config_table_names_every_field():
    text = read("docs/design.md")
    section = text[text.index("## Config"):text.index("\n## ", text.index("## Config") + 1)]
    named = {n.strip() for row in re.findall(r"^\| ([a-z0-9_, ]+) \|", section, re.M)
             for n in row.split(",")}
    fields = {f.name for c in (ModelConfig, TrainConfig) for f in dataclasses.fields(c)}
    assert fields - named == set(), "fields missing from docs/design.md's config table"
    assert named - fields - {""} == set(), "docs/design.md names fields tnt/config.py lacks"


def test_usage_covers_every_command():
    headings = set(re.findall(r"^## (.+)$", read("docs/usage.md"), re.M))
    covered = {name.strip() for h in headings for name in h.split(",")}
    assert set(COMMANDS) - covered == set()


@pytest.mark.parametrize("path", [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *DOCS],
                         ids=lambda p: p.name)
def test_no_development_history(path):
    if path.name == "results.md":
        return
    text = path.read_text()
    for pattern in (r"\bissue \d+", r"\bthe seed\b(?! of)", r"\btoday\b", r"this session",
                    r"\bused to\b", r"when this was written", r"`[0-9a-f]{7,40}`"):
        assert not re.search(pattern, text, re.I), f"{path.name}: {pattern}"
