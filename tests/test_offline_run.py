"""`pacs-node run`: a folder in, result files out, through the same code as network jobs."""

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom

BIN = Path(sys.executable).parent


def test_run_writes_a_derived_series(ge_head, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for path in sorted(ge_head.glob("*.dcm"))[:3]:
        shutil.copy(path, src)
    (src / "README.txt").write_text("not DICOM")
    out = subprocess.run([str(BIN / "pacs-node"), "run", "ct-denoise-classical", str(src), str(tmp_path / "out"),
                          "--param", "strength=0.6"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "3 instance(s) -> 3 result(s)" in out.stdout
    results = [pydicom.dcmread(p) for p in sorted((tmp_path / "out").glob("*.dcm"))]
    assert len(results) == 3
    assert {r.SeriesInstanceUID for r in results} != {pydicom.dcmread(p).SeriesInstanceUID for p in src.glob("*.dcm")}
    assert all("ct-denoise-classical" in r.DerivationDescription for r in results)


def test_run_rejects_wrong_modality_and_unknown_pipeline(data, tmp_path):
    mr = data / "compressed" / "transfer-syntaxes" / "1.dcm"  # one MR image (the folder: 9 copies of it)
    out = subprocess.run([str(BIN / "pacs-node"), "run", "ct-denoise-classical", str(mr), str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "needs modality CT, series is MR" in out.stderr
    out = subprocess.run([str(BIN / "pacs-node"), "run", "no-such-pipeline", str(mr), str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "unknown pipeline 'no-such-pipeline'" in out.stderr
