"""Enhanced multi-frame input: a series that is one multi-frame image (Legacy Converted Enhanced
MR / CT, made from the shared single-frame series by highdicom's converter, the functional-group
encoding scanners use for Enhanced MR / CT) loads like its single frames, and every output kind
refers to the source's frames and adds no dciodvfy error.

Real scanners' Enhanced MR / CT (e.g. Siemens XA, Philips with enhanced export) use the same
Shared / Per-frame Functional Groups; none is among the shared data, hence the conversion."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from conftest import converted_enhanced as _converted, dciodvfy_errors, storescu, wait_for
from pacs_node.encode import EncodeContext, encode_outputs
from pacs_node.errors import EncodeError, SeriesLoadError
from pacs_node.models_dir import model_path
from pacs_node.pipelines.base import ScoreMap
from pacs_node.process import process_series
from pacs_node.volume import load_series

UIH = ("mr/uih-t1-3d-sag", slice(80, 86))
GE = ("ct/ge-head-tilt", slice(14, 20))


def _sources(data: Path, series: tuple[str, slice]) -> list[Path]:
    return sorted((data / series[0]).iterdir())[series[1]]


def _item(**values) -> pydicom.Dataset:
    item = pydicom.Dataset()
    for name, value in values.items():
        setattr(item, name, value)
    return item


def _as_enhanced(legacy: Path, out: Path) -> Path:
    """A Legacy Converted image re-labelled as Enhanced MR / CT, with its attributes where an
    Enhanced MR or CT scanner puts them: no Acquisition Matrix, Scanning Sequence, Echo Time
    or exposure values at the top level, but the MR (Echo Pulse Sequence, MR FOV/Geometry,
    Timing, Echo, Modifier, Cardiac Synchronization) or CT (X-Ray Details, Exposure) functional
    groups, frames typed VOLUME, a Real World Value Mapping and the scanner's own Derivation
    Image item per frame."""
    ds = pydicom.dcmread(legacy)
    mr = ds.Modality == "MR"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1." + ("4.1" if mr else "2.1")
    shared = ds.SharedFunctionalGroupsSequence[0]
    converted = shared.UnassignedSharedConvertedAttributesSequence[0]
    del shared.UnassignedSharedConvertedAttributesSequence
    if mr:
        shared.MRFOVGeometrySequence = [_item(InPlanePhaseEncodingDirection="ROW", MRAcquisitionFrequencyEncodingSteps=256,
                                              MRAcquisitionPhaseEncodingStepsInPlane=230)]
        shared.MRTimingAndRelatedParametersSequence = [_item(RepetitionTime=7.25, FlipAngle=10, EchoTrainLength=1)]
        shared.MREchoSequence = [_item(EffectiveEchoTime=3.1)]
        shared.MRModifierSequence = [_item(InversionRecovery="YES", InversionTimes=[750.0], PartialFourier="NO",
                                           ParallelAcquisition="NO")]
        for name, value in dict(EchoPulseSequence="GRADIENT", Spoiling="RF", SteadyStatePulseSequence="NONE",
                                SegmentedKSpaceTraversal="SINGLE", MRAcquisitionType="3D", OversamplingPhase="NONE",
                                EchoPlanarPulseSequence="NO", CardiacSynchronizationTechnique="PROSPECTIVE").items():
            setattr(ds, name, value)
        frame_type = "MRImageFrameTypeSequence"
    else:
        shared.CTXRayDetailsSequence = [_item(KVP=converted.KVP, FilterType="BODY")]
        shared.CTExposureSequence = [_item(ExposureTimeInms=1000.4, XRayTubeCurrentInmA=200.0, ExposureInmAs=200.2)]
        frame_type = "CTImageFrameTypeSequence"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    getattr(shared, frame_type)[0].FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    code = _item(CodeValue="1", CodingSchemeDesignator="UCUM", CodeMeaning="no units")
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        del frame.UnassignedPerFrameConvertedAttributesSequence
        frame.RealWorldValueMappingSequence = [_item(
            LUTExplanation="scanner units", LUTLabel="SCANNER", RealWorldValueFirstValueMapped=0,
            RealWorldValueLastValueMapped=4095, RealWorldValueIntercept=0.0, RealWorldValueSlope=1.5,
            MeasurementUnitsCodeSequence=[code])]
        frame.DerivationImageSequence = [_item(
            DerivationDescription="scanner reconstruction",
            DerivationCodeSequence=[_item(CodeValue="113076", CodingSchemeDesignator="DCM", CodeMeaning="Segmentation")],
            SourceImageSequence=[_item(ReferencedSOPClassUID=ds.SOPClassUID, ReferencedSOPInstanceUID="1.2.3.4",
                                       ReferencedFrameNumber=k + 1)])]
        if mr:
            frame.CardiacSynchronizationSequence = [_item(NominalCardiacTriggerDelayTime=350.0)]
    path = out / f"enhanced-{ds.Modality.lower()}.dcm"
    ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def enhanced(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("enhanced")
    return {"MR": _converted(_sources(data, UIH), root / "mr"), "CT": _converted(_sources(data, GE), root / "ct")}


@pytest.mark.parametrize("modality, series", [("MR", UIH), ("CT", GE)])
def test_a_multi_frame_image_loads_like_its_single_frames(modality, series, data, enhanced) -> None:
    single = load_series(_sources(data, series))
    multi = load_series([enhanced[modality]])
    assert multi.shape == single.shape
    np.testing.assert_array_equal(multi.array, single.array)  # HU for CT: rescale per frame applied
    np.testing.assert_allclose(multi.positions, single.positions, atol=1e-4)  # GE: tilted, uneven gaps
    np.testing.assert_allclose(multi.pixel_spacing, single.pixel_spacing)
    assert sorted(multi.frames) == list(range(1, len(single.datasets) + 1))
    whole = pydicom.dcmread(enhanced[modality])
    for k, frame in enumerate(multi.frames):  # each slice is the frame at its own position
        ipp = whole.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in ipp], multi.positions[k], atol=1e-4)
    assert {str(ds.SOPInstanceUID) for ds in multi.datasets} == {str(whole.SOPInstanceUID)}
    assert all("NumberOfFrames" not in ds and "PixelData" not in ds for ds in multi.datasets)


def _score(shape: tuple[int, int, int]) -> np.ndarray:
    z, rows, cols = shape
    yy, xx = np.mgrid[:rows, :cols]
    blob = np.exp(-((yy - 0.4 * rows) ** 2 + (xx - 0.5 * cols) ** 2) / (0.01 * rows ** 2)).astype(np.float32)
    return blob[None] * np.linspace(0.2, 1.0, z, dtype=np.float32)[:, None, None]  # each slice its own peak


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_overlay_pm_and_seg_of_a_multi_frame_source_refer_to_its_frames(modality, enhanced, tmp_path) -> None:
    volume = load_series([enhanced[modality]])
    whole = pydicom.dcmread(enhanced[modality])
    scores = _score(volume.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs = encode_outputs(volume, [ScoreMap(scores, "Anomaly map", 0.5)],
                                 ("secondary_capture", "parametric_map", "segmentation"),
                                 EncodeContext("anomaly-mr", "test"))
    n = volume.shape[0]
    assert [ds.SOPClassUID.name for ds in outputs] == ["Secondary Capture Image Storage"] * n + [
        "Parametric Map Storage", "Segmentation Storage"]
    for z, sc in enumerate(outputs[:n]):
        (ref,) = sc.SourceImageSequence
        assert (ref.ReferencedSOPInstanceUID, int(ref.ReferencedFrameNumber)) == (whole.SOPInstanceUID,
                                                                                    volume.frames[z])
    pm = outputs[n]
    assert int(pm.NumberOfFrames) == n
    slope = float(pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].RealWorldValueSlope)
    found = []
    for i, item in enumerate(pm.PerFrameFunctionalGroupsSequence):
        # each PM frame lies where one source slice lies and holds that slice's scores
        ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        (z,) = np.flatnonzero(np.abs(volume.positions - ipp).max(axis=1) < 1e-3)
        found.append(int(z))
        np.testing.assert_allclose(pm.pixel_array[i] * slope, scores[z], atol=1e-3)
    assert sorted(found) == list(range(n))
    assert volume.frames != sorted(volume.frames) and volume.frames != sorted(volume.frames, reverse=True)
    seg = outputs[n + 1]
    marked = []
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        # each SEG frame lies where one source slice lies, refers to that slice's frame and
        # holds its thresholded scores
        ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        (z,) = np.flatnonzero(np.abs(volume.positions - ipp).max(axis=1) < 1e-3)
        marked.append(int(z))
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert (ref.ReferencedSOPInstanceUID, int(ref.ReferencedFrameNumber)) == (whole.SOPInstanceUID,
                                                                                    volume.frames[z])
        np.testing.assert_array_equal(seg.pixel_array[i] if n > 1 else seg.pixel_array, scores[z] >= 0.5)
    assert sorted(marked) == [z for z in range(n) if scores[z].max() >= 0.5]
    source_errors = dciodvfy_errors(enhanced[modality])
    for i, ds in enumerate(outputs):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        new = dciodvfy_errors(path) - source_errors
        assert not new, f"{ds.SOPClassUID.name} from a multi-frame {modality} source adds dciodvfy errors: {new}"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_derived_series_of_a_multi_frame_ct_is_classic_ct_with_the_frames_geometry(data, enhanced, tmp_path) -> None:
    """ct-denoise-classical on the Enhanced CT gives what it gives on the single frames, as
    single-frame CT images at the frames' positions, each referring to its frame."""
    single, _ = process_series(_sources(data, GE), "ct-denoise-classical", {})
    multi, _ = process_series([enhanced["CT"]], "ct-denoise-classical", {})
    whole = pydicom.dcmread(enhanced["CT"])
    assert len(multi) == len(single) == int(whole.NumberOfFrames)
    source_errors = dciodvfy_errors(enhanced["CT"])
    by_position = {tuple(round(float(v), 3) for v in ds.ImagePositionPatient): ds for ds in single}
    for i, ds in enumerate(multi):
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        assert "NumberOfFrames" not in ds and "PerFrameFunctionalGroupsSequence" not in ds
        (ref,) = ds.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == whole.SOPInstanceUID
        frame = whole.PerFrameFunctionalGroupsSequence[int(ref.ReferencedFrameNumber) - 1]
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient], abs=1e-4)
        twin = by_position[tuple(round(float(v), 3) for v in ds.ImagePositionPatient)]
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, twin.pixel_array * float(twin.RescaleSlope) + float(twin.RescaleIntercept))
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        new = dciodvfy_errors(path) - source_errors
        assert not new, f"derived CT from a multi-frame source adds dciodvfy errors: {new}"


