"""Scenario: a brain MR series (a head CT series, an Enhanced-style multi-frame MR image) goes
from a real Orthanc through the node's anomaly rule and comes back as Secondary Capture overlays,
a Parametric Map and a SEG in the same study.

About 20 s per case alone; up to 90 s when the machine is busy."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Orthanc, free_port
from pacs_node.models_dir import model_path

CASES = {  # case: (pipeline, modality, series, slices sent, sent as one multi-frame image)
    "anomaly-mr": ("anomaly-mr", "MR", "mr/uih-t1-3d-sag", slice(80, 84), False),
    "anomaly-ct": ("anomaly-ct", "CT", "ct/ge-head-tilt", slice(16, 20), False),
    "anomaly-mr-enhanced": ("anomaly-mr", "MR", "mr/uih-t1-3d-sag", slice(80, 84), True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_series_sent_to_the_node_comes_back_as_overlay_pm_and_seg(case: str, tmp_path: Path, data: Path,
                                                                  node_factory) -> None:
    """Orthanc forwards a brain MR / head CT series; the node returns SC, PM and SEG into the same study."""
    import json

    from conftest import converted_enhanced, wait_for

    pipeline, modality, series, picks, multiframe = CASES[case]
    if not model_path(pipeline).exists():
        pytest.skip(f"{pipeline} weights not trained")

    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port).start()
    try:
        peers = [{"name": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}]
        rules = [{"name": "anomaly", "when": f"Modality == '{modality}'", "pipeline": pipeline,
                  "params": {"threshold": 0.3},
                  "outputs": ["secondary_capture", "parametric_map", "segmentation"], "destinations": ["sender"]}]
        node_factory(peers, rules, port=node_port)
        files = sorted((data / series).iterdir())[picks]
        slices = len(files)  # one overlay per slice: per file, or per frame of the one image
        if multiframe:
            files = [converted_enhanced(files, tmp_path / "enhanced")]
        for path in files:
            orthanc.post("/instances", path.read_bytes(), "application/dicom")
        (study,) = orthanc.get("/studies")
        (source,) = orthanc.get(f"/studies/{study}")["Series"]
        orthanc.post("/modalities/pacsnode/store", json.dumps(source).encode())

        def results() -> list[dict] | None:
            series = [orthanc.get(f"/series/{s}") for s in orthanc.get(f"/studies/{study}")["Series"] if s != source]
            done = len(series) == 3 and sum(len(s["Instances"]) for s in series) == slices + 2
            return series if done else None

        series = wait_for(results, 240, "SC, PM and SEG series in the source study")
        by_modality = sorted((s["MainDicomTags"]["Modality"], len(s["Instances"])) for s in series)
        assert by_modality == sorted([("OT", slices), ("OT", 1), ("SEG", 1)])
        for s in series:
            assert s["ParentStudy"] == study
            assert pipeline in s["MainDicomTags"].get("SeriesDescription", "")
        sc_series = next(s for s in series if len(s["Instances"]) == slices)
        content_type, png = orthanc.get_bytes(f"/instances/{sc_series['Instances'][0]}/preview")
        assert content_type == "image/png" and len(png) > 1000
        tags = orthanc.get(f"/instances/{sc_series['Instances'][0]}/simplified-tags")
        assert tags["BurnedInAnnotation"] == "YES"
        if multiframe:  # each overlay refers to its frame of the one source image
            referenced = sorted(int(orthanc.get(f"/instances/{i}/tags?simplify")["SourceImageSequence"][0]
                                    ["ReferencedFrameNumber"]) for i in sc_series["Instances"])
            assert referenced == list(range(1, slices + 1))
    finally:
        orthanc.stop()
