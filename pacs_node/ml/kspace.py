"""K-space degradation, zero-filled (sinc) interpolation and true-grid classical resamplers.

Grid convention (see ../shared/data/README.md): a centred k-space crop from N to M = N/s
samples points keeps the field of view, and its image pixel m lies exactly on the
high-resolution pixel s*m (what an FFT reconstruction at the smaller matrix does). Zero-filled
interpolation is the exact inverse placement: output pixel s*m sits on input pixel m, so
ImagePositionPatient stays and PixelSpacing is divided by s.

Through-plane, a thick slice j is the average of thin slices with a box slice profile of width
s thin slices centred on thin slice s*j (trapezoid weights [1/2, 1, ..., 1, 1/2] / s), so the
same rule holds: thick slice j sits on thin slice s*j.

All functions work on the last two axes of numpy arrays (any leading batch axes), in float.
Transforms (scipy.fft, single precision) use ``norm="forward"`` so pixel values are preserved by a crop or a pad.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft


def _crop_or_pad_centered(spec: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Centre-crop or zero-pad a fftshifted spectrum (last two axes) to ``shape``."""
    out = np.zeros(spec.shape[:-2] + tuple(shape), dtype=spec.dtype)
    src_sl, dst_sl = [], []
    for n_in, n_out in zip(spec.shape[-2:], shape):
        c_in, c_out = n_in // 2, n_out // 2  # DC position after fftshift
        n = min(n_in, n_out)
        c = n // 2
        src_sl.append(slice(c_in - c, c_in - c + n))
        dst_sl.append(slice(c_out - c, c_out - c + n))
    out[(..., *dst_sl)] = spec[(..., *src_sl)]
    return out


