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


def test_private_elements_dropped_as_pydicom_drops_them(data):
    """encode/derived.py's _drop_private opens only sequences; it leaves the same elements
    with the same values as Dataset.remove_private_tags (which converts every element on its
    walk), on every real series the project has (private groups, nested sequences, implicit
    and explicit VR, compressed syntaxes)."""
    import copy

    import pydicom

    from pacs_node.encode.derived import _drop_private

    def elements(ds):  # type: ignore[no-untyped-def]
        return [(e.tag, e.VR, e.value if e.VR != "SQ" else len(e.value)) for e in ds.iterall()]

    checked = private = 0
    folders = [*sorted(p for p in (data / "ct").iterdir() if p.is_dir()),
               *sorted(p for p in (data / "mr").iterdir() if p.is_dir()),
               *sorted(p for p in (data / "compressed").rglob("*") if p.is_dir())]
    for folder in folders:
        for path in [f for f in sorted(folder.iterdir()) if f.is_file()][:3]:
            try:
                src = pydicom.dcmread(path)
            except Exception:  # noqa: BLE001 - not DICOM
                continue
            theirs, ours = copy.deepcopy(src), copy.deepcopy(src)
            theirs.remove_private_tags()
            _drop_private(ours)
            private += sum(1 for e in src.iterall() if e.tag.is_private)
            assert elements(ours) == elements(theirs), path
            assert not any(e.tag.is_private for e in ours.iterall())
            checked += 1
    assert checked >= 10 and private > 0, (checked, private)
