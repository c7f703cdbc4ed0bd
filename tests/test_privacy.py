"""Scenario: a full run at DEBUG log level with a patient whose name and ID are unmistakable,
then every log line, every audit row, the whole index database and the CLI outputs are
searched for them: neither appears anywhere but in the DICOM files themselves.

The run covers the paths that could leak: an accepted association with a stored series, a
completed series routed by rules (one of which looks at PatientID and fails, so its reason
is logged at DEBUG), a job run and delivered, a refused dataset, a rejected caller, and
`pacs-node rules test` / `jobs list`.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from conftest import NodeProcess, free_port, node_config, storescu, tool, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from crash_soak import synthetic_ct_series  # noqa: E402

# Distinctive values that occur in no shared test data header and in no code
NAME_FAMILY, NAME_GIVEN = "Quillfeather", "Zyxwvut"
PATIENT_ID = "PRIV7731QX"
NEEDLES = [NAME_FAMILY, NAME_GIVEN, PATIENT_ID]


def leaks(text: str) -> list[str]:
    return [n for n in NEEDLES if re.search(re.escape(n), text, re.IGNORECASE)]


def test_no_patient_name_or_id_in_logs_audit_or_index(tmp_path, storescp):
    series = synthetic_ct_series(tmp_path / "study", 4, 64, patient_name=f"{NAME_FAMILY}^{NAME_GIVEN}",
                                 patient_id=PATIENT_ID, description="privacy head")
    # one instance also has a malformed birth date made of the patient ID: pydicom's
    # validation warnings quote invalid values, so a node that let them through would log it
    odd = pydicom.dcmread(series[-1])
    odd.PatientBirthDate = PATIENT_ID
    odd.save_as(series[-1])
    assert str(pydicom.dcmread(series[0]).PatientName) == f"{NAME_FAMILY}^{NAME_GIVEN}"

    peers = [{"name": "modality", "ae_title": "STORESCU"},
             {"name": "viewer", "ae_title": "STORESCP", "host": "127.0.0.1", "port": storescp.port}]
    rules = [{"name": "ct", "when": "Modality == 'CT'", "pipeline": "ct-denoise-classical", "destinations": ["viewer"]},
             {"name": "by-patient", "when": "PatientID == 'someone-else' and contains(PatientName, 'Nobody')",
              "pipeline": "ct-denoise-classical", "destinations": ["viewer"]}]
    root = tmp_path / "node"
    root.mkdir()
    port = free_port()
    node = NodeProcess(root, node_config(port, peers, rules).replace('log_level = "INFO"', 'log_level = "DEBUG"'))
    try:
        node.start(port)
        assert storescu(node.port, *series).returncode == 0
        # a rejected caller and a refused dataset (no SOP Instance UID) of the same patient
        rejected = subprocess.run([tool("echoscu"), "-aet", "INTRUDER", "-aec", "PACSNODE", "127.0.0.1", str(port)],
                                  capture_output=True, text=True, timeout=60)
        assert rejected.returncode != 0
        bad = pydicom.dcmread(series[0])
        bad.SOPInstanceUID = "not/a/uid"
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
        status = assoc.send_c_store(bad)
        assoc.release()
        assert status.Status == 0xC000

        wait_for(lambda: len(storescp.files()) >= 4, 240, "4 results at storescp")
        wait_for(lambda: "done: last instance received" in node.log(), 60, "the job to be logged done")
        jobs = node.cli("jobs", "list")
        rules_test = node.cli("rules", "test", str(tmp_path / "study"), "--calling-aet", "STORESCU")
    finally:
        node.stop()

    log = node.log()
    assert " DEBUG " in log and "PatientID=<redacted>" in log  # DEBUG really was on, rule reasons included
    assert "rejected: calling AE title not recognized" in log
    assert "refused" in log
    assert "<redacted>" in rules_test.stdout + rules_test.stderr
    db = sqlite3.connect(root / "node.db")
    audit_rows = db.execute("select * from audit_event").fetchall()
    events = {r[2] for r in audit_rows}
    db.close()
    assert {"association-accepted", "association-rejected", "instances-received", "series-complete",
            "results-sent", "job-done"} <= events, events

    found = {
        "node log": leaks(log),
        "audit rows": leaks("\n".join(map(repr, audit_rows))),
        "jobs list": leaks(jobs.stdout + jobs.stderr),
        "rules test": leaks(rules_test.stdout + rules_test.stderr),
        "storescp log": leaks((storescp.root / "storescp.log").read_text(errors="replace")),
    }
    # the index database and its journal, byte for byte (patient rows hold only a hash)
    for f in root.glob("node.db*"):
        found[f.name] = leaks(f.read_bytes().decode("latin-1"))
    print(f"\n[privacy] searched {len(log.splitlines())} log lines, {len(audit_rows)} audit rows, "
          f"{sum(f.stat().st_size for f in root.glob('node.db*'))} bytes of database, the CLI outputs")
    assert not any(found.values()), found
    # while the stored instances of course still carry them
    stored = next((root / "storage" / "instances").rglob("*.dcm"))
    assert PATIENT_ID in str(pydicom.dcmread(stored).PatientID)