def kspace_resize(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize the last two axes by centred k-space crop (downsampling) or zero-fill (upsampling).

    Same field of view; pixel 0 stays on pixel 0. Returns the real part, float32.
    """
    img = np.asarray(img, dtype=np.float32)
    spec = sfft.fftshift(sfft.fft2(img, norm="forward"), axes=(-2, -1))
    spec = _crop_or_pad_centered(spec, (int(shape[0]), int(shape[1])))
    out = sfft.ifft2(sfft.ifftshift(spec, axes=(-2, -1)), norm="forward")
    return out.real.astype(np.float32)


def kspace_resize_axis(img: np.ndarray, size: int, axis: int) -> np.ndarray:
    """1-D version of :func:`kspace_resize` along one axis."""
    img = np.moveaxis(np.asarray(img, dtype=np.float32), axis, -1)
    spec = sfft.fftshift(sfft.fft(img, norm="forward"), axes=-1)
    n_in = spec.shape[-1]
    out_spec = np.zeros(spec.shape[:-1] + (size,), dtype=spec.dtype)
    n = min(n_in, size)
    c = n // 2
    out_spec[..., size // 2 - c: size // 2 - c + n] = spec[..., n_in // 2 - c: n_in // 2 - c + n]
    out = sfft.ifft(sfft.ifftshift(out_spec, axes=-1), norm="forward").real
    return np.moveaxis(out, -1, axis).astype(np.float32)


def degrade_inplane(hr: np.ndarray, scale: int) -> np.ndarray:
    """Low-resolution acquisition simulated by centred k-space truncation of the last two axes.

    The high-resolution size must be a multiple of ``scale`` (use :func:`crop_to_multiple`).
    """
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"image {h}x{w} is not a multiple of scale {scale}")
    return kspace_resize(hr, (h // scale, w // scale))


def zerofill_upsample(lr: np.ndarray, scale: int) -> np.ndarray:
    """Zero-filled k-space (sinc) interpolation of the last two axes by ``scale``."""
    h, w = lr.shape[-2:]
    return kspace_resize(lr, (h * scale, w * scale))


def zerofill_upsample_torch(lr, scale: int):
    """:func:`zerofill_upsample` on a torch tensor, on its own device (the GPU path of the
    mr-superres pipeline): the same centred zero-fill, in complex64."""
    import torch

    h, w = lr.shape[-2:]
    shape = (h * scale, w * scale)
    spec = torch.fft.fftshift(torch.fft.fft2(lr.float(), norm="forward"), dim=(-2, -1))
    out = torch.zeros(spec.shape[:-2] + shape, dtype=spec.dtype, device=spec.device)
    src, dst = [], []
    for n_in, n_out in zip((h, w), shape):
        c = n_in // 2  # upsampling: all of the input spectrum, DC on DC
        src.append(slice(0, n_in))
        dst.append(slice(n_out // 2 - c, n_out // 2 - c + n_in))
    out[(..., *dst)] = spec[(..., *src)]
    return torch.fft.ifft2(torch.fft.ifftshift(out, dim=(-2, -1)), norm="forward").real


def crop_to_multiple(img: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Crop the last two axes to a multiple of ``multiple``, keeping the centre.

    Returns the cropped array and the (row, column) offset of its pixel 0 in the input.
    """
    h, w = img.shape[-2:]
    nh, nw = h - h % multiple, w - w % multiple
    oy, ox = (h - nh) // 2, (w - nw) // 2
    return img[..., oy:oy + nh, ox:ox + nw], (oy, ox)


# --- through-plane -------------------------------------------------------------------------

def slice_profile(scale: int) -> np.ndarray:
    """Weights of the thin slices -s/2..s/2 around a thick slice centre (box of width s)."""
    if scale == 1:
        return np.ones(1)
    w = np.ones(scale + 1)
    w[0] = w[-1] = 0.5
    return w / w.sum()


def degrade_through(hr: np.ndarray, scale: int, axis: int = 0) -> np.ndarray:
    """Thick slices by slice-profile averaging along ``axis``; thick slice j sits on thin slice s*j.

    Thin slices outside the volume are taken as copies of the edge slice. Output has
    ``(n - 1) // scale + 1`` slices.
    """
    hr = np.moveaxis(np.asarray(hr, dtype=np.float32), axis, 0)
    n = hr.shape[0]
    weights = slice_profile(scale)
    half = scale // 2
    centres = np.arange(0, n, scale)
    out = np.zeros((len(centres),) + hr.shape[1:], dtype=np.float32)
    for k, w in enumerate(weights):
        idx = np.clip(centres + k - half, 0, n - 1)
        out += np.float32(w) * hr[idx]
    return np.moveaxis(out, 0, axis)


def linear_upsample_axis(lr: np.ndarray, scale: int, axis: int = 0) -> np.ndarray:
    """Linear interpolation along ``axis`` with sample j at output s*j; (n-1)*s+1 outputs."""
    lr = np.moveaxis(np.asarray(lr, dtype=np.float32), axis, 0)
    n = lr.shape[0]
    pos = np.arange((n - 1) * scale + 1) / scale
    lo = np.clip(np.floor(pos).astype(int), 0, max(n - 2, 0))
    hi = np.minimum(lo + 1, n - 1)
    t = (pos - lo).astype(np.float32).reshape((-1,) + (1,) * (lr.ndim - 1))
    out = (1 - t) * lr[lo] + t * lr[hi]
    return np.moveaxis(out, 0, axis)


# --- classical resamplers on the true grid -----------------------------------------------

def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    out = np.zeros_like(x)
    m1 = x <= 1
    m2 = (x > 1) & (x < 2)
    out[m1] = (a + 2) * x[m1] ** 3 - (a + 3) * x[m1] ** 2 + 1
    out[m2] = a * x[m2] ** 3 - 5 * a * x[m2] ** 2 + 8 * a * x[m2] - 4 * a
    return out


def _lanczos3(x: np.ndarray) -> np.ndarray:
    out = np.sinc(x) * np.sinc(x / 3.0)
    out[np.abs(x) >= 3] = 0.0
    return out


_KERNELS = {"bicubic": (_keys_cubic, 2), "lanczos": (_lanczos3, 3)}


def resample_matrix(n_in: int, scale: int, kernel: str) -> np.ndarray:
    """(n_in*scale, n_in) weights: output pixel n samples input coordinate n/scale (true grid)."""
    fn, support = _KERNELS[kernel]
    u = np.arange(n_in * scale) / scale
    base = np.floor(u).astype(int)
    mat = np.zeros((len(u), n_in))
    for tap in range(-support + 1, support + 1):
        idx = base + tap
        w = fn(u - idx)
        np.add.at(mat, (np.arange(len(u)), np.clip(idx, 0, n_in - 1)), w)
    mat /= mat.sum(axis=1, keepdims=True)
    return mat


def kernel_upsample(lr: np.ndarray, scale: int, kernel: str) -> np.ndarray:
    """Separable bicubic (Keys, a=-0.5) or Lanczos-3 upsampling with LR pixel m on HR pixel s*m."""
    h, w = lr.shape[-2:]
    my = resample_matrix(h, scale, kernel)
    mx = resample_matrix(w, scale, kernel)
    out = np.einsum("yi,...ij,xj->...yx", my, np.asarray(lr, dtype=np.float64), mx, optimize=True)
    return out.astype(np.float32)


# --- acquired resolution --------------------------------------------------------------------

def acquisition_shape(ds) -> tuple[int, int] | None:
    """(rows, columns) of the acquired matrix from AcquisitionMatrix (Enhanced MR: the frequency
    and in-plane phase encoding steps), or None when absent.

    AcquisitionMatrix is (frequency rows, frequency columns, phase rows, phase columns); with
    InPlanePhaseEncodingDirection ROW the phase encoding runs along the rows of the image
    (i.e. it sets the number of columns) and frequency sets the number of rows.
    """
    am = ds.get("AcquisitionMatrix") if ds is not None else None
    if not am or len(am) != 4:
        # Enhanced MR (a frame view, volume.frame_views): MR FOV/Geometry's step counts, which
        # count the lines acquired: with partial Fourier or parallel imaging fewer than the
        # matrix, so not used then (the image is taken as acquired: no crop)
        freq, phase = (ds.get(k) if ds is not None else None
                       for k in ("MRAcquisitionFrequencyEncodingSteps", "MRAcquisitionPhaseEncodingStepsInPlane"))
        if not freq or not phase or any(str(ds.get(k, "") or "").upper() == "YES"
                                        for k in ("PartialFourier", "ParallelAcquisition")):
            return None
        am = (0, freq, phase, 0) if str(ds.get("InPlanePhaseEncodingDirection", "")).upper() == "ROW" else \
            (freq, 0, 0, phase)
    f_rows, f_cols, p_rows, p_cols = (int(v) for v in am)
    if str(ds.get("InPlanePhaseEncodingDirection", "")).upper() == "ROW":
        rows, cols = f_cols or f_rows, p_rows or p_cols
    else:
        rows, cols = p_cols or p_rows, f_rows or f_cols
    if rows <= 0 or cols <= 0:
        return None
    return rows, cols


def to_acquired_resolution(array: np.ndarray, ds, pixel_spacing: tuple[float, float]):
    """Crop k-space of (z, y, x) ``array`` to the acquisition matrix when it was interpolated.

    Returns (array, pixel_spacing); pixel 0 keeps its position (k-space crop convention). The
    matrix is only reduced when the reconstructed size is an integer multiple of the acquired one
    (the UIH T1: 512 x 460 from 256 x 230).
    """
    acq = acquisition_shape(ds)
    h, w = array.shape[-2:]
    if acq is None or (acq[0] >= h and acq[1] >= w):
        return array, pixel_spacing
    if h % acq[0] or w % acq[1] or h // acq[0] != w // acq[1]:
        return array, pixel_spacing
    f = h // acq[0]
    return kspace_resize(array, acq), (pixel_spacing[0] * f, pixel_spacing[1] * f)
