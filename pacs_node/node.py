"""The node in one process: SCP, completion, routing, worker and sender over one database."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import socket
import threading
from pathlib import Path

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session

from . import audit
from .complete import CompletionTracker
from .config import Settings
from .jobs import Sender, Worker, create_jobs, new_owner, recover
from .net.scp import StorageSCP
from .retention import Retention, finish_interrupted
from .route import Router
from .store.files import FileStore
from .store.index import Database, Instance, Series, Study
from .store.indexer import index_missing_files
from .store.ingest import Ingest

def run_file(settings: Settings) -> Path:
    """Where a running node of ``settings`` on this host notes its pid and ports."""
    return Path(settings.node.storage_dir) / "run" / f"{socket.gethostname()}.json"


log = logging.getLogger(__name__)


class Node:
    def __init__(self, settings: Settings, run_worker: bool | None = None) -> None:
        self.settings = settings
        self.run_worker = settings.worker.enabled if run_worker is None else run_worker
        self.db = Database(settings.node.database_url)
        self.files = FileStore(settings.node.storage_dir)
        self.router = Router(settings.rules)
        self.token = new_owner()
        # SQLite: this process is the only receiver; PostgreSQL: others may share the database
        self.single_process = self.db.is_sqlite
        self.ingest = Ingest(self.db, self.files, settings.completion.use_images_in_acquisition, receiver=self.token)
        self.worker = Worker(self.db, self.files, settings)
        self.sender = Sender(self.db, self.files, settings)
        self.worker.on_hand_over = self.sender.wake.set  # results go out at once, not at the next poll
        self.tracker = CompletionTracker(self.db, settings.completion, self._route, receiver=self.token,
                                         shared=not self.single_process)
        self._reading = threading.Lock()
        if self.run_worker and self.worker.read_ahead.enabled:
            self.tracker.on_quiet = self._read_ahead
        self.scp = StorageSCP(settings, self.db, self.ingest, self.tracker.instance_received, self.tracker.association_ended)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.receivers = None

    def _route(self, session: Session, series: Series) -> None:
        """Called in the completion transaction: decide the rules and queue their jobs."""
        path = session.execute(
            select(Instance.path).where(Instance.series_id == series.id).order_by(Instance.id).limit(1)
        ).scalar_one_or_none()
        if path is None:
            return
        _, decisions = self._decide(path, series.calling_ae)
        matched = [d.rule for d in decisions if d.matched]
        jobs = create_jobs(session, series, matched)
        study = session.get(Study, series.study_id)
        log.info("series %s complete (%s): %d instance(s) from %s; %s", series.series_uid, series.completed_by,
                 series.instance_count, series.calling_ae,
                 f"{len(jobs)} job(s): " + ", ".join(f"{j.rule}->{j.pipeline}" for j in jobs) if jobs else "no rule matched")
        for d in decisions:
            log.debug("  rule %s: %s", d.rule.name, d.reason)
        audit.add(session, "series-complete", series_uid=series.series_uid,
                     study_uid=study.study_uid if study else None, calling_ae=series.calling_ae,
                     count=series.instance_count,
                     detail="; ".join(f"{d.rule.name}: {'match' if d.matched else 'no match'}" for d in decisions)[:2000])
        if jobs:
            self.worker.wake.set()

    def _decide(self, first_path: str, calling_ae: str) -> tuple[pydicom.Dataset, list]:
        """The rules' decisions on a series, from its first instance's header (and that header)."""
        first = pydicom.dcmread(self.files.absolute(first_path), stop_before_pixels=True)
        return first, self.router.decide(first, calling_ae)

    def _read_ahead(self, series: Series) -> None:
        """A series waits out its quiet time: an idle worker reads it for its job meanwhile."""
        # one read at a time (many series can go quiet in one tick, e.g. after a restart)
        if self.worker.busy.is_set() or not self._reading.acquire(blocking=False):
            return
        try:
            threading.Thread(target=self._read_ahead_series, args=(series.id, series.series_uid, series.calling_ae or ""),
                             name="read-ahead", daemon=True).start()
        except BaseException:
            self._reading.release()
            raise

    def _read_ahead_series(self, series_id: int, series_uid: str, calling_ae: str) -> None:
        try:
            paths = self.db.run(lambda s: s.execute(
                select(Instance.path).where(Instance.series_id == series_id).order_by(Instance.id)).scalars().all())
            if not paths:
                return
            first, decisions = self._decide(paths[0], calling_ae)
            if not any(d.matched for d in decisions):
                return
            files = [self.files.absolute(p) for p in paths]
            frames = int(first.get("NumberOfFrames", 1) or 1)  # an Enhanced image: one slice per frame
            voxels = len(files) * frames * int(first.get("Rows", 0) or 0) * int(first.get("Columns", 0) or 0)
            self.worker.read_ahead.read(series_uid, files, voxels)
        except Exception:  # noqa: BLE001 - a hint only: the job reads the series itself
            log.debug("read-ahead of series %s skipped", series_uid, exc_info=True)
        finally:
            self._reading.release()

    def start(self) -> None:
        self.files.remove_temp_files()
        # a retention purge cut short by the stop is finished before files are indexed
        finish_interrupted(self.db, self.files)
        # instances acknowledged just before a kill may have a file but no index row yet
        index_missing_files(self.ingest)
        # with SQLite and the worker in this process, every 'running' job is ours from before
        recover(self.db, single_process=self.single_process and self.run_worker)
        extra = self.settings.node.receivers - 1
        from .net.tls import warn_if_expiring

        warn_if_expiring(self.settings.tls)
        self.scp.start()
        if extra > 0:
            from .receivers import ReceiverPool

            self.receivers = ReceiverPool(self.settings, self.token, self.tracker, extra,
                                          recover=lambda: index_missing_files(self.ingest))
            self.receivers.start()
            # node.port's listener hands connections to the receiver processes in turn
            self.scp.server.handoff = self.receivers.handoff
        loops = [("completion", self.tracker.run), ("sender", self.sender.run),
                 ("retention", Retention(self.db, self.files, self.settings.retention).run)]
        if self.run_worker:
            loops.append(("worker", self.worker.run))
        for name, target in loops:
            thread = threading.Thread(target=target, args=(self._stop,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.run_worker:
            # load the rules' pipelines (models, weights) now, not in the first job's latency
            from .pipelines import preload

            names = sorted({rule.pipeline for rule in self.settings.rules})
            threading.Thread(target=preload, args=(names, False), name="preload", daemon=True).start()
        from .web import start_operations  # web console, /metrics, STOW-RS, webhooks; threads end with _stop
        self._threads.extend(start_operations(self, self._stop))
        self._write_run_file()
        log.info("node started: storage %s, database %s, worker %s, %d rule(s)", self.settings.node.storage_dir,
                 self.db.engine.url.render_as_string(hide_password=True), "on" if self.run_worker else "off",
                 len(self.settings.rules))

    def _write_run_file(self) -> None:
        """storage_dir/run/<host name>.json: this process's pid and ports, so that `pacs-node
        check` tells this node, already running, from another program on its ports. Removed at
        stop; one left by a killed node names a pid that is gone."""
        http = self.settings.http
        info = {"pid": os.getpid(), "ae_title": self.settings.node.ae_title, "port": self.scp.port,
                "tls_port": self.scp.tls_port or None, "http_port": http.port if http.enabled else None,
                "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        path = run_file(self.settings)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, path)
        except OSError as exc:  # a hint for `check` only: never a reason not to run
            log.warning("could not write %s: %s", path, exc.strerror or exc)

    def _remove_run_file(self) -> None:
        path = run_file(self.settings)
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass

    def stopped_threads(self) -> list[str]:
        """Names of this node's loops (completion, sender, retention, worker, web) that have ended
        while it runs: each one ending is a fault (they end only when the node stops)."""
        if self._stop.is_set():
            return []
        return [t.name for t in self._threads if not t.is_alive()]

    def stop(self) -> None:
        self._stop.set()
        self.tracker.wake.set()
        self.worker.wake.set()
        self.sender.wake.set()
        if self.receivers is not None:
            self.receivers.stop()
        self.scp.stop()
        for thread in self._threads:
            thread.join(timeout=30)
        self._remove_run_file()
        self.db.dispose()
        log.info("node stopped")

    def serve_forever(self) -> None:
        done = threading.Event()

        def on_signal(signum, _frame) -> None:  # type: ignore[no-untyped-def]
            log.info("signal %s received, stopping", signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        done.wait()
        self.stop()
