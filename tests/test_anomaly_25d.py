"""2.5D anomaly maps (``AnomalyConfig.context_mm``): neighbour planes from a series' geometry,
3D training anomalies and evaluation lesions, a CPU smoke training run, and the pipeline reading
the neighbours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from pacs_node.ml.anomaly import AnomalyConfig, load_model, neighbour_planes, network_input, residual_maps
from pacs_node.ml.anomaly_mr import make_eval_cases, train_main
from pacs_node.ml.lesions import insert_lesions, lesions_in_neighbour
from pacs_node.ml.synth_anomaly import corrupt, corrupt_batch


def _ramp_series(along: list[float]) -> np.ndarray:
    """Slices whose every pixel holds the slice's position: interpolation is exact to read."""
    return np.stack([np.full((8, 8), z, np.float32) for z in along])


def test_neighbour_planes_interpolate_along_the_normal_with_uneven_gaps_and_clamp_at_the_ends() -> None:
    along = [0.0, 1.0, 2.0, 3.0, 7.0, 8.0]  # a 4 mm gap between the 4th and 5th slice
    planes = neighbour_planes(_ramp_series(along), np.array(along), 2.0)
    assert planes.shape == (6, 2, 8, 8)
    below, above = planes[:, 0, 0, 0], planes[:, 1, 0, 0]
    # positions 2 mm away, interpolated linearly; beyond the series the end slice stands in
    np.testing.assert_allclose(below, [0.0, 0.0, 0.0, 1.0, 5.0, 6.0], atol=1e-5)
    np.testing.assert_allclose(above, [2.0, 3.0, 4.0, 5.0, 8.0, 8.0], atol=1e-5)
    # thick slices (5 mm): a blend of the slice and its neighbour, 2/5 of the way
    thick = [0.0, 5.0, 10.0]
    planes = neighbour_planes(_ramp_series(thick), np.array(thick), 2.0)
    np.testing.assert_allclose(planes[1, :, 0, 0], [3.0, 7.0], atol=1e-5)
    # one slice, or positions that do not increase: the slice itself on both sides
    for broken in ([4.0], [1.0, 1.0, 2.0]):
        series = _ramp_series([5.0 + i for i in range(len(broken))])
        planes = neighbour_planes(series, np.array(broken), 2.0)
        np.testing.assert_array_equal(planes[:, 0], series)
        np.testing.assert_array_equal(planes[:, 1], series)


def _head(seed: int = 4) -> np.ndarray:
    yy, xx = np.mgrid[:96, :96]
    head = (((yy - 48) ** 2 + (xx - 48) ** 2) < 40 ** 2).astype(np.float32) * 0.6
    rng = np.random.default_rng(seed)
    return head + ndimage.gaussian_filter(rng.standard_normal((96, 96)), 2.0).astype(np.float32) * 0.05 * (head > 0)


def test_stack_training_anomalies_are_3d_and_labelled_on_the_middle_plane() -> None:
    head = _head()
    stack = np.stack([head * 0.95, head, head * 1.05])
    other = np.roll(stack, 9, axis=-2)
    rng = np.random.default_rng(2)
    seen = 0
    for _ in range(40):
        out, label = corrupt(stack, other, rng)
        assert out.shape == stack.shape and label.shape == head.shape
        if label.any():
            seen += 1
            inside = label > 0
            changed = [float(np.abs(out[c] - stack[c])[inside].mean()) for c in range(3)]
            # the same region changed in every plane, not only the labelled one
            assert min(changed) > 0.25 * changed[1], changed
    assert seen >= 25
    out, labels = corrupt_batch(np.stack([stack] * 8), np.random.default_rng(3))
    assert out.shape == (8, 3, 96, 96) and labels.shape == (8, 96, 96)


