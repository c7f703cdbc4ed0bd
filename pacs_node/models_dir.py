"""Where trained weights live: models/<name>/ in the repo, or $PACS_NODE_MODELS."""

from __future__ import annotations

import os
from pathlib import Path


def models_dir() -> Path:
    env = os.environ.get("PACS_NODE_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "models"


def model_path(name: str, filename: str = "model.safetensors") -> Path:
    return models_dir() / name / filename
