"""The pipelines' CUDA paths against their CPU paths. Skipped where no GPU is present (CI);
run on a GPU machine by bench/gpu_session.sh (``pytest --noconftest tests/test_gpu.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _ct_slab(n: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    body = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (0.4 * min(h, w)) ** 2
    hu = np.where(body, 40.0, -1000.0)[None] + rng.normal(0, 30, (n, h, w))
    hu[:, :, :6] = -2048.0  # padding outside the scan field
    return hu.astype(np.float32)


def _reference_cuda(model, arr: np.ndarray, batch: int) -> np.ndarray:
    """The straightforward loop (host-side masking and scaling) that _denoise_cuda replaced."""
    import torch.nn.functional as F

    from pacs_node.ml.ct_denoise import HU_SCALE

    pad_mask = arr < -1024.0
    x_all = np.where(pad_mask, np.float32(-1000.0), arr) / np.float32(HU_SCALE)
    h, w = arr.shape[1:]
    ph, pw = (-h) % model.multiple, (-w) % model.multiple
    out = np.empty_like(arr)
    with torch.inference_mode():
        for i in range(0, len(arr), batch):
            x = torch.from_numpy(np.ascontiguousarray(x_all[i:i + batch]))[:, None].cuda()
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph), mode="replicate")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = model(x)
            out[i:i + batch] = (y[:, 0, :h, :w].float() * HU_SCALE).cpu().numpy()
    return np.where(pad_mask, arr, out).astype(np.float32)


@pytest.mark.parametrize("n,h,w,batch", [(37, 512, 512, 16), (5, 250, 190, 2), (1, 64, 64, 8)])
def test_ct_denoise_cuda_path_matches_reference_and_cpu(n, h, w, batch):
    from pacs_node.ml.ct_denoise import ResidualDenoiser, denoise_slices, load_model
    from pacs_node.models_dir import model_path

    path = model_path("ct-denoise")
    model = load_model(path)[0] if path.exists() else ResidualDenoiser().eval()
    hu = _ct_slab(n, h, w)
    got = denoise_slices(model, hu, batch=batch, device="cuda")
    assert got.shape == hu.shape and got.dtype == np.float32
    pad = hu < -1024
    np.testing.assert_array_equal(got[pad], hu[pad])  # padding restored bit for bit
    ref = _reference_cuda(model.cuda(), hu, batch)
    # same arithmetic; cuDNN may pick other bf16 kernels, which moves a few pixels by one bf16
    # step of the output (2**-6 of 1000 HU at |HU| < 2000)
    d = np.abs(got - ref)
    assert float(d.mean()) < 0.05 and float(d.max()) <= 15.7, (float(d.mean()), float(d.max()))
    cpu = denoise_slices(model.cpu(), hu[:2], batch=2, device="cpu")
    diff = np.abs(got[:2] - cpu)[~pad[:2]]
    assert float(diff.mean()) < 5.0, f"bf16 GPU vs float32 CPU: mean |diff| {diff.mean():.2f} HU"


def test_mr_pipelines_on_cuda_match_cpu(monkeypatch):
    """mr-superres and anomaly-mr follow PACS_NODE_DEVICE; the outputs agree with the CPU's."""
    from pydicom.dataset import Dataset

    from pacs_node.pipelines.anomaly import AnomalyMr
    from pacs_node.pipelines.mr_superres import MrSuperres
    from pacs_node.volume import Volume

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:96, :80]
    head = (((yy - 48) / 40) ** 2 + ((xx - 40) / 34) ** 2 < 1).astype(np.float32)
    arr = np.stack([head * (300 + rng.normal(0, 10, head.shape)) for _ in range(3)]).astype(np.float32)
    datasets = []
    for _ in range(3):
        ds = Dataset()
        ds.Modality = "MR"
        datasets.append(ds)
    vol = Volume(arr, np.array([[0, 0, z] for z in range(3)], float), np.array([1.0, 0, 0]),
                 np.array([0, 1.0, 0]), (1.0, 1.0), datasets)
    results = {}
    for dev in ("cpu", "cuda"):
        monkeypatch.setenv("PACS_NODE_DEVICE", dev)
        sr = MrSuperres()
        assert next(sr.models.generators["inplane2"].parameters()).device.type == dev
        an = AnomalyMr()
        results[dev] = (sr.run(vol, {"scale": 2})[0].array, an.scores(vol))
    (sr_cpu, an_cpu), (sr_gpu, an_gpu) = results["cpu"], results["cuda"]
    assert sr_gpu.shape == (3, 192, 160)
    # TF32 convolutions on the GPU: agreement to a small fraction of the signal (300)
    assert float(np.abs(sr_gpu - sr_cpu).max()) < 3.0
    assert float(np.abs(an_gpu - an_cpu).max()) < 0.05