def test_multi_frame_images_the_loader_cannot_place_are_refused_with_the_reason(data, enhanced, tmp_path) -> None:
    # several frames at one position (echoes, phases): frame 2 moved onto frame 1
    whole = pydicom.dcmread(enhanced["MR"])
    groups = whole.PerFrameFunctionalGroupsSequence
    groups[1].PlanePositionSequence[0].ImagePositionPatient = groups[0].PlanePositionSequence[0].ImagePositionPatient
    dup = tmp_path / "dup.dcm"
    whole.save_as(dup)
    with pytest.raises(SeriesLoadError, match="share a position"):
        load_series([dup])
    # a multi-frame image without functional groups has no position per frame
    ds = pydicom.dcmread(_sources(data, UIH)[0])
    frame = ds.pixel_array
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([frame, frame]).tobytes()
    plain = tmp_path / "plain.dcm"
    ds.save_as(plain)
    with pytest.raises(SeriesLoadError, match="without per-frame functional groups"):
        load_series([plain])
    # frames in two orientations (a localiser): one frame's orientation changed
    whole = pydicom.dcmread(enhanced["MR"])
    item = whole.PerFrameFunctionalGroupsSequence[0]
    item.PlaneOrientationSequence = [pydicom.Dataset()]
    item.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    mixed = tmp_path / "mixed.dcm"
    whole.save_as(mixed)
    with pytest.raises(SeriesLoadError, match="orientation differs"):
        load_series([mixed])


