"""Registry mapping the pipeline names used in config rules to Pipeline classes.

Entries are import paths so that a pipeline whose optional heavy dependencies are missing
does not stop the others from loading. A pipeline instance is created once per process and
kept (learned models stay resident).
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import time
from typing import Iterable

from ..errors import PacsNodeError
from .base import DerivedVolume, Output, Pipeline, Requirements, ScoreMap

__all__ = ["DerivedVolume", "Output", "Pipeline", "Requirements", "ScoreMap", "available", "get_pipeline", "preload"]

log = logging.getLogger(__name__)

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


def preload(names: Iterable[str], strict: bool = True) -> None:
    """Create the pipelines ``names`` now (models, weights), not in their first job's time.

    Logs each with its load time and, when a pipeline brought in torch with CUDA, the GPU memory
    allocated. ``strict=False``: a pipeline that cannot be loaded is logged and skipped (its
    jobs fail with the reason) instead of raising.
    """
    for name in names:
        started = time.monotonic()
        try:
            get_pipeline(name)
        except Exception as exc:  # noqa: BLE001 - re-raised unless strict is off
            if strict:
                raise
            log.error("pipeline %s cannot be loaded: %s", name, exc)
            continue
        log.info("pipeline %s loaded in %.1f s%s", name, time.monotonic() - started, _gpu_memory())


def _gpu_memory() -> str:
    torch = sys.modules.get("torch")  # only when a pipeline imported it: no torch import for this line
    if torch is None or not torch.cuda.is_available():
        return ""
    return f" (GPU memory allocated: {torch.cuda.memory_allocated() / 2**20:.0f} MiB)"
