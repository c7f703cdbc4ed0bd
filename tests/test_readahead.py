"""Reading a series while it waits out its quiet time (pacs_node/readahead.py): the job uses what
was read only for exactly the same, unchanged files, and gives the same results either way."""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pydicom

from conftest import StoreSCP, storescu, wait_for
from pacs_node.readahead import ReadAhead
from pacs_node.volume import load_series


def _copy(src: Path, dst: Path) -> list[Path]:
    dst.mkdir(parents=True)
    return [Path(shutil.copy2(p, dst / p.name)) for p in sorted(src.glob("*.dcm"))]


def test_volume_read_ahead_is_taken_once_and_only_for_the_same_unchanged_files(tmp_path, ge_head):
    files = _copy(ge_head, tmp_path / "series")
    reference = load_series(files)
    voxels = reference.array.size
    ahead = ReadAhead(max_bytes=voxels * 4)

    from pacs_node import metrics

    def count(outcome: str) -> float:
        return metrics.REGISTRY.get_sample_value("pacs_node_read_ahead_total", {"outcome": outcome}) or 0.0

    used, changed = count("used"), count("changed")
    assert ahead.read("1.2.3", files, voxels)
    assert ahead.take("9.9.9", files) == (None, 0.0)  # another series' job: not this volume
    volume, seconds = ahead.take("1.2.3", list(reversed(files)))  # the job lists them in any order
    assert volume is not None and seconds > 0
    np.testing.assert_array_equal(volume.array, reference.array)
    assert [p.name for p in volume.files] == [p.name for p in reference.files]
    assert ahead.take("1.2.3", files) == (None, 0.0)  # taken once
    assert count("used") == used + 1 and count("changed") == changed

    # an instance sent again after the read (same path, new content): the job reads it itself
    assert ahead.read("1.2.3", files, voxels)
    ds = pydicom.dcmread(files[3])
    arr = ds.pixel_array.copy()
    arr[:8, :8] = 1234
    ds.PixelData = arr.tobytes()
    tmp = files[3].with_suffix(".new")
    ds.save_as(tmp)
    tmp.replace(files[3])
    assert ahead.take("1.2.3", files) == (None, 0.0)
    assert count("changed") == changed + 1

    # one more instance since the read: a different set of files
    assert ahead.read("1.2.3", files[:-1], voxels)
    assert ahead.take("1.2.3", files) == (None, 0.0)

    # not taken for MAX_AGE_SECONDS: dropped by the idle worker's expire()
    assert ahead.read("1.2.3", files, voxels)
    ahead.expire()
    assert ahead._entry is not None  # fresh: kept
    ahead._entry.started -= ReadAhead.MAX_AGE_SECONDS + 1
    ahead.expire()
    assert ahead.take("1.2.3", files) == (None, 0.0)

    # over the limit, or off: nothing is read
    assert not ReadAhead(max_bytes=voxels * 4 - 1).read("1.2.3", files, voxels)
    assert not ReadAhead(max_bytes=0).read("1.2.3", files, voxels)
    # a file that vanished: nothing is read
    assert not ahead.read("1.2.3", [*files, tmp_path / "gone.dcm"], voxels)


def _results(scp: StoreSCP) -> dict[tuple[float, ...], np.ndarray]:
    out = {}
    for p in scp.files():
        ds = pydicom.dcmread(p)
        out[tuple(float(v) for v in ds.ImagePositionPatient)] = ds.pixel_array
    return out


