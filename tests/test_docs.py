"""The README stays true: its opening commands and its settings table."""

from __future__ import annotations

import re
from pathlib import Path

from proxy.config import Settings, load_settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_in_the_readme_table() -> None:
    text = README.read_text()
    rows = set(re.findall(r"^\| `([a-z_0-9]+)` \| `NBIA_PROXY_([A-Z_0-9]+)` \|", text, re.M))
    for name in Settings.model_fields:
        assert (name, name.upper()) in rows, f"setting {name} is missing from the README table"
    assert len(rows) == len(Settings.model_fields), "the README documents a setting that is gone"


def test_readme_opens_with_the_serve_and_test_commands() -> None:
    """The first code block holds the command that starts the gateway and the one that tests."""
    first_block = README.read_text().split("```")[1]
    assert "nbia-proxy serve" in first_block
    assert "bash scripts/test" in first_block
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/test" in ci


def test_the_example_settings_file_is_valid() -> None:
    example = README.parent / "deploy" / "nbia-proxy.example.toml"
    settings = load_settings(example)
    assert settings.cache_ttl == {"v4/getSeries*": 86400, "*getSimpleSearch*": 300}
    assert settings.cache_max_bytes == 4 * 1024**3
