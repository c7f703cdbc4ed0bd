"""Scenario: the learned CT denoiser served by the node: CT in, denoised series out, HU intact."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from conftest import dciodvfy_errors, storescu, wait_for
from pacs_node.models_dir import model_path

pytestmark = pytest.mark.skipif(not model_path("ct-denoise").exists(), reason="models/ct-denoise weights missing")


def test_ct_series_comes_back_denoised_by_the_model(node_factory, storescp, ge_head):
    peers = [{"name": "modality", "ae_title": "STORESCU"},
             {"name": "viewer", "ae_title": "STORESCP", "host": "127.0.0.1", "port": storescp.port}]
    rules = [{"name": "ct-ai", "when": "Modality == 'CT'", "pipeline": "ct-denoise", "destinations": ["viewer"]}]
    node = node_factory(peers, rules)
    sources = sorted(ge_head.glob("*.dcm"))[12:16]
    assert storescu(node.port, *sources).returncode == 0
    wait_for(lambda: len(storescp.files()) == len(sources), 300, "the denoised series")
    by_uid = {pydicom.dcmread(p).SOPInstanceUID: p for p in sources}
    for path in storescp.files():
        out = pydicom.dcmread(path)
        src_path = by_uid[out.SourceImageSequence[0].ReferencedSOPInstanceUID]
        src = pydicom.dcmread(src_path)
        assert "ct-denoise" in out.DerivationDescription and out.StudyInstanceUID == src.StudyInstanceUID
        assert (out.RescaleSlope, out.RescaleIntercept, out.PixelSpacing) == (src.RescaleSlope, src.RescaleIntercept,
                                                                            src.PixelSpacing)
        hu_out = out.pixel_array * float(out.RescaleSlope) + float(out.RescaleIntercept)
        hu_src = src.pixel_array * float(src.RescaleSlope) + float(src.RescaleIntercept)
        roi = (slice(236, 276), slice(236, 276))
        assert abs(hu_out[roi].mean() - hu_src[roi].mean()) < 5.0  # calibration kept
        assert not np.array_equal(hu_out, hu_src)  # the model did something
        assert not dciodvfy_errors(path) - dciodvfy_errors(src_path)


@pytest.mark.skipif(not model_path("mr-superres").exists(), reason="models/mr-superres weights missing")
def test_mr_series_comes_back_super_resolved_through_plane_with_consistent_geometry(node_factory, storescp, data):
    peers = [{"name": "modality", "ae_title": "STORESCU"},
             {"name": "viewer", "ae_title": "STORESCP", "host": "127.0.0.1", "port": storescp.port}]
    rules = [{"name": "mr-sr", "when": "Modality == 'MR'", "pipeline": "mr-superres", "destinations": ["viewer"],
              "params": {"scale": 2, "axis": "through"}}]
    node = node_factory(peers, rules)
    sources = sorted((data / "mr" / "uih-t1-3d-sag").glob("*.dcm"))[80:84]
    assert storescu(node.port, *sources).returncode == 0
    wait_for(lambda: len(storescp.files()) >= 7, 300, "the super-resolved series")
    out = sorted((pydicom.dcmread(p) for p in storescp.files()), key=lambda d: int(d.InstanceNumber))
    src = [pydicom.dcmread(p) for p in sources]
    assert len(out) in (7, 8)  # twice the slices (on the source grid, with or without an end slice)
    normal = np.cross(np.array(src[0].ImageOrientationPatient[:3], float), np.array(src[0].ImageOrientationPatient[3:], float))
    depth = [float(np.dot(np.array(d.ImagePositionPatient, float), normal)) for d in out]
    steps = np.abs(np.diff(depth))
    assert np.allclose(steps, steps[0], atol=1e-3)
    assert abs(float(out[0].SpacingBetweenSlices) - steps[0]) < 1e-3  # the header says where slices are
    assert all("mr-superres" in d.DerivationDescription for d in out)
    path = storescp.files()[0]
    assert not dciodvfy_errors(path) - dciodvfy_errors(sources[0])
