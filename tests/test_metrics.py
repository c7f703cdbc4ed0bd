"""Metrics: job ends fill the per-stage histograms and outcomes; queue depth comes from the job table."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from prometheus_client import generate_latest

from pacs_node import metrics
from pacs_node.notify import DeliveryOutcome, JobEnded, JobWatcher
from pacs_node.store.index import AuditEvent, Database, Job, Patient, Series, Study, utcnow


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_job_end_fills_every_stage_and_its_outcome() -> None:
    before = {s: value("pacs_node_stage_seconds_count", stage=s) for s in metrics.STAGES}
    done = value("pacs_node_jobs_finished_total", pipeline="unit-pipeline", outcome="done")
    stages = {"completion": 1.0, "queue": 0.1, "load": 0.3, "model": 4.0, "encode": 0.2, "write": 0.1,
              "send": 0.5, "total": 6.2}
    metrics.observe_job(JobEnded(1, "r", "unit-pipeline", "done", None, "1.2", "1.2.3", 1, 4, utcnow(), stages,
                                 (DeliveryOutcome("viewer", "done", 4, 0, None),)))
    metrics.instance_received("dimse", 1000, dt.datetime.now() - dt.timedelta(milliseconds=20))
    assert value("pacs_node_jobs_finished_total", pipeline="unit-pipeline", outcome="done") == done + 1
    for stage in metrics.STAGES:
        assert value("pacs_node_stage_seconds_count", stage=stage) == before[stage] + 1, stage
    assert value("pacs_node_model_inference_seconds_bucket", pipeline="unit-pipeline", le="5.0") >= 1
    assert value("pacs_node_model_inference_seconds_bucket", pipeline="unit-pipeline", le="2.5") == 0
    assert 0.02 <= value("pacs_node_stage_seconds_sum", stage="store") < 3600


def test_queue_depth_per_pipeline_and_the_watcher(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")

    def rows(session) -> None:  # type: ignore[no-untyped-def]
        session.add(Patient(id=1, key="k"))
        session.add(Study(id=1, study_uid="1.2", patient_id=1))
        session.flush()
        session.add(Series(id=1, series_uid="1.2.3", study_id=1, modality="CT"))
        session.flush()
        now = utcnow()
        for i, (pipeline, state) in enumerate([("a", "queued"), ("a", "queued"), ("a", "running"), ("b", "sending"),
                                               ("b", "done"), ("b", "failed")], start=1):
            session.add(Job(id=i, series_id=1, rule=f"r{i}", pipeline=pipeline, state=state,
                            finished_at=now if state in ("done", "failed") else None))
            if state in ("done", "failed"):  # as jobs.py does: the end's audit row in the same transaction
                session.add(AuditEvent(event=f"job-{state}", job_id=i, at=now, detail="boom" if state == "failed" else ""))

    db.run(rows)
    metrics.watch_database(db, tmp_path)
    text = generate_latest(metrics.REGISTRY).decode()
    free = float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith('pacs_node_storage_bytes{kind="free"}')))
    total = float(next(line.split()[-1] for line in text.splitlines()
                       if line.startswith('pacs_node_storage_bytes{kind="total"}')))
    assert 0 < free <= total
    assert 'pacs_node_jobs{pipeline="a",state="queued"} 2.0' in text
    assert 'pacs_node_jobs{pipeline="a",state="running"} 1.0' in text
    assert 'pacs_node_jobs{pipeline="b",state="sending"} 1.0' in text
    depth = [line for line in text.splitlines() if line.startswith("pacs_node_jobs{")]
    assert len(depth) == 3  # ended jobs are not queue depth

    seen: list[JobEnded] = []
    watcher = JobWatcher(db, [seen.append])
    assert sorted(j.outcome for j in watcher.poll()) == ["done", "failed"]
    assert watcher.poll() == []  # each end once

    def fail_then_retry_and_finish(session) -> None:  # type: ignore[no-untyped-def]
        # job 5 fails again and is retried and done before the next poll: its job row says only
        # "done", its two audit rows say what happened
        t = utcnow()
        session.add(AuditEvent(event="job-failed", job_id=5, at=t, detail="RuntimeError: out of memory"))
        session.add(AuditEvent(event="job-done", job_id=5, at=t + dt.timedelta(milliseconds=5)))
        session.execute(Job.__table__.update().where(Job.id == 5).values(state="done", error=None,
                                                                           finished_at=t + dt.timedelta(milliseconds=5)))

    db.run(fail_then_retry_and_finish)
    ends = watcher.poll()
    assert [(j.job_id, j.outcome, j.error) for j in ends] == [(5, "failed", "RuntimeError: out of memory"),
                                                             (5, "done", None)]
    assert ends[0].key != ends[1].key  # a webhook per end
    assert watcher.poll() == []
    assert seen[0].series_uid == "1.2.3" and seen[0].study_uid == "1.2"
    db.dispose()


def test_gpu_memory_is_exported_when_a_pipeline_loaded_torch_with_cuda(tmp_path: Path, monkeypatch) -> None:
    """No GPU on the CI machines: a stand-in torch module shows what a CUDA process exports."""
    import types

    cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1,
                                 memory_allocated=lambda i: 123 * 2**20, memory_reserved=lambda i: 256 * 2**20)
    monkeypatch.setitem(__import__("sys").modules, "torch", types.SimpleNamespace(cuda=cuda))
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    metrics.watch_database(db)
    assert metrics.REGISTRY.get_sample_value("pacs_node_gpu_memory_bytes", {"device": "0", "kind": "allocated"}) == 123 * 2**20
    assert metrics.REGISTRY.get_sample_value("pacs_node_gpu_memory_bytes", {"device": "0", "kind": "reserved"}) == 256 * 2**20
    db.dispose()


def test_the_served_metrics_page_has_storage_and_certificate_expiry(tmp_path: Path) -> None:
    """/metrics as the web console serves it (build_app registers the collector): free space of
    storage_dir and the seconds left on [tls] certificate (an openssl certificate valid 20 days)."""
    import subprocess
    import time

    from starlette.testclient import TestClient

    from pacs_node.config import parse
    from pacs_node.node import Node
    from pacs_node.web.app import build_app

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.pem",
                    "-days", "20", "-subj", "/CN=pacs-node"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    settings = parse({"node": {"storage_dir": str(tmp_path / "storage"), "database_url": f"sqlite:///{tmp_path / 'n.db'}"},
                      "http": {"enabled": True},
                      "tls": {"certificate": str(tmp_path / "node.pem"), "private_key": str(tmp_path / "node.key"),
                              "port": 1}})
    node = Node(settings)
    try:
        text = TestClient(build_app(node)).get("/metrics").text
    finally:
        node.db.dispose()
    lines = {ln.split()[0]: float(ln.split()[-1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
    assert lines['pacs_node_storage_bytes{kind="free"}'] > 0
    left = lines["pacs_node_tls_certificate_expiry_seconds"]
    assert 19 * 86400 < left <= 20 * 86400 + 60, left
