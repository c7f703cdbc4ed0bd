"""A real Orthanc accepts the anomaly outputs and renders the Secondary Capture as a preview.

Scenario: the anomaly-mr pipeline scores three real MR slices; its SC, Parametric Map and SEG
are uploaded to Orthanc; Orthanc files them in the source study and renders each SC overlay
as a colour PNG with the heat map on it.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import Orthanc, free_port
from pacs_node.encode import EncodeContext, encode_outputs
from pacs_node.models_dir import model_path
from pacs_node.volume import load_series

pytestmark = pytest.mark.skipif(not model_path("anomaly-mr").exists(), reason="anomaly-mr weights not trained")


def test_orthanc_shows_the_overlay_in_the_source_study(tmp_path: Path, data: Path) -> None:
    from pacs_node.pipelines import get_pipeline

    files = sorted((data / "mr/studyforrest-t1").iterdir())[190:193]
    volume = load_series(files)
    pipeline = get_pipeline("anomaly-mr")
    (score,) = pipeline.run(volume, {"threshold": 0.3})
    score.array[:, 150:190, 120:160] = 1.0  # make sure there is a hot region to see
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs = encode_outputs(volume, [score], ("secondary_capture", "parametric_map", "segmentation"),
                                 EncodeContext(pipeline.name, pipeline.version))

    orthanc = Orthanc(tmp_path / "orthanc", free_port()).start()
    try:
        ids = {}
        for i, ds in enumerate(outputs):
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            answer = orthanc.post("/instances", buffer.getvalue(), "application/dicom")
            assert answer["Status"] == "Success", answer
            ids[str(ds.SOPInstanceUID)] = answer["ID"]

        study_uid = str(volume.datasets[0].StudyInstanceUID)
        studies = orthanc.post("/tools/find", f'{{"Level": "Study", "Query": {{"StudyInstanceUID": "{study_uid}"}}}}'.encode())
        assert len(studies) == 1
        series = orthanc.get(f"/studies/{studies[0]}/series")
        assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["OT", "OT", "SEG"]

        for ds in outputs[:3]:  # the Secondary Captures
            content_type, png = orthanc.get_bytes(f"/instances/{ids[str(ds.SOPInstanceUID)]}/preview")
            assert content_type == "image/png"
            image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
            assert image.shape[:2] == (ds.Rows, ds.Columns)
            hot = image[170, 140]
            assert hot.max() - hot.min() > 60, "the heat map is not visible in Orthanc's preview"
    finally:
        orthanc.stop()

