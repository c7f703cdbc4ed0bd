"""Registry mapping the pipeline names used in config rules to Pipeline classes.

Entries are import paths so that a pipeline whose optional heavy dependencies are missing
does not stop the others from loading. A pipeline instance is created once per process and
kept (learned models stay resident).
"""

from __future__ import annotations

import importlib
import threading

from ..errors import PacsNodeError
from .base import DerivedVolume, Output, Pipeline, Requirements, ScoreMap

__all__ = ["DerivedVolume", "Output", "Pipeline", "Requirements", "ScoreMap", "available", "get_pipeline"]

_REGISTRY: dict[str, str] = {
    "ct-denoise-classical": "pacs_node.pipelines.ct_denoise_classical:CtDenoiseClassical",
    # learned models (each module loads its weights from models/<name>/ once)
    "ct-denoise": "pacs_node.pipelines.ct_denoise:CtDenoise",
    "mr-superres": "pacs_node.pipelines.mr_superres:MrSuperres",
    "anomaly-mr": "pacs_node.pipelines.anomaly:AnomalyMr",
    "anomaly-ct": "pacs_node.pipelines.anomaly:AnomalyCt",
}

_instances: dict[str, Pipeline] = {}
_lock = threading.Lock()


class UnknownPipeline(PacsNodeError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown pipeline '{name}' (known: {', '.join(sorted(_REGISTRY))})")


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_pipeline(name: str) -> Pipeline:
    """The process-wide instance of pipeline ``name`` (created on first use)."""
    with _lock:
        if name in _instances:
            return _instances[name]
        target = _REGISTRY.get(name)
        if target is None:
            raise UnknownPipeline(name)
        module_name, _, cls_name = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as exc:
            raise PacsNodeError(f"pipeline '{name}' cannot be loaded: {exc}") from exc
        _instances[name] = cls()
        return _instances[name]