def test_job_uses_the_series_read_during_its_quiet_time_and_gives_the_same_results(tmp_path, node_factory, ge_head):
    """The same series through two nodes, read ahead and not: same result pixels; the job that
    used the read says so in its timings (read_ahead=...)."""
    results = {}
    timings = {}
    for mb in (2048, 0):
        scp = StoreSCP(tmp_path / f"scp-{mb}").start()
        try:
            peers = [{"name": "modality", "ae_title": "STORESCU"},
                     {"name": "viewer", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}]
            rules = [{"name": "ct", "when": "Modality == 'CT'", "pipeline": "ct-denoise-classical",
                      "destinations": ["viewer"]}]
            # 5 s of quiet: the read-ahead (started after 0.2 s of quiet) has its entry well before the
            # job asks for it, even on a loaded machine
            node = node_factory(peers, rules, worker={"read_ahead_mb": mb},
                                completion={"quiet_seconds": 5.0, "max_wait_seconds": 120.0})
            # the job must not wait for the pipeline's first import inside its stages
            wait_for(lambda: "pipeline ct-denoise-classical loaded in" in node.log(), 120, "the pipeline to load")
            sent = storescu(node.port, ge_head)
            assert sent.returncode == 0, sent.stderr
            n = len(list(ge_head.glob("*.dcm")))
            wait_for(lambda: len(scp.files()) >= n, 240, f"{n} results at storescp")
            wait_for(lambda: "last result acknowledged" in node.log(), 30, "the job to end")
            results[mb] = _results(scp)
            timings[mb] = sqlite3.connect(node.root / "node.db").execute("select timings from job").fetchone()[0]
            node.stop()
        finally:
            scp.stop()

    assert "read_ahead=" in timings[2048], timings
    assert "read_ahead=" not in timings[0], timings
    assert re.search(r"read_ahead=[\d.]+ ", timings[2048] + " ")
    assert results[2048].keys() == results[0].keys() and len(results[0]) > 0
    for position, pixels in results[0].items():
        np.testing.assert_array_equal(results[2048][position], pixels)


def test_job_does_not_wait_for_a_read_of_other_files(tmp_path, ge_head, monkeypatch):
    """A read still running over an older set of the series' files is of no use to the job: it
    returns at once and reads the series itself."""
    import threading
    import time

    import pacs_node.readahead as readahead

    files = _copy(ge_head, tmp_path / "series")
    release = threading.Event()
    real = readahead.load_series

    def slow_load(paths):
        release.wait(30)
        return real(paths)

    monkeypatch.setattr(readahead, "load_series", slow_load)
    ahead = ReadAhead(max_bytes=2**30)
    reader = threading.Thread(target=ahead.read, args=("1.2.3", files[:-1], 1))
    reader.start()
    try:
        time.sleep(0.2)
        t0 = time.monotonic()
        assert ahead.take("1.2.3", files) == (None, 0.0)  # one more file now
        assert time.monotonic() - t0 < 5
    finally:
        release.set()
        reader.join(30)


def test_two_series_in_one_association_both_come_back_identical(tmp_path, node_factory, ge_head):
    """Two series go quiet at the same release: one is read ahead, the other read by its job
    (one read at a time). Series B is series A's pixels under new UIDs, so their results must
    be pixel-identical whichever way each was read."""
    from pydicom.uid import generate_uid

    copy = tmp_path / "copy"
    copy.mkdir()
    series_uid = generate_uid()
    for p in sorted(ge_head.glob("*.dcm")):
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(copy / p.name)
    scp = StoreSCP(tmp_path / "scp").start()
    try:
        peers = [{"name": "modality", "ae_title": "STORESCU"},
                 {"name": "viewer", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}]
        rules = [{"name": "ct", "when": "Modality == 'CT'", "pipeline": "ct-denoise-classical",
                  "destinations": ["viewer"]}]
        node = node_factory(peers, rules, completion={"quiet_seconds": 5.0, "max_wait_seconds": 120.0})
        wait_for(lambda: "pipeline ct-denoise-classical loaded in" in node.log(), 120, "the pipeline to load")
        sent = storescu(node.port, ge_head, copy)  # one association, two series
        assert sent.returncode == 0, sent.stderr
        n = len(list(ge_head.glob("*.dcm")))
        wait_for(lambda: len(scp.files()) >= 2 * n, 300, f"{2 * n} results at storescp")
        wait_for(lambda: node.log().count("last result acknowledged") >= 2, 30, "both jobs to end")
        rows = sqlite3.connect(node.root / "node.db").execute("select state, timings from job").fetchall()
        assert [r[0] for r in rows] == ["done", "done"], rows
        assert sum("read_ahead=" in r[1] for r in rows) >= 1, rows
        by_series: dict[str, dict[int, np.ndarray]] = {}
        for p in scp.files():
            ds = pydicom.dcmread(p)
            by_series.setdefault(ds.SeriesInstanceUID, {})[int(ds.InstanceNumber)] = ds.pixel_array
        a, b = by_series.values()
        assert a.keys() == b.keys() and len(a) == n
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    finally:
        scp.stop()