def test_eval_lesions_reach_the_neighbour_planes_and_leave_the_scored_slices_as_in_2d() -> None:
    normal = np.stack([_head(s) for s in range(3)])
    context = np.stack([np.stack([n * 0.98, n * 1.02]) for n in normal])
    cfg = AnomalyConfig(arch="recon-disc")
    flat = make_eval_cases(normal, cfg, seed=5)
    deep = make_eval_cases(normal, cfg, seed=5, context=context)
    # the scored slices, their lesions and their truth are the same with or without neighbours
    np.testing.assert_array_equal(flat.images, deep.images)
    np.testing.assert_array_equal(flat.truth, deep.truth)
    assert flat.context is None and deep.context.shape == context.shape
    for n in range(len(normal)):
        truth = deep.truth[n]
        for c in range(2):
            diff = np.abs(deep.context[n, c] - context[n, c])
            # the lesion is in the neighbour plane, where it is in the slice, and nowhere else
            assert diff[truth].mean() > 5 * max(diff[~ndimage.binary_dilation(truth, iterations=4)].mean(), 1e-4)
            # same level, own texture (correlated, not copied)
            lesion_here = deep.images[n][truth]
            lesion_there = deep.context[n, c][truth]
            assert abs(lesion_there.mean() - lesion_here.mean()) < 0.15 * lesion_here.mean()
    # the texture draw: correlated 0.78 with the slice's, never the same patch
    rng = np.random.default_rng(1)
    blends: list = []
    img, _, _ = insert_lesions(normal[0], normal[0] > 0.3, rng, count=1, record=blends)
    alpha, _, target, amp, texture = blends[0]
    flat_planes = np.zeros((2,) + normal[0].shape, np.float32)
    drawn = lesions_in_neighbour(flat_planes, [(np.ones_like(alpha), None, 1.0, 1.0, texture)], np.random.default_rng(2))
    r = [np.corrcoef(drawn[c].ravel() - 1.0, texture.ravel())[0, 1] for c in range(2)]
    assert all(0.7 < v < 0.86 for v in r), r


def _smoke_stacks(tmp_path: Path, planes: int) -> tuple[np.ndarray, list[str]]:
    """A cache of four random stacks of ``planes`` planes and the train command's arguments for
    a tiny 2.5D run on it (add --out and any other flags)."""
    rng = np.random.default_rng(1)
    cache = tmp_path / f"stacks{planes}.npz"
    stacks = (rng.random((4, planes, 128, 128)) * 0.7).astype(np.float16)
    np.savez(cache, images=stacks, sources=np.array(["synthetic"] * 4))
    return stacks, ["--data", str(tmp_path), "--cache", str(cache), "--steps", "3", "--batch", "2", "--crop", "96",
                    "--context-mm", "2", "--channels", "4,8", "--disc-channels", "4,4,8,8,8,4"]


def test_smoke_training_of_a_25d_network_and_scoring_with_and_without_neighbours(tmp_path: Path) -> None:
    stacks, common = _smoke_stacks(tmp_path, 3)
    out = tmp_path / "ctx.safetensors"
    assert train_main(common + ["--out", str(out)]) == 0
    net, cfg = load_model(out)
    assert cfg.context_mm == 2.0 and net.planes == 3
    x = torch.from_numpy(stacks[:2, 1:2].astype(np.float32))
    ctx = torch.from_numpy(stacks[:2, [0, 2]].astype(np.float32))
    with torch.no_grad():
        with_ctx, _ = residual_maps(net, x, cfg, None, ctx)
        alone, _ = residual_maps(net, x, cfg)  # no neighbours: the slice stands in for them
        itself, _ = residual_maps(net, x, cfg, None, torch.cat([x, x], dim=1))
    assert with_ctx.shape == (2, 1, 128, 128)
    assert torch.allclose(alone, itself) and not torch.allclose(with_ctx, alone)
    with pytest.raises(SystemExit):  # 2.5D is a recon-disc option
        train_main(common + ["--arch", "dae-unet", "--out", str(tmp_path / "bad.safetensors")])


def test_two_planes_on_each_side_in_order_along_the_normal() -> None:
    along = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    planes = neighbour_planes(_ramp_series(along), np.array(along), 2.0, reach=2)
    assert planes.shape == (9, 4, 8, 8)
    # slice 4 (at 4 mm): the planes at 0, 2 mm below it, then 6, 8 mm above; the ends clamp
    np.testing.assert_allclose(planes[4, :, 0, 0], [0.0, 2.0, 6.0, 8.0], atol=1e-5)
    np.testing.assert_allclose(planes[1, :, 0, 0], [0.0, 0.0, 3.0, 5.0], atol=1e-5)
    # reach 1 is the first and last of the nearest planes: what 0.6.0 reads
    np.testing.assert_array_equal(neighbour_planes(_ramp_series(along), np.array(along), 2.0), planes[:, 1:3])
    cfg = AnomalyConfig(arch="recon-disc", context_mm=2.0, context_planes=2)
    x = torch.from_numpy(_ramp_series(along)[:, None])
    inp = network_input(x, cfg, torch.from_numpy(planes))
    np.testing.assert_allclose(inp[4, :, 0, 0].numpy(), [0.0, 2.0, 4.0, 6.0, 8.0], atol=1e-5)
    assert network_input(x, cfg).shape == (9, 5, 8, 8)  # no neighbours: the slice in every plane


