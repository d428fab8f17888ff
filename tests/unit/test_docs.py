"""Documentation that is generated from the code stays in step with it."""

from __future__ import annotations

from pathlib import Path

from scale0 import config

OPERATING = Path(__file__).resolve().parents[2] / "docs" / "operating.md"


def test_operating_md_settings_tables_match_the_declared_settings() -> None:
    text = OPERATING.read_text()
    begin, end = "<!-- settings:begin -->", "<!-- settings:end -->"
    tables = text[text.index(begin) + len(begin):text.index(end)].strip("\n")
    assert tables == config.markdown().rstrip("\n"), (
        "docs/operating.md is out of date: paste `python -m scale0.config --markdown` "
        "between the settings markers")
