"""Scenario: two rules process one series; each job's end is announced to a webhook.

Rule 'denoise-a' uses the global [notify] webhook, rule 'denoise-b' its own, whose receiver
fails the first call (HTTP 500): the node retries it. Each receiver gets exactly one accepted,
signed call per job, with UIDs, pipeline, outcome and timings, and no patient name or ID —
nor does any page, metric or log line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
import requests

from conftest import free_port, storescu, wait_for
from websupport import marked_series, phi_found, web_node  # noqa: F401

GLOBAL_SECRET = "global-webhook-secret-91f3"
RULE_SECRET = "rule-b-webhook-secret-5d20"
SLICES = 3


class Receiver:
    """A webhook endpoint: records every call; /flaky answers 500 to its first call."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.port = free_port()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                flaky_first = self.path == "/flaky" and not any(c["path"] == "/flaky" for c in receiver.calls)
                status = 500 if flaky_first else 204
                receiver.calls.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                       "body": body,
                                       "status": status})
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def accepted(self, path: str) -> list[dict]:
        return [c for c in self.calls if c["path"] == path and c["status"] == 204]

    def stop(self) -> None:
        self.server.shutdown()


def signature_ok(secret: str, call: dict) -> bool:
    """Checked here by hand, as a receiver in another language would: HMAC-SHA256("<ts>.<body>")."""
    headers = call["headers"]
    timestamp = headers["x-pacsnode-timestamp"]
    expected = "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + call["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["x-pacsnode-signature"], expected) and abs(time.time() - int(timestamp)) < 300


def test_one_signed_webhook_call_per_job_and_no_patient_data(web_node, storescp, ge_head, tmp_path):  # noqa: F811
    receiver = Receiver()
    peers = [{"name": "modality", "ae_title": "STORESCU"},
             {"name": "viewer", "ae_title": "STORESCP", "host": "127.0.0.1", "port": storescp.port}]
    rules = [
        {"name": "denoise-a", "when": "Modality == 'CT'", "pipeline": "ct-denoise-classical",
         "destinations": ["viewer"], "params": {"strength": 0.8}},
        {"name": "denoise-b", "when": "Modality == 'CT'", "pipeline": "ct-denoise-classical",
         "destinations": ["viewer"], "params": {"strength": 0.5},
         "webhook_url": receiver.url("/flaky"), "webhook_secret": RULE_SECRET},
    ]
    try:
        node = web_node(peers, rules, notify={"webhook_url": receiver.url("/global"), "webhook_secret": GLOBAL_SECRET,
                                              "backoff_seconds": 0.3, "max_attempts": 4})
        files = marked_series(ge_head, tmp_path / "series", SLICES)
        sent = storescu(node.port, *files)
        assert sent.returncode == 0, sent.stderr

        wait_for(lambda: receiver.accepted("/global") and receiver.accepted("/flaky"), 240,
                 "one accepted webhook call per job")
        time.sleep(2.0)  # no second call may follow
        a, b = receiver.accepted("/global"), receiver.accepted("/flaky")
        assert len(a) == 1 and len(b) == 1
        flaky = [c for c in receiver.calls if c["path"] == "/flaky"]
        assert [c["status"] for c in flaky] == [500, 204]
        assert flaky[0]["headers"]["x-pacsnode-delivery"] == flaky[1]["headers"]["x-pacsnode-delivery"]

        assert signature_ok(GLOBAL_SECRET, a[0]) and signature_ok(RULE_SECRET, b[0])
        assert not signature_ok(GLOBAL_SECRET, b[0])  # each rule's secret is its own
        from pacs_node.notify import verify

        assert verify(RULE_SECRET, b[0]["headers"], b[0]["body"])
        assert not verify(RULE_SECRET, b[0]["headers"], b[0]["body"] + b" ")

        source = pydicom.dcmread(files[0])
        bodies = {json.loads(c["body"])["job"]["rule"]: json.loads(c["body"]) for c in a + b}
        assert set(bodies) == {"denoise-a", "denoise-b"}
        for body in bodies.values():
            assert body["event"] == "job.done" and body["job"]["outcome"] == "done"
            assert body["job"]["pipeline"] == "ct-denoise-classical" and body["job"]["result_count"] == SLICES
            assert body["series_uid"] == source.SeriesInstanceUID and body["study_uid"] == source.StudyInstanceUID
            assert {"completion", "queue", "model", "send", "total"} <= set(body["timings_seconds"])
            assert body["deliveries"] == [{"destination": "viewer", "state": "done", "sent": SLICES, "failed": 0,
                                           "status": None}]
        assert bodies["denoise-a"]["job"]["id"] != bodies["denoise-b"]["job"]["id"]

        base = f"http://127.0.0.1:{node.http_port}"
        pages = [requests.get(base + path, timeout=60).text for path in
                 ("/", "/jobs", "/rules", "/peers", "/metrics", f"/series/{source.SeriesInstanceUID}",
                  f"/rules?series={source.SeriesInstanceUID}")]
        assert 'pacs_node_webhook_calls_total{outcome="ok"} 2.0' in pages[4]
        assert 'pacs_node_webhook_calls_total{outcome="retry"} 1.0' in pages[4]
        raw = [json.dumps(c["headers"]) + c["body"].decode() for c in receiver.calls]
        assert phi_found(*raw, *pages, node.log()) == []
    finally:
        receiver.stop()


