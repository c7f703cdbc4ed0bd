"""Volume loading: slice order from geometry, every compressed syntax, rescale to HU."""

import random

import numpy as np
import pydicom
import pytest

from pacs_node.volume import load_series


def test_sorted_along_normal_whatever_the_file_order(ge_head):
    files = sorted(ge_head.glob("*.dcm"))
    shuffled = files[:]
    random.Random(1).shuffle(shuffled)
    vol = load_series(shuffled)
    depth = vol.positions @ vol.normal
    assert np.all(np.diff(depth) > 0)
    assert vol.array.dtype == np.float32 and vol.shape == (len(files), 512, 512)
    ds = pydicom.dcmread(vol.files[3])
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(vol.array[3], expected.astype(np.float32))


def test_all_transfer_syntaxes_decode_to_the_same_pixels(data):
    folder = data / "compressed" / "transfer-syntaxes"
    arrays, syntaxes = {}, set()
    for path in sorted(folder.glob("*.dcm")):
        syntaxes.add(str(pydicom.dcmread(path).file_meta.TransferSyntaxUID))
        arrays[path.name] = load_series([path]).array[0]
    assert len(arrays) == 9 and len(syntaxes) >= 7  # RLE, JPEG lossless, JPEG-LS, J2K, LE, BE...
    reference = next(iter(arrays.values()))
    for ts, arr in arrays.items():
        assert np.array_equal(arr, reference), ts


def test_jpeg2000_series_and_non_dicom_files_skipped(data, tmp_path):
    j2k = sorted((data / "ct" / "abdomen-j2k").glob("*"))
    (tmp_path / "DIRFILE").write_bytes(b"not dicom at all")
    vol = load_series(j2k + [tmp_path / "DIRFILE"])
    assert vol.shape[0] == len(j2k)
    assert -1100 < float(vol.array.min()) < -900  # air in HU after rescale


def test_pixels_read_from_the_file_are_what_pydicom_decodes(data):
    """volume._native_pixels reads uncompressed pixel data straight from the file (the data set
    keeps it unread); on every shared series where it applies it gives pydicom's values, and it
    declines (None: pydicom decodes) for the rest."""
    from pydicom.pixels import pixel_array

    from pacs_node.volume import _DEFER, _native_pixels

    used = declined = 0
    folders = [p for p in sorted((data / "ct").iterdir()) + sorted((data / "mr").iterdir()) if p.is_dir()]
    folders += sorted(p for p in (data / "compressed").rglob("*") if p.is_dir())
    for folder in folders:
        for path in [f for f in sorted(folder.iterdir()) if f.is_file()][:2]:
            try:
                ds = pydicom.dcmread(path, defer_size=_DEFER)
            except Exception:  # noqa: BLE001 - not DICOM
                continue
            if "PixelData" not in ds:
                continue
            fast = _native_pixels(path, ds)
            if fast is None:
                declined += 1
                continue
            reference = pixel_array(pydicom.dcmread(path))
            assert fast.dtype == reference.dtype and np.array_equal(fast, reference), path
            assert ds.get_item(0x7FE00010, keep_deferred=True).value is None  # still not read
            used += 1
    assert used >= 6 and declined >= 2, (used, declined)


def test_pixels_are_not_read_from_a_file_replaced_since(tmp_path, data):
    """The instance sent again between reading its header and its pixels: the bytes at the
    old offset are not taken for pixels (the element header there is checked)."""
    from pacs_node.volume import _DEFER, _native_pixels

    src = sorted((data / "ct" / "vhf-head").iterdir())[0]
    path = tmp_path / "x.dcm"
    path.write_bytes(src.read_bytes())
    ds = pydicom.dcmread(path, defer_size=_DEFER)
    assert _native_pixels(path, ds) is not None
    again = pydicom.dcmread(src)
    again.ImageComments = "sent again, with a longer header"
    again.save_as(path)
    assert _native_pixels(path, ds) is None


def test_images_sharing_a_position_are_refused_with_the_reason(data, tmp_path):
    """A series holding two echoes (or b-values, phases) per position is not a volume: the
    loader says so instead of interleaving them as slices."""
    from pacs_node.errors import SeriesLoadError

    files = sorted((data / "mr" / "uih-t1-3d-sag").iterdir())[80:83]
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.save_as(tmp_path / f"e1-{i}.dcm")
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.EchoNumbers = 2
        ds.save_as(tmp_path / f"e2-{i}.dcm")
    with pytest.raises(SeriesLoadError, match=r"3 of 6 images share a position .* send one stack per series"):
        load_series(sorted(tmp_path.glob("*.dcm")))
    assert load_series(sorted(tmp_path.glob("e1-*.dcm"))).shape[0] == 3
