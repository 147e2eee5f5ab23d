"""Where the shared reference material lives, and a skip marker for tests that need it."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"
DATA = SHARED / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared reference material not found at {SHARED}")
