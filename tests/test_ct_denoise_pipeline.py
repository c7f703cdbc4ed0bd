"""The ct-denoise pipeline with the committed weights on a real held-out series (GE head)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pacs_node.models_dir import model_path

WEIGHTS = model_path("ct-denoise")
pytestmark = pytest.mark.skipif(not WEIGHTS.exists(), reason="models/ct-denoise/model.safetensors not committed")


def _sub(vol, a: int, b: int):
    return type(vol)(array=vol.array[a:b], positions=vol.positions[a:b], row_direction=vol.row_direction,
                     column_direction=vol.column_direction, pixel_spacing=vol.pixel_spacing,
                     datasets=vol.datasets[a:b])


@pytest.fixture(scope="module")
def ge_head(data: Path):
    """Eight slices (10-17) of the GE head: enough for batching, small enough for CPU."""
    from pacs_node.volume import load_series

    return _sub(load_series(sorted((data / "ct" / "ge-head-tilt").glob("*"))), 10, 18)


def test_registry_loads_weights_once_and_keeps_calibration(ge_head):
    from pacs_node.ml import metrics
    from pacs_node.ml.lowdose import LowDoseParams, prepare_slice, simulate_slice
    from pacs_node.pipelines import DerivedVolume, get_pipeline
    from pacs_node.pipelines.ct_denoise import representable_hu

    pipe = get_pipeline("ct-denoise")
    assert get_pipeline("ct-denoise") is pipe and pipe.version
    vol = ge_head
    (out,) = pipe.run(vol, {"batch_size": 4})
    assert isinstance(out, DerivedVolume)
    assert out.array.shape == vol.array.shape and out.array.dtype == np.float32
    assert np.isfinite(out.array).all()
    # padding outside the scan field passes through untouched
    pad = vol.array < -1024
    assert np.array_equal(out.array[pad], vol.array[pad])
    # every slice stays inside what its stored values can represent
    for z, ds in enumerate(vol.datasets):
        lo, hi = representable_hu(ds)
        assert out.array[z].min() >= lo and out.array[z].max() <= hi
    # HU calibration: the mean of flat soft-tissue regions moves by less than 3 HU
    for z in (0, 4, 7):
        y0, y1, x0, x1 = metrics.flat_roi(vol.array[z], size=31)
        assert abs(float(out.array[z, y0:y1, x0:x1].mean() - vol.array[z, y0:y1, x0:x1].mean())) < 3.0

    # on simulated 25 % dose the model removes most of the inserted noise
    ref = prepare_slice(vol.array[4])
    low = simulate_slice(ref, 0.25, vol.pixel_spacing[0], np.random.default_rng(0), LowDoseParams(n_views=180))
    one = _sub(vol, 4, 5)
    one.array = low[None]
    den = pipe.run(one, {})[0].array[0]
    body = ref > -900
    assert metrics.rmse(ref, den, mask=body) < 0.75 * metrics.rmse(ref, low, mask=body)
    assert metrics.psnr(ref, den, window=(-160, 240)) > metrics.psnr(ref, low, window=(-160, 240)) + 3


def test_encoded_series_round_trips_hu(ge_head):
    """Through the derived-series encoder: same slope/intercept, stored values decode to the output."""
    from pacs_node.encode import EncodeContext
    from pacs_node.encode.derived import encode_derived
    from pacs_node.pipelines import get_pipeline
    from pacs_node.volume import rescale_of

    sub = _sub(ge_head, 0, 3)
    (out,) = get_pipeline("ct-denoise").run(sub, {})
    dsets = encode_derived(sub, out, EncodeContext(pipeline="ct-denoise", version="test"))
    for z, ds in enumerate(dsets):
        assert rescale_of(ds) == rescale_of(sub.datasets[z])
        slope, intercept = rescale_of(ds)
        hu = ds.pixel_array.astype(np.float32) * slope + intercept
        assert np.max(np.abs(hu - out.array[z])) <= slope / 2 + 1e-3
