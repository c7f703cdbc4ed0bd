"""k-space degradation, true-grid baselines, a CPU smoke training run and the pipeline contract."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from pacs_node.errors import UnsupportedInput
from pacs_node.ml import kspace


def _bandlimited(shape, rng, keep=0.5):
    x = rng.normal(size=shape).astype(np.float32)
    # odd sizes: no Nyquist bin, so truncation and zero-fill round-trip exactly
    small = (int(shape[-2] * keep) // 2 * 2 - 1, int(shape[-1] * keep) // 2 * 2 - 1)
    return kspace.kspace_resize(kspace.kspace_resize(x, small), shape[-2:])


@pytest.mark.parametrize("scale", [2, 4])
def test_kspace_crop_samples_hr_pixel_s_times_m(scale):
    rng = np.random.default_rng(0)
    hr = rng.normal(size=(64, 48)).astype(np.float32)
    lr = kspace.degrade_inplane(hr, scale)
    assert lr.shape == (64 // scale, 48 // scale)
    # LR pixel m equals the low-passed HR image at HR pixel s*m (no half-pixel shift)
    low = kspace.zerofill_upsample(lr, scale)
    np.testing.assert_allclose(low[::scale, ::scale], lr, atol=1e-5)
    # a band-limited image survives truncation + zero-fill exactly
    smooth = _bandlimited((64, 48), rng, keep=1 / scale)
    np.testing.assert_allclose(kspace.zerofill_upsample(kspace.degrade_inplane(smooth, scale), scale), smooth,
                               atol=1e-4)
    # the mean intensity is preserved
    assert abs(float(lr.mean()) - float(hr.mean())) < 1e-5


@pytest.mark.parametrize("shape", [(3, 57, 46), (1, 33, 33)])
@pytest.mark.parametrize("scale", [2, 4])
def test_torch_zero_fill_matches_the_numpy_one(shape, scale):
    """The pipeline's GPU path zero-fills with torch.fft; on CPU tensors it must agree too."""
    import torch

    x = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    ref = kspace.zerofill_upsample(x, scale)
    got = kspace.zerofill_upsample_torch(torch.from_numpy(x), scale).numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("kernel", ["bicubic", "lanczos"])
def test_true_grid_baselines_keep_input_samples(kernel):
    rng = np.random.default_rng(1)
    lr = rng.normal(size=(2, 20, 17)).astype(np.float32)
    up = kspace.kernel_upsample(lr, 2, kernel)
    assert up.shape == (2, 40, 34)
    np.testing.assert_allclose(up[:, ::2, ::2], lr, atol=1e-5)
    ramp = np.tile(np.arange(20, dtype=np.float32), (20, 1))
    up = kspace.kernel_upsample(ramp, 2, kernel)
    tol = 1e-4 if kernel == "bicubic" else 0.03  # Keys cubic reproduces a ramp, Lanczos nearly
    np.testing.assert_allclose(up[:, 2:-4], np.tile(np.arange(2, 36) / 2, (40, 1)), atol=tol)


def test_through_plane_profile_is_centred_on_thin_slice_s_times_j():
    ramp = np.arange(17, dtype=np.float32)[:, None, None] * np.ones((1, 3, 2), np.float32)
    for scale in (2, 4):
        thick = kspace.degrade_through(ramp, scale)
        inner = thick[1:-1, 0, 0]
        np.testing.assert_allclose(inner, np.arange(scale, 17 - scale, scale)[: len(inner)], atol=1e-5)
        up = kspace.linear_upsample_axis(thick, scale)
        assert up.shape[0] == (thick.shape[0] - 1) * scale + 1
        np.testing.assert_allclose(up[::scale], thick, atol=1e-6)
    const = np.full((9, 4, 4), 3.0, np.float32)
    np.testing.assert_allclose(kspace.degrade_through(const, 2), 3.0)


