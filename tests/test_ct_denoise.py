"""ct-denoise: low-dose simulation, metrics, and a few-step CPU training smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pacs_node.ml import metrics
from pacs_node.ml.lowdose import LowDoseParams, noise_from_sinogram, prepare_slice, sinogram, simulate_slice


def head_phantom(n: int = 128) -> np.ndarray:
    """Water disc (0 HU) in air with a 1000 HU skull ring and a 60 HU insert."""
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2.0
    r = np.hypot(yy, xx)
    img = np.full((n, n), -1000.0, dtype=np.float32)
    img[r < 0.42 * n] = 1000.0
    img[r < 0.38 * n] = 0.0
    img[np.hypot(yy - 0.1 * n, xx) < 0.08 * n] = 60.0
    return img


PARAMS = LowDoseParams(n_views=90)


def test_noise_grows_as_dose_falls_and_is_not_white():
    img = head_phantom()
    p = sinogram(img, 0.5, PARAMS)
    inside = np.hypot(*(np.mgrid[:128, :128] - 63.5)) < 40
    stds = {}
    for dose in (0.5, 0.25, 0.1):
        n = noise_from_sinogram(p, dose, 0.5, np.random.default_rng(1), PARAMS)
        assert abs(float(n[inside].mean())) < 5.0  # no HU bias
        stds[dose] = float(n[inside].std())
    assert stds[0.5] < stds[0.25] < stds[0.1]
    # variance inserted ~ (1 - d) / d (Zeng et al.): 0.25 vs 0.5 -> ratio sqrt(3) ~ 1.73
    assert 1.4 < stds[0.25] / stds[0.5] < 2.1
    # FBP noise is correlated (not white Gaussian): neighbouring pixels are anti/correlated
    n = noise_from_sinogram(p, 0.25, 0.5, np.random.default_rng(2), PARAMS)
    c = np.corrcoef(n[30:98, 30:97].ravel(), n[30:98, 31:98].ravel())[0, 1]
    assert abs(c) > 0.05
    assert np.all(noise_from_sinogram(p, 1.0, 0.5, np.random.default_rng(3), PARAMS) == 0)


def test_simulation_is_seeded_and_keeps_padding_out():
    img = head_phantom()
    img[:4] = -3024.0  # scanner padding
    ref = prepare_slice(img)
    assert ref.min() >= -1024
    a = simulate_slice(ref, 0.25, 0.5, np.random.default_rng(7), PARAMS)
    b = simulate_slice(ref, 0.25, 0.5, np.random.default_rng(7), PARAMS)
    assert np.array_equal(a, b) and a.dtype == np.float32
    with pytest.raises(ValueError):
        simulate_slice(ref, 0.0, 0.5, np.random.default_rng(7), PARAMS)


def test_metrics_conventions():
    rng = np.random.default_rng(0)
    ref = head_phantom(64)
    noisy = ref + rng.normal(0, 20, ref.shape).astype(np.float32)
    assert metrics.psnr(ref, ref, window=(-160, 240)) == float("inf")
    assert metrics.ssim(ref, ref, window=(-1000, 1000)) == pytest.approx(1.0)
    # PSNR uses the window width as peak
    m = metrics.mse(ref, noisy, window=(-1000, 1000))
    assert metrics.psnr(ref, noisy, window=(-1000, 1000)) == pytest.approx(10 * np.log10(2000**2 / m))
    assert metrics.rmse(ref, noisy) == pytest.approx(20, rel=0.1)
    assert metrics.ssim(ref, noisy, window=(-160, 240)) < metrics.ssim(ref, noisy, window=(-1000, 1000))
    roi = metrics.flat_roi(ref, size=9)
    y0, y1, x0, x1 = roi
    assert y1 - y0 == 9 and np.ptp(ref[y0:y1, x0:x1]) == 0
    with pytest.raises(ValueError):
        metrics.psnr(ref, noisy)  # no window, no data range: refuse to guess


def test_smoke_train_few_steps_cpu(tmp_path: Path, data: Path):
    """The real training entry point, a few steps on one simulated slice (CPU)."""
    from pacs_node.ml.ct_denoise import denoise_slices, load_model, train_main

    src = Path(__file__).resolve().parent.parent / "models" / "ct-denoise" / "train.toml"
    cfg = src.read_text()
    replace = {
        "train_series": '["ct/philips-phantom-1mm"]', "realisations": '[[0.25, "shepp-logan"]]', "n_views": "60",
        "patch": "32", "batch": "2", "adv_start": "0.0", "max_minutes": "0.0", "channels": "[8, 16, 32]",
    }
    lines = []
    for line in cfg.splitlines():
        key = line.split("=")[0].strip()
        lines.append(f"{key} = {replace[key]}" if key in replace and "=" in line else line)
    (tmp_path / "train.toml").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    rc = train_main(["--config", str(tmp_path / "train.toml"), "--steps", "4", "--limit-slices", "1",
                     "--out", str(out), "--cache", str(tmp_path / "cache"), "--data", str(data), "--log-every", "1"])
    assert rc == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 4 and all(np.isfinite(h["loss"]) for h in log["history"])
    assert any(h["adv"] > 0 for h in log["history"])  # the adversarial term ran
    model, meta = load_model(out / "model.safetensors")
    assert meta["name"] == "ct-denoise" and json.loads(meta["arch"])["channels"] == [8, 16, 32]
    y = denoise_slices(model, head_phantom(60))  # any size: padded to the network's multiple
    assert y.shape == (60, 60) and np.isfinite(y).all()


def test_eval_command_finds_ct_series_in_any_folder(tmp_path: Path, data: Path, capsys):
    """Another site's export: two CT series in one flat folder (one cropped to a non-square
    matrix, as some scanners store), an MR series beside them, a non-DICOM file. Each CT series is
    evaluated under its own name, non-square slices are padded for the simulation and scored on
    their own pixels, the MR series is skipped; a missing folder is a clear error."""
    import pydicom
    from pydicom.uid import generate_uid

    from pacs_node.errors import PacsNodeError
    from pacs_node.ml.ct_denoise_eval import eval_main

    flat = tmp_path / "export"
    flat.mkdir()
    ge = sorted((data / "ct" / "ge-head-tilt").iterdir())
    ge_uid = str(pydicom.dcmread(ge[0]).SeriesInstanceUID)
    for f in ge[:3]:
        (flat / f"ge-{f.name}").symlink_to(f)
    uid = generate_uid()
    for i, f in enumerate(ge[10:13]):  # the same patient as a second, non-square series
        ds = pydicom.dcmread(f)
        arr = ds.pixel_array[40:440, :]
        ds.Rows, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SeriesNumber = arr.shape[0], uid, generate_uid(), 77
        ds.PixelData = arr.tobytes()
        ds.save_as(flat / f"crop-{i}.dcm")
    twin = generate_uid()  # a second series with the first one's Series Number: names must differ
    for i, f in enumerate(ge[20:22]):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = twin, generate_uid()
        ds.save_as(flat / f"twin-{i}.dcm")
    broken = generate_uid()  # a series the loader refuses (a 256 x 256 localizer among 512 x 512 slices)
    for i, f in enumerate(ge[5:7]):
        ds = pydicom.dcmread(f)
        if i:
            arr = ds.pixel_array[::2, ::2].copy()
            ds.Rows, ds.Columns, ds.PixelData = 256, 256, arr.tobytes()
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SeriesNumber = broken, generate_uid(), 99
        ds.save_as(flat / f"broken-{i}.dcm")
    for f in sorted((data / "mr" / "studyforrest-t1").iterdir())[:2]:
        (flat / f"mr-{f.name}").symlink_to(f)
    (flat / "README.txt").write_text("not DICOM")
    out = tmp_path / "eval.json"
    assert eval_main(["--data", str(flat), "--max-slices", "1", "--skip", "bm3d,classical", "--json", str(out),
                      "--cache", str(tmp_path / "cache")]) == 0
    report = json.loads(out.read_text())
    names = [s["series"] for s in report["series"]]
    number = pydicom.dcmread(ge[0]).SeriesNumber
    # the refused series is skipped, the others evaluated; the two sharing a Series Number named apart
    assert len(names) == 3 and "export-77" in names and "export-99" not in names
    assert sorted(n for n in names if n != "export-77") == sorted([f"export-{number}-{twin[-8:]}",
                                                                   f"export-{number}-{ge_uid[-8:]}"])
    assert len(list((tmp_path / "cache").iterdir())) == 3  # one cached slice per series, none shared
    crop = next(s for s in report["series"] if s["series"] == "export-77")
    assert crop["slices_total"] == 3 and set(crop["metrics"]) == {"low-dose", "gaussian", "model"}
    # the simulated noise was scored on the 400 x 512 pixels, and the model removes some of it
    assert crop["metrics"]["model"]["rmse_hu"] < crop["metrics"]["low-dose"]["rmse_hu"]
    assert "export-77" in capsys.readouterr().out
    with pytest.raises(PacsNodeError, match="no such file"):
        eval_main(["--data", str(tmp_path / "nowhere")])
    with pytest.raises(PacsNodeError, match="no CT series"):
        eval_main(["--data", str(data / "mr" / "studyforrest-t1")])
