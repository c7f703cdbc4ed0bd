"""Anomaly outputs (Secondary Capture, Parametric Map, SEG) from a real MR series.

Scenario: three slices of a real brain MR series get a score map; each writer turns it into
DICOM; every object must pass dciodvfy with no error that its source did not already have,
stay in the source study and point back at the source images.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pacs_node.datasets import data_dir
from pacs_node.encode import EncodeContext, encode_outputs
from pacs_node.encode.overlay import WARNING_TEXT, render_overlay
from pacs_node.errors import EncodeError
from pacs_node.pipelines.base import ScoreMap
from pacs_node.volume import load_series

SERIES = {"mr/studyforrest-t1": (190, 193), "mr/uih-t1-3d-sag": (80, 83), "ct/ge-head-tilt": (16, 19)}
KINDS = ("secondary_capture", "parametric_map", "segmentation")


def _volume(name: str):
    try:
        folder = data_dir() / name
    except FileNotFoundError as exc:
        pytest.skip(f"shared data not available: {exc}")
    files = sorted(folder.iterdir())
    a, b = SERIES[name]
    return load_series(files[a:b])


def _score(shape: tuple[int, int, int]) -> np.ndarray:
    _, rows, cols = shape
    yy, xx = np.mgrid[:rows, :cols]
    blob = np.exp(-((yy - 0.4 * rows) ** 2 + (xx - 0.5 * cols) ** 2) / (0.01 * rows ** 2))
    return np.repeat(blob[None].astype(np.float32), shape[0], axis=0)


def _encode(volume, kinds=KINDS, threshold: float = 0.5):
    ctx = EncodeContext("anomaly-mr", "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom warns about the test patient names
        return encode_outputs(volume, [ScoreMap(_score(volume.shape), "Anomaly map", threshold)], kinds, ctx)


def _errors(path: Path) -> set[str]:
    """dciodvfy 'Error' lines, without the parts that name where in the file they are."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    lines = (out.stdout + out.stderr).splitlines()
    errors = {re.sub(r"\s+", " ", ln.strip()) for ln in lines if ln.startswith("Error")}
    # Module names differ between IODs for the same attribute error (e.g. GeneralSeries).
    return {re.sub(r" Module=<[^>]*>", "", e) for e in errors}


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("name", sorted(SERIES))
def test_outputs_add_no_dciodvfy_errors(name: str, tmp_path: Path) -> None:
    volume = _volume(name)
    source_errors: set[str] = set()
    for src_file in volume.files:
        source_errors |= _errors(src_file)
    outputs = _encode(volume)
    assert [ds.SOPClassUID.name for ds in outputs] == [
        "Secondary Capture Image Storage"] * 3 + ["Parametric Map Storage", "Segmentation Storage"]
    for i, ds in enumerate(outputs):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        new = _errors(path) - source_errors
        assert not new, f"{ds.SOPClassUID.name} from {name} adds dciodvfy errors: {sorted(new)}"


def test_secondary_capture_is_a_burned_in_overlay_in_the_source_study() -> None:
    volume = _volume("mr/studyforrest-t1")
    scs = _encode(volume, kinds=("secondary_capture",))
    assert len(scs) == len(volume.datasets)
    series = {ds.SeriesInstanceUID for ds in scs}
    assert len(series) == 1 and series != {volume.datasets[0].SeriesInstanceUID}
    for ds, src in zip(scs, volume.datasets):
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.PatientID == src.PatientID
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert ds.BurnedInAnnotation == "YES"
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription.startswith("AI anomaly-mr")
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert "not for primary diagnosis" in ds.DerivationDescription
    pixels = scs[0].pixel_array
    # the heat map tints the blob (the grey image would have R == G == B there)
    rows, cols = volume.shape[1:]
    r, c = int(0.4 * rows), int(0.5 * cols)
    assert np.ptp(pixels[r, c].astype(int)) > 40
    # a colour bar and a text band enlarge the image beyond the source
    assert pixels.shape[0] > rows and pixels.shape[1] > cols


def test_rerun_gives_the_same_uids() -> None:
    volume = _volume("mr/studyforrest-t1")
    first = [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in _encode(volume)]
    second = [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in _encode(volume)]
    assert first == second
    assert len({uid for _, uid in first}) == len(first)


def test_parametric_map_holds_the_scores() -> None:
    volume = _volume("mr/studyforrest-t1")
    (pm,) = _encode(volume, kinds=("parametric_map",))
    assert int(pm.NumberOfFrames) == len(volume.datasets)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    slope = float(mapping.RealWorldValueSlope)
    values = pm.pixel_array.astype(np.float32) * slope
    np.testing.assert_allclose(values, _score(volume.shape), atol=1e-3)


def test_segmentation_follows_the_threshold() -> None:
    volume = _volume("mr/studyforrest-t1")
    (seg,) = _encode(volume, kinds=("segmentation",), threshold=0.5)
    assert seg.SegmentationType == "BINARY"
    expected = (_score(volume.shape) >= 0.5).sum()
    assert int(seg.pixel_array.sum()) == expected
    (tight,) = _encode(volume, kinds=("segmentation",), threshold=0.9)
    assert int(tight.pixel_array.sum()) < expected


def test_source_headers_are_not_changed() -> None:
    volume = _volume("mr/uih-t1-3d-sag")  # its dates are "***": repaired in outputs only
    before = [ds.PatientBirthDate for ds in volume.datasets]
    outputs = _encode(volume)
    assert [ds.PatientBirthDate for ds in volume.datasets] == before == ["***"] * 3
    assert all(not ds.PatientBirthDate for ds in outputs)  # present (Type 2) and empty


def test_score_map_out_of_range_is_refused() -> None:
    volume = _volume("mr/studyforrest-t1")
    bad = ScoreMap(np.full(volume.shape, 1.5, np.float32), "Anomaly map")
    with pytest.raises(EncodeError, match=r"outside \[0, 1\]"):
        encode_outputs(volume, [bad], ("parametric_map",), EncodeContext("anomaly-mr", "test"))
    with pytest.raises(EncodeError, match="shape"):
        encode_outputs(volume, [ScoreMap(np.zeros((1, 4, 4), np.float32), "x")], ("secondary_capture",),
                       EncodeContext("anomaly-mr", "test"))


def test_small_images_are_enlarged_so_the_text_is_legible() -> None:
    rgb = render_overlay(np.random.default_rng(0).random((64, 64)).astype(np.float32), np.zeros((64, 64), np.float32),
                         (0.0, 1.0))
    assert rgb.shape[0] >= 384 and rgb.dtype == np.uint8
    assert "\u2014" in WARNING_TEXT
