"""Scenario: a real Orthanc PACS forwards a study to the node; the result lands in the same study."""

from __future__ import annotations

import json

import pytest

from conftest import Orthanc, free_port, wait_for


@pytest.fixture
def orthanc_and_node(tmp_path, node_factory):
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port).start()
    peers = [{"name": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}]
    rules = [{"name": "ct-denoise", "when": "Modality == 'CT' and CallingAETitle == 'ORTHANC'",
              "pipeline": "ct-denoise-classical", "destinations": ["sender"]}]
    node = node_factory(peers, rules, port=node_port)
    yield orthanc, node
    orthanc.stop()


def test_orthanc_forwards_study_and_gets_result_in_same_study_with_preview(orthanc_and_node, ge_head):
    orthanc, node = orthanc_and_node
    files = sorted(ge_head.glob("*.dcm"))[:6]
    for path in files:
        orthanc.post("/instances", path.read_bytes(), "application/dicom")
    studies = orthanc.get("/studies")
    assert len(studies) == 1
    study = studies[0]
    source_series = orthanc.get(f"/studies/{study}")["Series"]
    assert len(source_series) == 1

    # the PACS forwards the series to the node (as an auto-forward rule would)
    job = orthanc.post("/modalities/pacsnode/store", json.dumps(source_series[0]).encode())
    assert job is not None

    def result_series() -> list[str]:
        return [s for s in orthanc.get(f"/studies/{study}")["Series"] if s != source_series[0]]

    found = wait_for(result_series, 180, "the result series in the same Orthanc study")
    assert len(found) == 1
    series = orthanc.get(f"/series/{found[0]}")
    assert series["ParentStudy"] == study
    wait_for(lambda: len(orthanc.get(f"/series/{found[0]}")["Instances"]) == len(files), 60, "all result instances")
    tags = orthanc.get(f"/series/{found[0]}")["MainDicomTags"]
    assert "ct-denoise-classical" in tags.get("SeriesDescription", "")

    instance = orthanc.get(f"/series/{found[0]}")["Instances"][0]
    content_type, png = orthanc.get_bytes(f"/instances/{instance}/preview")
    assert content_type == "image/png"
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    simplified = orthanc.get(f"/instances/{instance}/simplified-tags")
    assert simplified["ImageType"].startswith("DERIVED\\SECONDARY")
    assert "sender:pacs" in node.cli("jobs", "list").stdout
