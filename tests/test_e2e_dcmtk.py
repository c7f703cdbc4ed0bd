"""Scenario: a modality (DCMTK storescu) sends real CT to the node; results reach a DCMTK storescp."""

from __future__ import annotations

import re
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from conftest import associate_noting_rejection, dciodvfy_errors, storescu, tool, wait_for

PEERS = lambda scp_port: [  # noqa: E731
    {"name": "modality", "ae_title": "STORESCU"},
    {"name": "viewer", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp_port},
]
RULES = [{"name": "ct-denoise", "when": "Modality == 'CT'", "pipeline": "ct-denoise-classical", "destinations": ["viewer"]}]


def test_ct_series_and_compressed_file_come_back_denoised(node_factory, storescp, ge_head, data):
    node = node_factory(PEERS(storescp.port), RULES)
    sources = sorted(ge_head.glob("*.dcm"))
    sent = storescu(node.port, ge_head)
    assert sent.returncode == 0, sent.stderr
    # JPEG-LS near-lossless (WG04): the node must accept the compressed syntax and decode it
    jls = data / "compressed" / "transfer-syntaxes" / "wg04" / "CT1_JLSN.dcm"
    sent = storescu(node.port, jls, extra=("-xu",))
    assert sent.returncode == 0, sent.stderr

    wait_for(lambda: len(storescp.files()) >= len(sources) + 1, 240, "29 result instances at storescp")
    results = [pydicom.dcmread(p) for p in storescp.files()]
    assert len(results) == len(sources) + 1

    by_series: dict[str, list[pydicom.Dataset]] = {}
    for ds in results:
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    src0 = pydicom.dcmread(sources[0])
    head_results = next(v for v in by_series.values() if v[0].StudyInstanceUID == src0.StudyInstanceUID)
    assert len(head_results) == len(sources)
    src_by_uid = {pydicom.dcmread(p).SOPInstanceUID: p for p in sources}
    for ds in head_results:
        assert ds.SeriesInstanceUID != src0.SeriesInstanceUID
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "ct-denoise-classical" in ds.SeriesDescription
        assert "ct-denoise-classical" in ds.DerivationDescription
        ref = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        src = pydicom.dcmread(src_by_uid[ref])
        # geometry and calibration preserved
        assert ds.ImagePositionPatient == src.ImagePositionPatient
        assert ds.PixelSpacing == src.PixelSpacing
        assert (ds.RescaleSlope, ds.RescaleIntercept) == (src.RescaleSlope, src.RescaleIntercept)
        # a soft-tissue region keeps its mean HU within a few HU, and noise went down
        hu_out = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        hu_src = src.pixel_array * float(src.RescaleSlope) + float(src.RescaleIntercept)
        roi = (slice(236, 276), slice(236, 276))
        assert abs(hu_out[roi].mean() - hu_src[roi].mean()) < 5.0
    mid = len(head_results) // 2
    ds = sorted(head_results, key=lambda d: int(d.InstanceNumber))[mid]
    src = pydicom.dcmread(src_by_uid[ds.SourceImageSequence[0].ReferencedSOPInstanceUID])
    tissue = (src.pixel_array * float(src.RescaleSlope) + float(src.RescaleIntercept))
    mask = (tissue > 0) & (tissue < 80)
    out_hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.std(np.diff(out_hu, axis=1)[mask[:, 1:]]) < np.std(np.diff(tissue, axis=1)[mask[:, 1:]])

    # no dciodvfy error in the results that the source did not already have
    for ds_path in storescp.files():
        out = pydicom.dcmread(ds_path)
        ref = out.SourceImageSequence[0].ReferencedSOPInstanceUID
        src_path = src_by_uid.get(ref, jls)
        new = dciodvfy_errors(ds_path) - dciodvfy_errors(src_path)
        assert not new, f"{ds_path.name}: new dciodvfy errors {new}"

    # the log tells, per job, the time from last instance received to last result acknowledged
    log = node.log()
    latencies = re.findall(r"job \d+ done: last instance received -> last result acknowledged ([\d.]+) s", log)
    assert len(latencies) == 2, log
    assert "Eve" not in log and "Jane_Doe" not in log


