"""Prometheus metrics of the node: what arrived, how long each stage took, how jobs ended.

Counters for the receive side are bumped by one-line calls in the SCP and the STOW-RS
endpoint; job stages and outcomes are observed from the job rows once a job ends (see
notify.JobWatcher), so the worker and sender carry no metrics code of their own. Queue depth
and GPU memory are read when Prometheus scrapes.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .notify import JobEnded
    from .store.index import Database

REGISTRY = CollectorRegistry(auto_describe=True)

#: seconds; from a few ms (store one instance) to half an hour (a slow model on a big series)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0)

#: the stages of a series, in path order (README "What happens to a series")
STAGES = ("store", "completion", "queue", "load", "model", "encode", "write", "send", "total")

instances_received = Counter("pacs_node_instances_received", "Instances stored and acknowledged",
                             ["transport"], registry=REGISTRY)
instances_refused = Counter("pacs_node_instances_refused", "Instances refused (bad dataset, disk full)",
                            ["transport"], registry=REGISTRY)
bytes_received = Counter("pacs_node_received_bytes", "Bytes of instances stored", ["transport"], registry=REGISTRY)
associations = Counter("pacs_node_associations", "DICOM associations by outcome (accepted, rejected)",
                       ["outcome"], registry=REGISTRY)
stow_requests = Counter("pacs_node_stow_requests", "STOW-RS requests by HTTP status", ["status"], registry=REGISTRY)
stage_seconds = Histogram("pacs_node_stage_seconds", "Duration of each stage of a series' path",
                          ["stage"], buckets=BUCKETS, registry=REGISTRY)
model_seconds = Histogram("pacs_node_model_inference_seconds", "Pipeline run time per job", ["pipeline"],
                          buckets=BUCKETS, registry=REGISTRY)
jobs_finished = Counter("pacs_node_jobs_finished", "Jobs ended, by pipeline and outcome (done, failed)",
                        ["pipeline", "outcome"], registry=REGISTRY)
send_retries = Counter("pacs_node_send_retries", "Delivery attempts that failed and were scheduled again",
                       registry=REGISTRY)
read_ahead = Counter("pacs_node_read_ahead", "Series read while they waited for completion, by what their job "
                     "did with the read (used; changed: the files changed since, read again)", ["outcome"],
                     registry=REGISTRY)
retention_removed = Counter("pacs_node_retention_removed", "What retention deleted: series, instance files, "
                            "bytes", ["kind"], registry=REGISTRY)
webhook_calls = Counter("pacs_node_webhook_calls", "Webhook calls by outcome (ok, retry, failed)", ["outcome"],
                        registry=REGISTRY)

# Label values known up front are exported at 0, so a dashboard sees every series before its first event.
for _transport in ("dimse", "stow"):
    instances_received.labels(_transport)
    instances_refused.labels(_transport)
    bytes_received.labels(_transport)
for _outcome in ("accepted", "rejected"):
    associations.labels(_outcome)
for _outcome in ("used", "changed"):
    read_ahead.labels(_outcome)
for _stage in STAGES:
    stage_seconds.labels(_stage)


def instance_received(transport: str, size: int, started: dt.datetime | float | None = None) -> None:
    """One instance stored; ``started`` (a pynetdicom event timestamp or time.monotonic()) times the store."""
    instances_received.labels(transport).inc()
    bytes_received.labels(transport).inc(size)
    if isinstance(started, dt.datetime):
        stage_seconds.labels("store").observe(max(0.0, (dt.datetime.now() - started).total_seconds()))
    elif isinstance(started, float):
        import time

        stage_seconds.labels("store").observe(max(0.0, time.monotonic() - started))


def association(accepted: bool) -> None:
    associations.labels("accepted" if accepted else "rejected").inc()


def observe_job(job: "JobEnded") -> None:
    """A job ended: its outcome, and every stage duration its row recorded."""
    jobs_finished.labels(job.pipeline, job.outcome).inc()
    for stage, seconds in job.stages.items():
        if stage in STAGES and seconds is not None and seconds >= 0:
            stage_seconds.labels(stage).observe(seconds)
    if job.stages.get("model") is not None:
        model_seconds.labels(job.pipeline).observe(job.stages["model"])


class DatabaseCollector(Collector):
    """Read at scrape time: queue depth per pipeline and state (job table), free space of
    storage_dir's file system, GPU memory."""

    def __init__(self, db: "Database", storage_dir: Path | None = None, certificate: Path | None = None) -> None:
        self.db = db
        self.storage_dir = storage_dir
        self.certificate = certificate

    def collect(self) -> Iterable[GaugeMetricFamily]:
        from sqlalchemy import func, select

        from .store.index import Job

        depth = GaugeMetricFamily("pacs_node_jobs", "Jobs not yet ended, by pipeline and state",
                                  labels=["pipeline", "state"])
        try:
            rows = self.db.run(lambda s: s.execute(
                select(Job.pipeline, Job.state, func.count()).where(Job.state.in_(("queued", "running", "sending")))
                .group_by(Job.pipeline, Job.state)).all())
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database is busy
            rows = []
        for pipeline, state, count in rows:
            depth.add_metric([pipeline, state], count)
        yield depth
        if self.storage_dir is not None:
            storage = GaugeMetricFamily("pacs_node_storage_bytes", "The file system of storage_dir: free (for "
                                        "unprivileged writers, as the node is) and total bytes", labels=["kind"])
            try:
                usage = os.statvfs(self.storage_dir)
                storage.add_metric(["free"], usage.f_bavail * usage.f_frsize)
                storage.add_metric(["total"], usage.f_blocks * usage.f_frsize)
            except OSError:
                pass
            yield storage
        if self.certificate is not None:
            from .net.tls import certificate_not_after

            end = certificate_not_after(self.certificate)
            if end is not None:
                yield GaugeMetricFamily("pacs_node_tls_certificate_expiry_seconds", "Seconds until the node's TLS "
                                        "certificate ([tls] certificate) expires; negative once it has",
                                        value=end.timestamp() - time.time())
        # only when a pipeline already loaded torch: no import on scrape. The node loads its
        # pipelines in a thread at start, so torch may be half-imported here: then skip it.
        cuda = getattr(sys.modules.get("torch"), "cuda", None)
        try:
            available = cuda is not None and bool(cuda.is_available())
        except Exception:  # noqa: BLE001 - a half-initialised module raises all sorts
            available = False
        if available:
            gpu = GaugeMetricFamily("pacs_node_gpu_memory_bytes", "GPU memory held by this process",
                                    labels=["device", "kind"])
            for i in range(cuda.device_count()):
                gpu.add_metric([str(i), "allocated"], cuda.memory_allocated(i))
                gpu.add_metric([str(i), "reserved"], cuda.memory_reserved(i))
            yield gpu


_collector: DatabaseCollector | None = None


def watch_database(db: "Database", storage_dir: Path | None = None, certificate: Path | None = None) -> None:
    """Export queue depth from ``db`` and, given ``storage_dir``, its file system's free space and,
    given ``certificate``, the time left until it expires (once per process; a later call
    replaces them)."""
    global _collector
    if _collector is not None:
        REGISTRY.unregister(_collector)
    _collector = DatabaseCollector(db, storage_dir, certificate)
    REGISTRY.register(_collector)