def test_acquired_resolution_from_acquisition_matrix():
    ds = Dataset()
    ds.AcquisitionMatrix = [0, 256, 230, 0]
    ds.InPlanePhaseEncodingDirection = "ROW"
    assert kspace.acquisition_shape(ds) == (256, 230)
    rng = np.random.default_rng(2)
    small = _bandlimited((1, 256, 230), rng, keep=0.9)
    big = kspace.kspace_resize(small, (512, 460))  # scanner 2x interpolation
    back, spacing = kspace.to_acquired_resolution(big, ds, (0.5, 0.5))
    assert back.shape == (1, 256, 230) and spacing == (1.0, 1.0)
    np.testing.assert_allclose(back, small, atol=1e-4)
    ds.AcquisitionMatrix = [0, 512, 460, 0]  # not interpolated: unchanged
    same, spacing = kspace.to_acquired_resolution(big, ds, (0.5, 0.5))
    assert same is big and spacing == (0.5, 0.5)
    # Enhanced MR has no AcquisitionMatrix: MR FOV/Geometry's encoding steps say the same
    enhanced = Dataset()
    enhanced.MRAcquisitionFrequencyEncodingSteps = 256
    enhanced.MRAcquisitionPhaseEncodingStepsInPlane = 230
    enhanced.InPlanePhaseEncodingDirection = "ROW"
    assert kspace.acquisition_shape(enhanced) == (256, 230)
    enhanced.InPlanePhaseEncodingDirection = "COLUMN"
    assert kspace.acquisition_shape(enhanced) == (230, 256)
    enhanced.PartialFourier = "YES"  # the steps then count fewer lines than the matrix has
    assert kspace.acquisition_shape(enhanced) is None


