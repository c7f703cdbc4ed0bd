"""The mr-superres derived series is valid DICOM: no dciodvfy error its source did not have."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pacs_node.models_dir import model_path

pytestmark = [
    pytest.mark.skipif(not model_path("mr-superres").exists(), reason="mr-superres weights not installed"),
    pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed"),
]


def _errors(path: Path) -> set[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {line.strip() for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from pacs_node.datasets import series_dir
    from pacs_node.volume import load_series

    try:
        files = sorted(series_dir("mr/uih-t1-3d-sag").glob("*"))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    vol = load_series(files)
    keep = [90, 91]
    # a central 256 x 256 field of view (positions moved with it) keeps the test fast
    oy, ox = 128, 102
    vol.array = np.ascontiguousarray(vol.array[keep, oy:oy + 256, ox:ox + 256])
    dr, dc = vol.pixel_spacing
    vol.positions = vol.positions[keep] + ox * dc * vol.row_direction + oy * dr * vol.column_direction
    vol.datasets = [vol.datasets[i] for i in keep]
    vol.files = [vol.files[i] for i in keep]
    return vol


@pytest.mark.parametrize("params", [{"scale": 2}, {"scale": 2, "axis": "through"}])
def test_derived_series_adds_no_dciodvfy_errors(source, params, tmp_path):
    from pacs_node.encode import EncodeContext
    from pacs_node.encode.derived import encode_derived
    from pacs_node.pipelines.mr_superres import MrSuperres

    pipe = MrSuperres()
    out = pipe.run(source, params)[0]
    datasets = encode_derived(source, out, EncodeContext(pipeline=pipe.name, version=pipe.version))
    src_errors = set().union(*(_errors(p) for p in source.files))
    for k, ds in enumerate(datasets):
        path = tmp_path / f"{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        back = pydicom.dcmread(path)
        assert "mr-superres" in back.DerivationDescription
        if params.get("axis") == "through":
            assert (back.Rows, back.Columns) == (256, 256)
            assert float(back.SliceThickness) == pytest.approx(float(source.datasets[0].SliceThickness) / 2)
        else:
            assert (back.Rows, back.Columns) == (512, 512)
            assert [float(v) for v in back.PixelSpacing] == pytest.approx([0.25, 0.25])
            assert [float(v) for v in back.ImagePositionPatient] == pytest.approx(source.positions[k].tolist())
        new = _errors(path) - src_errors
        assert not new, f"new dciodvfy errors: {sorted(new)}"
    if params.get("axis") == "through":
        ipp = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
        np.testing.assert_allclose(ipp[::2], source.positions, atol=1e-5)
        np.testing.assert_allclose(ipp[1], 0.5 * (source.positions[0] + source.positions[1]), atol=1e-5)
