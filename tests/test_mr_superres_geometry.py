"""Where the super-resolved pixels really are vs where their DICOM header says they are.

Degrade held-out UIH slices (ground truth at the acquired 1 mm resolution), run the
mr-superres pipeline, encode the derived series, then register the output's content against the
ground truth with sub-pixel phase correlation and compare with the offset its
ImagePositionPatient / PixelSpacing give: they must agree within 0.1 pixel.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from skimage.registration import phase_cross_correlation

from pacs_node.ml import kspace
from pacs_node.ml.mr_superres import HELDOUT_UIH, load_uih_truth
from pacs_node.models_dir import model_path
from pacs_node.volume import Volume

pytestmark = pytest.mark.skipif(not model_path("mr-superres").exists(), reason="mr-superres weights not installed")

TOL_PX = 0.1


@pytest.fixture(scope="module")
def uih():
    try:
        truth, spacing, vol = load_uih_truth()
    except FileNotFoundError as exc:  # shared data not present on this machine
        pytest.skip(str(exc))
    return truth, spacing, vol


@pytest.fixture(scope="module")
def pipeline():
    from pacs_node.pipelines.mr_superres import MrSuperres

    return MrSuperres()


def _position(ipp, row_dir, col_dir, spacing, r, c):
    """Patient position of pixel (row r, column c): IPP + c*dc*row_dir + r*dr*col_dir."""
    return np.asarray(ipp) + c * spacing[1] * np.asarray(row_dir) + r * spacing[0] * np.asarray(col_dir)


def _encode(volume, derived):
    from pacs_node.encode import EncodeContext
    from pacs_node.encode.derived import encode_derived

    return encode_derived(volume, derived, EncodeContext(pipeline="mr-superres", version="test"))


def _lr_volume(src: Volume, idx, array, positions, spacing, thickness=None) -> Volume:
    datasets = [copy.deepcopy(src.datasets[i]) for i in idx]
    for ds in datasets:
        if thickness is not None:
            ds.SliceThickness = thickness
    return Volume(array=np.ascontiguousarray(array, dtype=np.float32), positions=np.asarray(positions),
                  row_direction=src.row_direction, column_direction=src.column_direction,
                  pixel_spacing=spacing, datasets=datasets)


def _inplane_offsets(uih, pipeline, scale, upsampler=None):
    truth, spacing, src = uih
    idx = [HELDOUT_UIH[0] + 18, HELDOUT_UIH[0] + 20]  # held-out slices, inside the brain
    gt, (oy, ox) = kspace.crop_to_multiple(truth[idx], scale)
    gt_ipp = [_position(src.positions[i], src.row_direction, src.column_direction, spacing, oy, ox) for i in idx]
    lr = kspace.degrade_inplane(gt, scale)
    lr_vol = _lr_volume(src, idx, lr, gt_ipp, (spacing[0] * scale, spacing[1] * scale))
    if upsampler is None:
        derived = pipeline.run(lr_vol, {"scale": scale})[0]
    else:  # a deliberately wrong resampler with the k-space header, to show the test can fail
        from pacs_node.pipelines.base import DerivedVolume

        derived = DerivedVolume(array=upsampler(lr), description="control", positions=np.asarray(gt_ipp),
                                pixel_spacing=(spacing[0], spacing[1]))
    encoded = _encode(lr_vol, derived)
    errors = []
    for k, ds in enumerate(encoded):
        out = derived.array[k]
        assert (int(ds.Rows), int(ds.Columns)) == out.shape == gt[k].shape
        ps = [float(v) for v in ds.PixelSpacing]
        assert np.allclose(ps, spacing, atol=1e-6)
        # header: where output pixel (0, 0) lies, in ground-truth pixels
        d = np.asarray([float(v) for v in ds.ImagePositionPatient]) - gt_ipp[k]
        header = np.array([d @ src.column_direction / spacing[0], d @ src.row_direction / spacing[1]])
        # content: shift that moves the output onto the ground truth (out[i] == gt[i + shift])
        measured, _, _ = phase_cross_correlation(gt[k], out, upsample_factor=100, normalization=None)
        errors.append(np.abs(measured - header))
    return np.max(errors)


@pytest.mark.parametrize("scale", [2, 4])
def test_inplane_output_lies_where_header_says(uih, pipeline, scale):
    assert _inplane_offsets(uih, pipeline, scale) <= TOL_PX


def test_registration_detects_half_pixel_convention(uih, pipeline):
    """Block-centred resize (skimage) under the same header is caught: the check has teeth."""
    from skimage.transform import resize

    def block_centred(lr):
        return np.stack([resize(s, (s.shape[0] * 2, s.shape[1] * 2), order=3, mode="edge") for s in lr])

    assert _inplane_offsets(uih, pipeline, 2, block_centred) > 0.3


def test_through_plane_output_lies_where_header_says(uih, pipeline):
    truth, spacing, src = uih
    scale = 2
    idx = list(range(HELDOUT_UIH[0] + 8, HELDOUT_UIH[0] + 33))  # 25 held-out thin slices
    oy, ox = 64, 50  # a central 128 x 128 field of view keeps the test fast
    gt = truth[idx, oy:oy + 128, ox:ox + 128]
    lr = kspace.degrade_through(gt, scale, axis=0)
    lr_idx = idx[::scale]
    lr_pos = [_position(src.positions[i], src.row_direction, src.column_direction, spacing, oy, ox) for i in lr_idx]
    gt_pos = np.array([_position(src.positions[i], src.row_direction, src.column_direction, spacing, oy, ox)
                       for i in idx])
    lr_vol = _lr_volume(src, lr_idx, lr, lr_pos, spacing, thickness=2.0)
    derived = pipeline.run(lr_vol, {"scale": scale, "axis": "through"})[0]
    assert derived.array.shape == gt.shape
    encoded = _encode(lr_vol, derived)
    assert len(encoded) == len(idx)
    normal = src.normal
    step = float(np.median(np.diff(src.positions[idx] @ normal)))
    assert abs(float(encoded[0].SliceThickness) - 1.0) < 1e-6
    ipps = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in encoded])
    for ds in encoded:
        assert [float(v) for v in ds.ImageOrientationPatient] == [float(v) for v in src.datasets[0].ImageOrientationPatient]
    # header: each output slice's offset from the ground-truth slice of the same index, in slices
    header = (ipps - gt_pos) @ normal / step
    assert np.max(np.abs(header)) < 1e-3  # interpolated positions land on the thin-slice grid
    in_plane = (ipps - gt_pos) - np.outer((ipps - gt_pos) @ normal, normal)
    assert np.max(np.abs(in_plane)) < 1e-3
    # content: 3-D sub-pixel registration of the output stack onto the ground-truth stack
    inner = slice(2, len(idx) - 2)
    measured, _, _ = phase_cross_correlation(gt[inner], derived.array[inner], upsample_factor=100,
                                             normalization=None)
    assert abs(measured[0] - float(np.mean(header))) <= TOL_PX
    assert np.all(np.abs(measured[1:]) <= TOL_PX)