def test_pacs_node_run_on_a_multi_frame_mr_gives_overlays(enhanced, tmp_path) -> None:
    """The offline command on a folder holding one Enhanced-style MR image: one overlay per frame."""
    if not model_path("anomaly-mr").exists():
        pytest.skip("anomaly-mr weights not trained")
    out = tmp_path / "out"
    run = subprocess.run([str(Path(sys.executable).parent / "pacs-node"), "run", "anomaly-mr", str(enhanced["MR"].parent), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    results = [pydicom.dcmread(p) for p in sorted(out.glob("*.dcm"))]
    frames = int(pydicom.dcmread(enhanced["MR"]).NumberOfFrames)
    kinds = sorted(ds.SOPClassUID.name for ds in results)
    assert kinds == ["Parametric Map Storage"] + ["Secondary Capture Image Storage"] * frames
    assert sorted(int(ds.SourceImageSequence[0].ReferencedFrameNumber) for ds in results
                  if "SourceImageSequence" in ds and ds.Modality == "OT" and "NumberOfFrames" not in ds) == \
        list(range(1, frames + 1))


def test_a_multi_frame_mr_sent_with_storescu_comes_back_as_overlays(node_factory, storescp, enhanced) -> None:
    """DCMTK storescu sends the multi-frame MR to the node; its anomaly rule's overlays and PM
    reach a DCMTK storescp, each overlay referring to its frame."""
    if not model_path("anomaly-mr").exists():
        pytest.skip("anomaly-mr weights not trained")
    peers = [{"name": "modality", "ae_title": "STORESCU"},
             {"name": "viewer", "ae_title": "STORESCP", "host": "127.0.0.1", "port": storescp.port}]
    rules = [{"name": "anomaly", "when": "Modality == 'MR'", "pipeline": "anomaly-mr", "destinations": ["viewer"]}]
    node = node_factory(peers, rules)
    sent = storescu(node.port, enhanced["MR"], extra=("-R",))  # -R: its SOP class is not in storescu's default list
    assert sent.returncode == 0, sent.stderr
    frames = int(pydicom.dcmread(enhanced["MR"]).NumberOfFrames)
    wait_for(lambda: len(storescp.files()) >= frames + 1, 240, f"{frames + 1} results at storescp")
    results = [pydicom.dcmread(p) for p in storescp.files()]
    overlays = [ds for ds in results if ds.SOPClassUID.name == "Secondary Capture Image Storage"]
    assert sorted(int(ds.SourceImageSequence[0].ReferencedFrameNumber) for ds in overlays) == \
        list(range(1, frames + 1))
    assert sum(ds.SOPClassUID.name == "Parametric Map Storage" for ds in results) == 1
    # the node logs the job's end after the last result is acknowledged, i.e. after storescp has it
    wait_for(lambda: re.search(r"job 1 done: last instance received -> last result acknowledged", node.log()),
             30, "the job's done line in the node log")


def test_evaluation_commands_take_a_multi_frame_series(enhanced, tmp_path, capsys) -> None:
    """Another site's export may be Enhanced MR: the external evaluations read it (mr-superres
    at the acquired matrix the converted header states, ct-denoise on a tilted Enhanced CT, anomaly-mr
    every 2nd frame)."""
    import json

    from pacs_node.ml import anomaly_mr, mr_superres

    out = tmp_path / "sr.json"
    assert mr_superres.eval_main(["--data", str(enhanced["MR"].parent), "--max-slices", "6", "--threads", "2",
                                  "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["series"][0]["results"]}
    assert rows["zero-fill (sinc)"]["n_slices"] == 6
    assert "256x230 at 1.00x1.00 mm, acquired matrix of a 512x460 reconstruction" in capsys.readouterr().out
    from pacs_node.ml import ct_denoise_eval

    out = tmp_path / "ct.json"
    assert ct_denoise_eval.eval_main(["--data", str(enhanced["CT"].parent), "--max-slices", "2", "--skip", "bm3d,model",
                                      "--cache", str(tmp_path / "cache"), "--json", str(out)]) == 0
    (series,) = json.loads(out.read_text())["series"]
    assert series["slices_total"] == 6 and len(series["slices_evaluated"]) == 2
    metrics = series["metrics"]  # a real simulation: the classical filter lowers the added noise
    assert metrics["classical"]["rmse_hu"] < metrics["low-dose"]["rmse_hu"]
    if model_path("anomaly-mr").exists():
        out = tmp_path / "an.json"
        assert anomaly_mr.eval_main(["--data", str(enhanced["MR"].parent), "--seed", "5", "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["slices"] == 3 and "sagittal, 3 of 6 slices" in result["data"]


def test_a_series_of_two_multi_frame_images(data, tmp_path) -> None:
    """Two Enhanced-style images of one series (a scanner splitting a stack): one volume; the
    overlays refer to each image's frames; a Parametric Map, which highdicom builds from one
    multi-frame source, is refused with the reason."""
    files = _sources(data, UIH)
    uid = hd.UID()
    parts = [_converted(files[:3], tmp_path / "a", series_uid=uid), _converted(files[3:], tmp_path / "b", series_uid=uid)]
    volume = load_series(parts)
    np.testing.assert_array_equal(volume.array, load_series(files).array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        overlays = encode_outputs(volume, [ScoreMap(_score(volume.shape), "Anomaly map")], ("secondary_capture",),
                                  EncodeContext("anomaly-mr", "test"))
        refs = {(str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID),
                 int(ds.SourceImageSequence[0].ReferencedFrameNumber)) for ds in overlays}
        assert refs == {(str(pydicom.dcmread(p).SOPInstanceUID), f) for p in parts for f in (1, 2, 3)}
        with pytest.raises(EncodeError, match="several images"):
            encode_outputs(volume, [ScoreMap(_score(volume.shape), "Anomaly map")], ("parametric_map",),
                           EncodeContext("anomaly-mr", "test"))


def _classic_errors(errors: set[str]) -> set[str]:
    return {re.sub(r" Module=<[^>]*>", "", e) for e in errors}  # module names differ between IODs


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_derived_mr_of_an_enhanced_mr_has_the_classic_mr_attributes(data, enhanced, tmp_path) -> None:
    from pacs_node.ml import kspace
    from pacs_node.pipelines.base import DerivedVolume

    volume = load_series([_as_enhanced(enhanced["MR"], tmp_path)])
    assert kspace.acquisition_shape(volume.datasets[0]) == (256, 230)
    (derived_ds, *rest) = encode_outputs(volume, [DerivedVolume(volume.array, "copy")], ("derived",),
                                         EncodeContext("mr-superres", "test"))
    assert len(rest) == volume.shape[0] - 1
    assert derived_ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    assert list(derived_ds.ScanningSequence) == ["GR", "IR"] and derived_ds.SequenceVariant == "SP"
    assert (float(derived_ds.EchoTime), float(derived_ds.RepetitionTime)) == (3.1, 7.25)
    assert (float(derived_ds.InversionTime), float(derived_ds.TriggerTime)) == (750.0, 350.0)
    assert derived_ds.ScanOptions == "CG"  # cardiac gated: the trigger time belongs
    assert list(derived_ds.ImageType) == ["DERIVED", "SECONDARY", "VOLUME", "NONE"]  # the frame's type
    # groups that are attributes stay sequences; the scanner's derivation is not the result's
    assert derived_ds.RealWorldValueMappingSequence[0].RealWorldValueSlope == 1.5
    assert len(derived_ds.ReferencedImageSequence) == 3  # the localisers the converter found
    assert "ReferencedSOPInstanceUID" not in derived_ds and "DerivationCodeSequence" not in derived_ds
    path = tmp_path / "derived.dcm"
    derived_ds.save_as(path, enforce_file_format=True)
    # no error that the same image sent as classic MR (the shared single-frame file) does not have
    classic = set().union(*(_classic_errors(dciodvfy_errors(p)) for p in _sources(data, UIH)))
    new = _classic_errors(dciodvfy_errors(path)) - classic
    assert not new, f"derived MR of an Enhanced MR adds dciodvfy errors: {new}"
    # an Echo Planar, steady-state, phase-oversampled sequence: EP, SS and OSP as emf2sf says
    ds = pydicom.dcmread(path.parent / "enhanced-mr.dcm")
    ds.EchoPlanarPulseSequence, ds.SteadyStatePulseSequence, ds.OversamplingPhase = "YES", "TIME_REVERSED", "2D"
    ds.save_as(tmp_path / "epi.dcm")
    (epi, *_) = encode_outputs(load_series([tmp_path / "epi.dcm"]), [DerivedVolume(volume.array, "copy")],
                               ("derived",), EncodeContext("mr-superres", "test"))
    assert list(epi.ScanningSequence) == ["GR", "IR", "EP"] and list(epi.SequenceVariant) == ["TRSS", "SP", "OSP"]
    for technique, options in (("GATING", ["CG", "RG"]), ("PHASE_ORDERING", ["CG", "PER"]), ("BREATH_HOLD", ["CG"])):
        ds.RespiratoryMotionCompensationTechnique = technique
        ds.save_as(tmp_path / "resp.dcm")
        (resp, *_) = encode_outputs(load_series([tmp_path / "resp.dcm"]), [DerivedVolume(volume.array, "copy")],
                                    ("derived",), EncodeContext("mr-superres", "test"))
        assert resp["ScanOptions"].VM == len(options) and \
            (list(resp.ScanOptions) if len(options) > 1 else [resp.ScanOptions]) == options, technique


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_derived_ct_of_an_enhanced_ct_has_the_classic_ct_attributes(data, enhanced, tmp_path) -> None:
    from pacs_node.pipelines.base import DerivedVolume

    volume = load_series([_as_enhanced(enhanced["CT"], tmp_path)])
    outputs = encode_outputs(volume, [DerivedVolume(volume.array, "copy")], ("derived",),
                             EncodeContext("ct-denoise", "test"))
    classic = set().union(*(_classic_errors(dciodvfy_errors(p)) for p in _sources(data, GE)))
    for i, ds in enumerate(outputs):
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        assert (int(ds.ExposureTime), int(ds.XRayTubeCurrent), int(ds.Exposure)) == (1000, 200, 200)
        assert int(ds.ExposureInuAs) == 200200  # the exact value: whole mAs round low doses away
        assert "ExposureTimeInms" not in ds and "XRayTubeCurrentInmA" not in ds and "ExposureInmAs" not in ds
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL", "NONE"]  # CT Image: AXIAL, not VOLUME
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        new = _classic_errors(dciodvfy_errors(path)) - classic
        assert not new, f"derived CT of an Enhanced CT adds dciodvfy errors: {new}"


def test_the_same_instance_twice_is_read_once(data, enhanced, tmp_path) -> None:
    """An export with copies (the same SOP Instance in two files, single- or multi-frame)."""
    files = _sources(data, UIH)[:3]
    copy = tmp_path / "copy.dcm"
    shutil.copy(files[0], copy)
    assert load_series([*files, copy]).shape[0] == 3
    shutil.copy(enhanced["MR"], tmp_path / "enhanced-copy.dcm")
    assert load_series([enhanced["MR"], tmp_path / "enhanced-copy.dcm"]).shape[0] == 6
    # one UID on two different images is not a copy: refused, not one of them silently dropped
    other = pydicom.dcmread(files[2])
    other.SOPInstanceUID = pydicom.dcmread(files[0]).SOPInstanceUID
    other.save_as(tmp_path / "clash.dcm")
    with pytest.raises(SeriesLoadError, match="carry one SOP Instance UID but are different images"):
        load_series([*files[:2], tmp_path / "clash.dcm"])


def test_web_preview_pairs_the_middle_frame_with_its_overlay(enhanced, tmp_path) -> None:
    """The web console shows a multi-frame source's middle frame; the result shown beside it
    is the overlay of that frame, not of frame 1."""
    from pacs_node.web.thumbnails import result_for

    volume = load_series([enhanced["MR"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        overlays = encode_outputs(volume, [ScoreMap(_score(volume.shape), "Anomaly map")], ("secondary_capture",),
                                  EncodeContext("anomaly-mr", "test"))
    paths = []
    for i, ds in enumerate(overlays):
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    source = pydicom.dcmread(enhanced["MR"], stop_before_pixels=True)
    chosen = pydicom.dcmread(result_for(source, paths))
    assert int(chosen.SourceImageSequence[0].ReferencedFrameNumber) == int(source.NumberOfFrames) // 2 + 1


def test_web_preview_of_an_enhanced_ct_is_in_hounsfield_units(data, enhanced, tmp_path) -> None:
    """Rescale and window of an Enhanced image live in its functional groups: the preview's
    middle frame is in HU and windowed like the same slice sent single-frame."""
    from pacs_node.web.thumbnails import _middle_frame, _plane, window_of

    whole = pydicom.dcmread(_as_enhanced(enhanced["CT"], tmp_path))
    plane = _plane(whole)
    frame = int(whole.NumberOfFrames) // 2 + 1
    position = whole.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0].ImagePositionPatient
    twin = next(ds for ds in map(pydicom.dcmread, _sources(data, GE)) if ds.ImagePositionPatient == position)
    np.testing.assert_array_equal(plane, twin.pixel_array * float(twin.RescaleSlope) + float(twin.RescaleIntercept))
    assert window_of(_middle_frame(whole), plane) == window_of(twin, plane)


def test_a_compressed_multi_frame_image_loads_like_the_uncompressed_one(enhanced, tmp_path) -> None:
    """Frames of an encapsulated (RLE Lossless) multi-frame image, decoded once per image."""
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(enhanced["MR"])
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm")
    compressed = load_series([tmp_path / "rle.dcm"])
    assert pydicom.dcmread(tmp_path / "rle.dcm").file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(compressed.array, load_series([enhanced["MR"]]).array)