def _phantom_bank(n=6, size=128, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    bank = []
    for _ in range(n):
        img = np.zeros((size, size), np.float32)
        for _ in range(6):
            cy, cx, r = rng.uniform(-0.3, 0.3, 2).tolist() + [rng.uniform(0.05, 0.2)]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += rng.uniform(0.2, 0.6)
        bank.append(img)
    return bank


@pytest.fixture(scope="module")
def smoke_weights(tmp_path_factory):
    """A few CPU training steps of every task on phantom slices (the real data path is the same)."""
    import pacs_node.ml.mr_superres as srs

    out = tmp_path_factory.mktemp("srs")
    mp = pytest.MonkeyPatch()
    mp.setattr(srs, "build_bank", lambda data, cache, cfg: _phantom_bank())
    try:
        rc = srs.train_main(["--out", str(out), "--max-steps", "2", "--cache", str(out / "cache")])
    finally:
        mp.undo()
    assert rc == 0
    return out


def test_smoke_train_writes_loadable_weights(smoke_weights):
    from pacs_node.ml.mr_superres_net import TASKS, load_generators

    ms = load_generators(smoke_weights / "model.safetensors")
    assert sorted(ms.generators) == sorted(TASKS)
    n_params = sum(p.numel() for p in ms.generators["inplane2"].parameters())
    assert 50_000 < n_params < 1_000_000
    assert ms.version == "1.0.0"
    baseline = load_generators(smoke_weights / "l1_baseline.safetensors")
    assert {"inplane2", "inplane4"} <= set(baseline.generators)
    assert (smoke_weights / "train_history.json").exists()


def test_gpu_recipe_wide_generator_beside_the_small_ones(smoke_weights, tmp_path):
    """train_gpu.toml's path on the CPU: --init keeps the other generators, a generator of another
    width starts afresh, batches come from worker processes, --time-budget sets the step counts,
    and each generator's own width survives the save / load round trip."""
    import json

    import pacs_node.ml.mr_superres as srs
    from pacs_node.ml.mr_superres_net import generator_arch, load_generators

    cfg = tmp_path / "wide.toml"
    cfg.write_text('version = "9.9.9"\nchannels = 16\nblocks = 2\nbatch = 4\n'
                   'patch_inplane = { "2" = 32, "4" = 64 }\n'
                   '[[tasks]]\nname = "inplane2"\npretrain_steps = 100000\ngan_steps = 25000\nl1_baseline = true\n')
    mp = pytest.MonkeyPatch()
    mp.setattr(srs, "build_bank", lambda data, cache, c: _phantom_bank())
    try:
        rc = srs.train_main(["--config", str(cfg), "--init", str(smoke_weights), "--out", str(tmp_path / "out"),
                             "--workers", "2", "--time-budget", "3", "--threads", "1"])
    finally:
        mp.undo()
    assert rc == 0
    ms = load_generators(tmp_path / "out" / "model.safetensors")
    arch = {name: generator_arch(g) for name, g in ms.generators.items()}
    assert arch["inplane2"] == (16, 2)
    assert arch["inplane4"] == arch["through2"] == (32, 6)  # kept from --init
    assert ms.meta["arch"]["inplane2"] == [16, 2]
    done = ms.meta["tasks"]["inplane2"]
    # the budget cut the config's 100,000 + 25,000 steps down to what fits in about 3 s
    assert 61 <= done["pretrain_steps"] < 100_000 and 1 <= done["gan_steps"] < 25_000
    assert done["workers"] == 2
    history = json.loads((tmp_path / "out" / "train_history.json").read_text())
    assert any(r["phase"] == "budget" and r["task"] == "inplane2" for r in history)
    l1 = load_generators(tmp_path / "out" / "l1_baseline.safetensors")
    assert generator_arch(l1.generators["inplane2"]) == (16, 2)


def _mr_volume(nz=3, ny=40, nx=36):
    from pacs_node.volume import Volume

    rng = np.random.default_rng(3)
    arr = np.clip(_bandlimited((nz, ny, nx), rng) * 100 + 300, 0, None).astype(np.float32)
    datasets = []
    for _ in range(nz):
        ds = Dataset()
        ds.Modality = "MR"
        ds.SliceThickness = 3.0
        datasets.append(ds)
    positions = np.array([[10.0, 20.0, 30.0 + 3 * k] for k in range(nz)])
    return Volume(array=arr, positions=positions, row_direction=np.array([1.0, 0, 0]),
                  column_direction=np.array([0, 1.0, 0]), pixel_spacing=(0.8, 0.9), datasets=datasets)


def test_pipeline_geometry_fields(smoke_weights):
    from pacs_node.pipelines.mr_superres import MrSuperres

    pipe = MrSuperres(weights=smoke_weights / "model.safetensors")
    vol = _mr_volume()
    out = pipe.run(vol, {})[0]  # default: x2 in-plane
    assert out.array.shape == (3, 80, 72)
    assert out.pixel_spacing == pytest.approx((0.4, 0.45))
    np.testing.assert_allclose(out.positions, vol.positions)
    assert out.source_slices is None and out.slice_thickness is None
    out4 = pipe.run(vol, {"scale": 4})[0]
    assert out4.array.shape == (3, 160, 144)

    thr = pipe.run(vol, {"scale": 2, "axis": "through"})[0]
    assert thr.array.shape == (5, 40, 36)
    np.testing.assert_allclose(thr.positions[:, 2], [30, 31.5, 33, 34.5, 36])
    assert thr.slice_thickness == pytest.approx(1.5)
    assert thr.source_slices == [[0], [0, 1], [1], [1, 2], [2]]
    assert thr.pixel_spacing == (0.8, 0.9)
    # an untrained correction leaves the input samples where they were
    np.testing.assert_allclose(thr.array[::2], vol.array, rtol=0.05, atol=5)


def test_pipeline_rejects_bad_params(smoke_weights):
    from pacs_node.pipelines.mr_superres import MrSuperres

    pipe = MrSuperres(weights=smoke_weights / "model.safetensors")
    vol = _mr_volume()
    with pytest.raises(UnsupportedInput):
        pipe.run(vol, {"scale": 3})
    with pytest.raises(UnsupportedInput):
        pipe.run(vol, {"axis": "diagonal"})
    vol.datasets[0].Modality = "CT"
    with pytest.raises(UnsupportedInput):
        pipe.run(vol, {})


def test_small_generator_is_served_on_request(smoke_weights):
    """params generator = "small": the CPU recipe's generators (models/mr-superres/small.safetensors),
    same geometry; the derived series says which generator made it; a wrong value or a missing
    file is a clear error."""
    from pacs_node.ml.mr_superres_net import generator_arch
    from pacs_node.pipelines.mr_superres import MrSuperres

    pipe = MrSuperres()  # the committed weights, with small.safetensors beside them
    vol = _mr_volume()
    full = pipe.run(vol, {"scale": 2})[0]
    small = pipe.run(vol, {"scale": 2, "generator": "small"})[0]
    assert generator_arch(pipe._small.generators["inplane2"]) == (32, 6)
    assert small.array.shape == full.array.shape and small.pixel_spacing == full.pixel_spacing
    np.testing.assert_allclose(small.positions, full.positions)
    assert not np.allclose(small.array, full.array)
    assert "small generator" in small.description and "small generator" not in full.description
    with pytest.raises(UnsupportedInput, match="generator must be"):
        pipe.run(vol, {"generator": "huge"})
    missing = MrSuperres(weights=smoke_weights / "model.safetensors")  # no small.safetensors there
    with pytest.raises(UnsupportedInput, match="small.safetensors"):
        missing.run(vol, {"generator": "small"})


def test_eval_command_scores_any_folder_of_mr_series(tmp_path, capsys):
    """`pacs-node models eval mr-superres --data DIR` on another site's series: each MR series'
    central block degraded and scored like the held-out block, a pooled line, CT and multi-frame
    skipped with a reason; errors without a traceback."""
    import json

    from pacs_node.datasets import data_dir
    from pacs_node.errors import PacsNodeError
    from pacs_node.ml.mr_superres import eval_main

    data = data_dir()
    folder = tmp_path / "site"
    folder.mkdir()
    for f in sorted((data / "mr" / "studyforrest-t1").iterdir())[180:190]:  # an axial block
        (folder / f"a-{f.name}").symlink_to(f)
    (folder / "ct.dcm").symlink_to(sorted((data / "ct" / "ge-head-tilt").iterdir())[0])
    (folder / "mf.dcm").symlink_to(data / "compressed" / "transfer-syntaxes" / "wg04" / "emri_small_RLE.dcm")
    out = tmp_path / "sr.json"
    assert eval_main(["--data", str(folder), "--max-slices", "6", "--threads", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["split"] == "external" and len(report["series"]) == 1
    rows = {r["method"]: r for r in report["series"][0]["results"]}
    assert rows["zero-fill (sinc)"]["n_slices"] == 6
    # a trained model beats the interpolators it is compared with on an unseen block
    assert rows["mr-superres (GAN)"]["psnr_db"] > rows["bicubic (true grid)"]["psnr_db"]
    assert report["pooled"][0]["n_slices"] == 6
    printed = capsys.readouterr().out
    assert "axial series" in printed and "slice-weighted mean" in printed
    with pytest.raises(PacsNodeError, match="no such file"):
        eval_main(["--data", str(tmp_path / "nowhere")])
    with pytest.raises(PacsNodeError, match="no MR series"):
        eval_main(["--data", str(data / "ct" / "ge-head-tilt")])


def test_pooled_metrics_weigh_series_by_slices_and_keep_common_methods():
    from pacs_node.ml.mr_superres import pooled

    a = [{"method": "zero-fill (sinc)", "psnr_db": 30.0, "ssim": 0.90, "psnr_min_db": 28.0, "n_slices": 30},
         {"method": "mr-superres (GAN)", "psnr_db": 32.0, "ssim": 0.92, "psnr_min_db": 29.0, "n_slices": 30}]
    b = [{"method": "zero-fill (sinc)", "psnr_db": 20.0, "ssim": 0.80, "psnr_min_db": 18.0, "n_slices": 10},
         {"method": "mr-superres (GAN)", "psnr_db": 21.0, "ssim": 0.82, "psnr_min_db": 17.0, "n_slices": 10},
         {"method": "plain L1 CNN", "psnr_db": 25.0, "ssim": 0.85, "psnr_min_db": 19.0, "n_slices": 10}]
    rows = {r["method"]: r for r in pooled([a, b])}
    assert set(rows) == {"zero-fill (sinc)", "mr-superres (GAN)"}  # the L1 CNN ran on one series only
    assert rows["zero-fill (sinc)"]["psnr_db"] == pytest.approx(27.5)  # (30 * 30 + 20 * 10) / 40
    assert rows["mr-superres (GAN)"]["ssim"] == pytest.approx(0.895) and rows["mr-superres (GAN)"]["n_slices"] == 40
    assert rows["mr-superres (GAN)"]["psnr_min_db"] == 17.0
    assert rows["mr-superres (GAN)"]["delta_psnr_vs_first_db"] == pytest.approx(29.25 - 27.5)
