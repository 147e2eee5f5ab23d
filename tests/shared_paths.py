"""Where the shared reference material lives, and how tests that need it skip without it."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"
DATA = SHARED / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared reference material not found at {SHARED}")


def skip_without_shared() -> None:
    """For helpers that load shared material lazily (inside a test, not at collection time)."""
    if not SHARED.is_dir():
        pytest.skip(f"shared reference material not found at {SHARED}")
