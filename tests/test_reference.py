"""The reference documents in ``tests/reference`` are the team's current ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reference import ORIGINALS


@pytest.mark.parametrize("copy", sorted(ORIGINALS), ids=lambda path: path.name)
def test_the_reference_copy_matches_the_workspace_original(copy: Path) -> None:
    original = ORIGINALS[copy]
    assert copy.is_file()
    if original.is_file():  # outside the workspace (a clean clone in CI) the copy stands alone
        assert copy.read_bytes() == original.read_bytes(), f"refresh {copy} from {original}"