def test_processes_sharing_postgresql_call_once_per_job(tmp_path):
    """Two serving processes on one PostgreSQL database: only the lock holder calls; when it
    stops, the other takes over and calls for the job that ended meanwhile — once."""
    import os
    import uuid

    import psycopg

    from pacs_node.config import parse
    from pacs_node.notify import WebhookNotifier
    from pacs_node.store.index import AuditEvent, Database, Job, Patient, Series, Study, utcnow

    admin = os.environ.get("PACS_NODE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"pacsnode_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    receiver = Receiver()
    dbs: list[Database] = []
    try:
        url = admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
        settings = parse({"notify": {"webhook_url": receiver.url("/global"), "webhook_secret": GLOBAL_SECRET},
                          "rules": [{"name": "r", "when": "Modality == 'CT'", "pipeline": "p"}]})
        dbs = [Database(url), Database(url, run_migrations=False)]

        def end_job(job_id: int):  # type: ignore[no-untyped-def]
            def go(session) -> None:  # type: ignore[no-untyped-def]
                if session.get(Series, 1) is None:
                    session.add(Patient(id=1, key="k"))
                    session.flush()
                    session.add(Study(id=1, study_uid="1.2", patient_id=1))
                    session.flush()
                    session.add(Series(id=1, series_uid="1.2.3", study_id=1, modality="CT"))
                    session.flush()
                session.add(Job(id=job_id, series_id=1, generation=job_id, rule="r", pipeline="p", state="done",
                            finished_at=utcnow()))
                session.add(AuditEvent(event="job-done", job_id=job_id))  # as jobs.py writes it, same transaction
            dbs[0].run(go)

        end_job(1)
        stops = [threading.Event(), threading.Event()]
        notifiers = [WebhookNotifier(db, settings, poll_seconds=0.2) for db in dbs]
        threads = [threading.Thread(target=n.run, args=(s,), daemon=True) for n, s in zip(notifiers, stops, strict=True)]
        for t in threads:
            t.start()
        wait_for(lambda: receiver.accepted("/global"), 30, "the first job's call")
        time.sleep(1.5)
        assert len(receiver.accepted("/global")) == 1
        leader = 0 if notifiers[0].leadership._conn is not None else 1
        stops[leader].set()
        threads[leader].join(10)
        end_job(2)
        wait_for(lambda: len(receiver.accepted("/global")) == 2, 30, "the other process to call for job 2")
        time.sleep(1.5)
        ids = sorted(json.loads(c["body"])["job"]["id"] for c in receiver.accepted("/global"))
        assert ids == [1, 2]
        stops[1 - leader].set()
        threads[1 - leader].join(10)
    finally:
        receiver.stop()
        for db in dbs:
            db.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
