"""Derived series: deterministic UIDs, exact HU round trip, valid objects."""

import numpy as np

from conftest import dciodvfy_errors
from pacs_node.encode import EncodeContext, encode_outputs
from pacs_node.pipelines import DerivedVolume
from pacs_node.volume import load_series


def test_uids_deterministic_and_hu_round_trip(ge_head, tmp_path):
    files = sorted(ge_head.glob("*.dcm"))[:3]
    vol = load_series(files)
    ctx = EncodeContext("ct-denoise-classical", "1.0.0", "r", "{}")
    first = encode_outputs(vol, [DerivedVolume(vol.array.copy(), "test")], ("derived",), ctx)
    again = encode_outputs(vol, [DerivedVolume(vol.array.copy(), "test")], ("derived",), ctx)
    other = encode_outputs(vol, [DerivedVolume(vol.array.copy(), "test")], ("derived",),
                           EncodeContext("ct-denoise-classical", "1.0.1", "r", "{}"))
    assert [d.SOPInstanceUID for d in first] == [d.SOPInstanceUID for d in again]
    assert first[0].SeriesInstanceUID == again[0].SeriesInstanceUID != other[0].SeriesInstanceUID
    assert len({d.SOPInstanceUID for d in first}) == 3
    for z, ds in enumerate(first):
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(hu.astype(np.float32), vol.array[z])
        assert ds.StudyInstanceUID == vol.datasets[z].StudyInstanceUID
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == vol.datasets[z].SOPInstanceUID
        path = tmp_path / f"{z}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert not dciodvfy_errors(path) - dciodvfy_errors(files[z])
