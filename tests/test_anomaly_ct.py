"""Head CT anomaly model: the intracranial region, a CPU smoke training run through the real
entry points, the evaluation command, and the served pipeline on a real head CT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pacs_node.errors import PacsNodeError
from pacs_node.models_dir import model_path

needs_weights = pytest.mark.skipif(not model_path("anomaly-ct").exists(), reason="anomaly-ct weights not trained")


def _ge_slices(data: Path):
    from pacs_node.ml.anomaly import AnomalyConfig
    from pacs_node.ml.anomaly_ct import HOLDOUT_SERIES, _canvas_slices, _load

    cfg = AnomalyConfig(modality="CT", intensity_ref="ct-window")
    vol, arr = _load(HOLDOUT_SERIES, data, cfg)
    return [s for s in _canvas_slices(((arr[i], vol.spacing[1:]) for i in range(arr.shape[0])), cfg, min_fg=0.0)]


def test_intracranial_region_is_the_brain_inside_a_closed_skull(data: Path) -> None:
    from pacs_node.ml.anomaly_ct import intracranial_region

    slices = _ge_slices(data)
    brain = slices[18]  # lateral ventricles' level
    region = intracranial_region(brain)
    assert region.sum() > 2500  # ~100 cm^2 of brain at 2 mm pixels
    # inside it: soft tissue (brain, CSF), never bone nor air
    assert brain[region].max() < 1.4 and brain[region].min() > 0.05
    # a 4 mm skull-base slice (orbits, sinuses, no closed ring around the brain): little or nothing
    assert not intracranial_region(slices[1]).any()
    # thin temporal bone leaves gaps in the ring at 2 mm pixels: still found (slices 13, 14)
    assert all(intracranial_region(slices[k]).sum() > 3000 for k in (12, 13, 14))


def test_smoke_train_and_eval_commands(tmp_path: Path, data: Path, capsys) -> None:
    """The real entry points, a few CPU steps on a few slices; the eval scores held-out slices and
    any folder of CT series, and says what is wrong with a folder that has none."""
    from pacs_node.ml.anomaly_ct import eval_main, train_main

    src = Path(__file__).resolve().parent.parent / "models" / "anomaly-ct" / "train.toml"
    out = tmp_path / "ct.safetensors"
    assert train_main(["--config", str(src), "--data", str(data), "--steps", "3", "--batch", "2", "--limit", "6",
                       "--cache", str(tmp_path / "slices.npz"), "--out", str(out)]) == 0
    assert out.exists() and (tmp_path / "slices.npz").exists()
    report = tmp_path / "eval.json"
    assert eval_main(["--data", str(data), "--model", str(out), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["slices"] == 14 and result["lesion_pixels"] > 0  # GE 12..25: a closed skull around brain
    # lesions lie inside the skull where the density threshold sees them (this 3-step model cannot)
    assert result["baseline"]["auroc"] > 0.9 and 0.0 <= result["model"]["auroc"] <= 1.0
    site = tmp_path / "site"
    site.mkdir()
    for f in sorted((data / "ct" / "ge-head-tilt").iterdir())[14:20]:
        (site / f.name).symlink_to(f)
    (site / "mr.dcm").symlink_to(sorted((data / "mr" / "studyforrest-t1").iterdir())[0])  # not CT: skipped
    ext = tmp_path / "ext.json"
    assert eval_main(["--data", str(site), "--model", str(out), "--json", str(ext)]) == 0
    assert "external slices:" in capsys.readouterr().out
    result = json.loads(ext.read_text())
    assert result["slices"] == 6 and result["data"].startswith("1 CT series under site (6 of 6 slices)")
    with pytest.raises(PacsNodeError, match="no CT slices"):
        eval_main(["--data", str(data / "mr" / "studyforrest-t1"), "--model", str(out)])


@needs_weights
def test_pipeline_marks_a_hyperdense_lesion_in_a_real_head_ct(data: Path) -> None:
    """A 12 mm disc at 70 HU (a fresh bleed's density) put into brain on four held-out GE
    slices scores higher than the rest of the brain; the map has the source's geometry."""
    from scipy import ndimage

    from pacs_node.pipelines import get_pipeline
    from pacs_node.volume import load_series

    files = sorted((data / "ct" / "ge-head-tilt").iterdir())
    volume = load_series(files)
    picks = [13, 16, 18, 20]
    sub = load_series([volume.files[i] for i in picks])
    rows, cols = sub.shape[1:]
    yy, xx = np.mgrid[:rows, :cols]
    dy, dx = sub.pixel_spacing
    centre = (0.42 * rows, 0.62 * cols)  # in the right hemisphere's white matter on these slices
    disc = ((yy - centre[0]) * dy) ** 2 + ((xx - centre[1]) * dx) ** 2 <= 6.0 ** 2
    sub.array[:, disc] = 70.0
    pipeline = get_pipeline("anomaly-ct")
    (score,) = pipeline.run(sub, {})
    assert score.array.shape == sub.shape
    assert score.threshold == pipeline.cfg.seg_threshold == 0.97  # the model's own SEG default
    assert pipeline.run(sub, {"threshold": 0.8})[0].threshold == 0.8  # a rule's wins
    brain = (sub.array > 0) & (sub.array < 100)
    brain &= np.stack([ndimage.binary_erosion(b, iterations=20) for b in brain])
    for z in range(len(picks)):
        inside = float(score.array[z][disc].mean())
        rest = score.array[z][brain[z] & ~ndimage.binary_dilation(disc, iterations=20)]
        assert inside > np.percentile(rest, 95), f"slice {picks[z]}: disc {inside:.3f}"
