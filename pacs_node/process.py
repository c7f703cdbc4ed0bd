"""One series through one pipeline: load, check, run, encode. Shared by jobs and `pacs-node run`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from pydicom.dataset import Dataset

from .encode import EncodeContext, encode_outputs
from .pipelines import get_pipeline
from .volume import Volume, load_series


def process_series(files: list[Path], pipeline_name: str, params: Mapping[str, Any],
                   outputs: tuple[str, ...] = (), rule: str = "",
                   volume: Volume | None = None) -> tuple[list[Dataset], dict[str, float]]:
    """Return the result datasets and the seconds spent per stage (load, model, encode).
    ``volume``: ``files`` already read (pacs_node/readahead.py); "load" is then the check alone."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if volume is None:
        volume = load_series(files)
    pipeline = get_pipeline(pipeline_name)
    pipeline.check(volume)
    timings["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = pipeline.run(volume, params)
    timings["model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ctx = EncodeContext(pipeline.name, pipeline.version, rule, json.dumps(dict(params), sort_keys=True))
    datasets = encode_outputs(volume, results, outputs or pipeline.default_outputs, ctx)
    timings["encode"] = time.perf_counter() - t0
    return datasets, timings
