"""Volume loading: slice order from geometry, every compressed syntax, rescale to HU."""

import random

import numpy as np
import pydicom

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
