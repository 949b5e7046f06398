"""The team's reference documents the tests check the gateway against, kept in the repository.

``nbia-api.md`` (the API catalog) and the NBIA Advanced REST API guide are copies of
``shared/nbia-api.md`` and ``shared/seeds/000_6f4faefbed4ca96d.txt`` from the team's workspace, so
the catalogue tests run (never skip) on a clean clone; ``tests/test_reference.py`` fails when the
workspace copy has moved on and these need refreshing.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
CATALOG = HERE / "nbia-api.md"
GUIDE = HERE / "nbia-advanced-rest-api-guide.txt"

#: Where the originals live when the repository is checked out in the team's workspace.
WORKSPACE = HERE.parents[2] / "shared"
ORIGINALS = {
    CATALOG: WORKSPACE / "nbia-api.md",
    GUIDE: WORKSPACE / "seeds" / "000_6f4faefbed4ca96d.txt",
}