def test_five_plane_training_anomalies_are_ellipsoids_that_reach_the_outer_planes_unless_small() -> None:
    head = _head()
    stack = np.stack([head * f for f in (0.9, 0.95, 1.0, 1.05, 1.1)])
    rng = np.random.default_rng(7)
    labelled = reached = 0
    for _ in range(60):
        out, label = corrupt(stack, np.roll(stack, 9, axis=-2), rng)
        if not label.any():
            continue
        labelled += 1
        changed = [np.abs(out[c] - stack[c]) > 1e-4 for c in range(5)]
        # always in the middle three planes; in the outer two no larger
        assert min(c.sum() for c in changed[1:4]) > 0
        # (what a plane's content makes visible differs a little from plane to plane)
        assert max(changed[0].sum(), changed[4].sum()) <= 1.1 * changed[2].sum() + 20
        reached += bool(changed[0].any() and changed[4].any())
    # most anomalies reach the outer planes (all but the smallest)
    assert labelled >= 35 and reached > 0.6 * labelled, (reached, labelled)


def test_eval_lesions_of_a_wider_context_are_ellipsoids_and_leave_the_nearer_planes_as_they_were() -> None:
    normal = np.stack([_head(s) for s in range(3)])
    near = np.stack([np.stack([n * 0.98, n * 1.02]) for n in normal])
    wide = np.stack([np.stack([n * 0.96, n * 0.98, n * 1.02, n * 1.04]) for n in normal])
    cfg = AnomalyConfig(arch="recon-disc", context_mm=2.0, context_planes=2)
    three = make_eval_cases(normal, cfg, seed=5, context=near)
    five = make_eval_cases(normal, cfg, seed=5, context=wide)
    np.testing.assert_array_equal(three.images, five.images)
    # the nearest planes get the very lesions they get with one plane on each side
    np.testing.assert_array_equal(three.context, five.context[:, 1:3])
    for n in range(len(normal)):
        for c in (0, 3):  # the planes 4 mm away: the lesions there too, smaller
            drawn = np.abs(five.context[n, c] - wide[n, c]) > 0.02
            assert drawn.any() and drawn.sum() <= (np.abs(five.context[n, 1 + (c == 3)] - wide[n, 1 + (c == 3)]) > 0.02).sum()
            assert not (drawn & ~ndimage.binary_dilation(five.truth[n], iterations=3)).any()


def test_far_plane_lesion_is_the_ellipsoid_cross_section() -> None:
    from pacs_node.ml.lesions import Lesion, lesions_in_far_plane

    yy, xx = np.mgrid[:64, :64]
    for radius, expected in ((8.0, np.sqrt(1 - (2 / 8) ** 2)), (4.0, np.sqrt(1 - (2 / 4) ** 2)), (1.9, 0.0)):
        alpha = ((yy - 30) ** 2 + (xx - 34) ** 2 < radius ** 2).astype(np.float32)
        blend = (alpha, None, 2.0, 0.0, np.zeros((64, 64), np.float32))
        out = lesions_in_far_plane(np.zeros((64, 64), np.float32), [blend], [Lesion((30, 34), radius, True, 2.0)],
                                   2.0, np.random.default_rng(0))
        area = float((out > 1.0).sum())
        # the cross-section 2 px from the centre: area scaled by 1 - (2 / radius)^2, same centre
        assert abs(area - alpha.sum() * expected ** 2) <= 0.15 * alpha.sum() + 4, (radius, area)
        if area:
            cy, cx = np.argwhere(out > 1.0).mean(axis=0)
            assert abs(cy - 30) < 0.6 and abs(cx - 34) < 0.6


def test_smoke_training_of_a_five_plane_network(tmp_path: Path) -> None:
    stacks, common = _smoke_stacks(tmp_path, 5)
    out = tmp_path / "ctx5.safetensors"
    assert train_main(common + ["--context-planes", "2", "--out", str(out)]) == 0
    net, cfg = load_model(out)
    assert cfg.context_planes == 2 and net.planes == 5
    x = torch.from_numpy(stacks[:2, 2:3].astype(np.float32))
    ctx = torch.from_numpy(stacks[:2, [0, 1, 3, 4]].astype(np.float32))
    with torch.no_grad():
        maps, _ = residual_maps(net, x, cfg, None, ctx)
    assert maps.shape == (2, 1, 128, 128)
    with pytest.raises(SystemExit):  # a cache of 5-plane stacks for a 3-plane network: refused
        train_main(common + ["--out", str(tmp_path / "bad.safetensors")])
