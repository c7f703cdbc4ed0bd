"""Where the shared real scans are: ../shared/data unpacked once into a cache folder."""

from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def data_dir() -> Path:
    """Unpack the shared archives (idempotent) and return the folder.

    ``PACS_NODE_DATA`` names the cache folder; ``PACS_NODE_SHARED`` the shared/ folder
    (default: ../shared beside the checkout).
    """
    shared = Path(os.environ.get("PACS_NODE_SHARED", REPO_ROOT.parent / "shared"))
    script = shared / "data" / "unpack.sh"
    if not script.exists():
        cached = os.environ.get("PACS_NODE_DATA")
        if cached and Path(cached).is_dir():
            return Path(cached)
        raise FileNotFoundError(f"{script} not found: set PACS_NODE_SHARED to the shared/ folder")
    out = subprocess.run(["bash", str(script)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def series_dir(name: str) -> Path:
    """E.g. series_dir('ct/ge-head-tilt')."""
    return data_dir() / name