def test_resent_instance_replaces_without_duplicate(node_factory, storescp, ge_head):
    node = node_factory(PEERS(storescp.port), [])
    files = sorted(ge_head.glob("*.dcm"))[:3]
    assert storescu(node.port, *files).returncode == 0
    assert storescu(node.port, files[0]).returncode == 0
    db = sqlite3.connect(node.root / "node.db")
    rows = db.execute("select count(*), count(distinct sop_uid) from instance").fetchone()
    series_count = db.execute("select instance_count from series").fetchall()
    assert rows == (3, 3)
    assert series_count == [(3,)]
    stored = list((node.root / "storage" / "instances").rglob("*.dcm"))
    assert len(stored) == 3
    # no partly written temp file (the empty ones are made ahead of the next instance)
    assert all(p.stat().st_size == 0 for p in (node.root / "storage").rglob("*.partial"))


def test_unknown_caller_rejected_and_bad_dataset_refused_while_node_keeps_serving(node_factory, storescp, data):
    node = node_factory(PEERS(storescp.port), RULES)
    # unknown calling AE: association rejected, reason "calling AE title not recognized"
    echo = subprocess.run([tool("echoscu"), "-aet", "INTRUDER", "-aec", "PACSNODE", "127.0.0.1", str(node.port)],
                          capture_output=True, text=True, timeout=30)
    assert echo.returncode != 0
    assert "Calling AE Title Not Recognized" in echo.stdout + echo.stderr
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc, rejection = associate_noting_rejection(ae, "127.0.0.1", node.port, ae_title="PACSNODE")
    assert not assoc.is_established and rejection is not None
    assert rejection.reason_diagnostic == 0x03

    # a real file whose dataset has empty Study/Series/SOP UIDs (de-identification damage)
    damaged = sorted((data / "ct" / "abdomen-j2k").glob("*"))[0]
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, [JPEG2000Lossless, ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    assert assoc.is_established
    ds = pydicom.dcmread(damaged)
    assert not ds.StudyInstanceUID and not ds.SOPInstanceUID
    # a sender fills the request from the file meta; Study and Series UIDs stay empty
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC000
    assert "InstanceUID is missing or empty" in str(status.get("ErrorComment", ""))

    # a UID that tries to climb out of the storage folder: failure status, nothing written
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    bad = pydicom.Dataset()
    bad.SOPClassUID = CTImageStorage
    bad.SOPInstanceUID = "1.2.3.4"
    bad.StudyInstanceUID = "1.2.3"
    bad.SeriesInstanceUID = "../../etc"
    bad.file_meta = pydicom.dataset.FileMetaDataset()
    bad.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    status = assoc.send_c_store(bad)
    assoc.release()
    assert status.Status == 0xC000

    # still serving
    echo = subprocess.run([tool("echoscu"), "-aet", "STORESCU", "-aec", "PACSNODE", "127.0.0.1", str(node.port)],
                          capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    assert not list((node.root / "storage" / "instances").rglob("*.dcm"))
    assert not (Path("/etc") / "1.2.3.4.dcm").exists()


def test_destination_down_then_retry_delivers(node_factory, storescp, ge_head):
    scp_port = storescp.port
    storescp.stop()  # destination down
    node = node_factory(PEERS(scp_port), RULES)
    files = sorted(ge_head.glob("*.dcm"))[:2]
    assert storescu(node.port, *files).returncode == 0

    def job_state() -> str | None:
        out = node.cli("jobs", "list").stdout
        m = re.search(r"^\s+(\d+)\s+(\w+)\s+ct-denoise-classical", out, re.M)
        return m and m.group(2) == "failed" and m.group(1)

    job_id = wait_for(job_state, 120, "the job to fail after its retries")
    listing = node.cli("jobs", "list").stdout
    assert "attempt 3" in listing and "failed" in listing
    assert node.log().count("delivery to viewer failed") >= 3

    storescp.start()  # destination back
    out = node.cli("jobs", "retry", str(job_id)).stdout
    assert "resending" in out
    wait_for(lambda: len(storescp.files()) == 2, 60, "the retried delivery")
    wait_for(lambda: re.search(rf"^\s+{job_id}\s+done", node.cli("jobs", "list").stdout, re.M), 120, "job done")
