"""Operations side of a node: web console + /metrics + STOW-RS over HTTP, job-end webhooks and metrics.

``start_operations(node, stop)`` is called once by Node.start(); the threads it returns end
when ``stop`` is set (Node.stop() joins them).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import TYPE_CHECKING

from .. import metrics
from ..notify import JobEnded, JobWatcher, WebhookNotifier
from ..store.index import utcnow

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger(__name__)


class HttpServer:
    """uvicorn in a thread of the node process (signals stay with the node's main thread)."""

    def __init__(self, node: "Node") -> None:
        import uvicorn

        from .app import build_app

        http = node.settings.http
        config = uvicorn.Config(build_app(node), host=http.host, port=http.port, log_level="warning",
                                access_log=False, lifespan="off", server_header=False)
        self.server = uvicorn.Server(config)
        self.host, self.port = http.host, http.port

    def run(self, stop: threading.Event) -> None:
        def stop_when_asked() -> None:
            stop.wait()
            self.server.should_exit = True

        threading.Thread(target=stop_when_asked, name="http-stop", daemon=True).start()
        log.info("web console, /metrics and STOW-RS on http://%s:%d/", self.host, self.port)
        try:
            self.server.run()
        except SystemExit:  # uvicorn exits this way when it cannot bind; the DICOM side keeps running
            log.error("web console could not listen on %s:%d", self.host, self.port)


def start_operations(node: "Node", stop: threading.Event) -> list[threading.Thread]:
    """Start the job watcher (metrics), the webhook caller when one is configured and, with
    [http] enabled, the HTTP server."""
    started = utcnow()
    metrics.watch_database(node.db, node.settings.node.storage_dir, node.settings.tls.certificate)
    notifier = WebhookNotifier(node.db, node.settings)

    def count(job: JobEnded) -> None:
        if job.finished_at >= started:  # jobs that ended before this process started were counted by it
            metrics.observe_job(job)

    # metrics count what ends from now on: no look back (the watcher reads job-end audit rows)
    loops = [("job-watcher", JobWatcher(node.db, [count], interval=0.2, lookback=dt.timedelta(0)).run)]
    if notifier.configured:
        loops.append(("webhooks", notifier.run))
    if node.settings.http.enabled:
        loops.append(("http", HttpServer(node).run))
    threads = []
    for name, target in loops:
        thread = threading.Thread(target=target, args=(stop,), name=name, daemon=True)
        thread.start()
        threads.append(thread)
    return threads
