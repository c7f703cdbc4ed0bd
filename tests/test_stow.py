"""Scenario: a peer uploads a CT series over DICOMweb STOW-RS instead of C-STORE.

The instances are stored exactly as sent, the series completes, the rule's job runs and the
result reaches the viewer; sending the same series again by C-STORE gives the same results
(same UIDs, same pixels), so both doors lead to the same path. Uploads without the peer's
token, from a host the peer may not call from, or into the wrong study are refused.
"""

from __future__ import annotations

import sqlite3

import pydicom
import requests

from conftest import storescu, wait_for
from websupport import marked_series, multipart_related, phi_found, web_node  # noqa: F401

TOKEN = "modality-stow-token-2a7c"
SLICES = 3


def stow(base: str, body: bytes, content_type: str, token: str | None = TOKEN, study: str = "") -> requests.Response:
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{base}/dicomweb/studies" + (f"/{study}" if study else "")
    return requests.post(url, data=body, headers=headers, timeout=120)


def test_stow_rs_upload_is_processed_like_c_store(web_node, storescp, ge_head, tmp_path):  # noqa: F811
    peers = [{"name": "modality", "ae_title": "STORESCU", "stow_token": TOKEN},
             {"name": "ward", "ae_title": "WARD", "stow_token": "ward-token-from-elsewhere", "allowed_hosts": ["10.9.9.9"]},
             {"name": "viewer", "ae_title": "STORESCP", "host": "127.0.0.1", "port": storescp.port}]
    rules = [{"name": "ct-denoise", "when": "Modality == 'CT' and CallingAETitle == 'STORESCU'",
              "pipeline": "ct-denoise-classical", "destinations": ["viewer"]}]
    node = web_node(peers, rules)
    base = f"http://127.0.0.1:{node.http_port}"
    files = marked_series(ge_head, tmp_path / "series", SLICES)
    body, content_type = multipart_related(files)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)

    # refused: no token, a token from a host the peer may not call from, the wrong study
    assert stow(base, body, content_type, token=None).status_code == 401
    assert stow(base, body, content_type, token="not-a-token-of-anyone").status_code == 401
    assert stow(base, body, content_type, token="ward-token-from-elsewhere").status_code == 403
    wrong = stow(base, body, content_type, study="1.2.3.4")
    assert wrong.status_code == 409
    assert [item["00081197"]["Value"][0] for item in wrong.json()["00081198"]["Value"]] == [0xC409] * SLICES
    bad_body, bad_type = multipart_related([b"this is not DICOM"])
    bad = stow(base, bad_body, bad_type)
    assert bad.status_code == 409 and bad.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert stow(base, body, "application/json").status_code == 415

    # accepted: every instance referenced in the response, stored byte for byte as sent
    response = stow(base, body, content_type, study=study_uid)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    referenced = {item["00081155"]["Value"][0] for item in response.json()["00081199"]["Value"]}
    sources = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in files}
    assert referenced == set(sources)
    for sop_uid, source in sources.items():
        stored = next((node.root / "storage" / "instances").rglob(f"{sop_uid}.dcm"))
        assert stored.read_bytes() == source.read_bytes()

    # completion, routing (CallingAETitle is the token's peer), job, delivery
    wait_for(lambda: len(storescp.files()) == SLICES, 180, "the STOW-RS series' results at the viewer")
    via_stow = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, storescp.files())}
    db = sqlite3.connect(node.root / "node.db")
    assert db.execute("select calling_ae, completed_by from series").fetchall() == [("STORESCU", "quiet")]

    # the same series by C-STORE: the series reopens, the job runs again, same results
    for f in storescp.files():
        f.unlink()
    sent = storescu(node.port, *files)
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: db.execute("select count(*) from job where state = 'done'").fetchone()[0] == 2, 180,
             "the C-STORE job to be done")
    wait_for(lambda: len(storescp.files()) == SLICES, 30, "the C-STORE series' results at the viewer")
    via_dimse = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, storescp.files())}
    assert set(via_dimse) == set(via_stow)
    for uid, ds in via_dimse.items():
        assert ds.PixelData == via_stow[uid].PixelData
        assert ds.SeriesInstanceUID == via_stow[uid].SeriesInstanceUID
    received = db.execute("select count from audit_event where event = 'instances-received' and count > 0").fetchall()
    assert received == [(SLICES,), (SLICES,)]  # one STOW-RS request, one association
    assert db.execute("select count(*) from audit_event where event = 'job-done'").fetchone()[0] == 2

    metrics = requests.get(f"{base}/metrics", timeout=30).text
    assert f'pacs_node_instances_received_total{{transport="stow"}} {float(SLICES)}' in metrics
    assert f'pacs_node_instances_received_total{{transport="dimse"}} {float(SLICES)}' in metrics
    assert phi_found(response.text, wrong.text, metrics, node.log()) == []
