"""Where browser tests save screenshots.

By default into a temporary folder, so `make test` leaves the checkout clean;
`BREEZEWEB_SCREENSHOTS=docs/screenshots make test` refreshes the README's."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def screenshot_dir() -> Path:
    configured = os.environ.get("BREEZEWEB_SCREENSHOTS", "")
    path = Path(configured) if configured else Path(tempfile.gettempdir()) / "breezeweb-shots"
    path.mkdir(parents=True, exist_ok=True)
    return path
