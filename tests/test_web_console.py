"""The console in-process (Starlette's TestClient over a node that is not started): logins,
actions and who may take them, config keys, the STOW-RS multipart reader, webhook signatures."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from pacs_node.config import parse
from pacs_node.errors import ConfigError
from pacs_node.notify import sign, verify
from pacs_node.store.index import Delivery, Job, Patient, Series, Study, utcnow
from pacs_node.web import stow
from pacs_node.web.auth import Auth, hash_password, verify_password

TOKEN = "console-admin-token-0123456789"
PASSWORD = "a long passphrase for the console"


def settings_for(tmp_path: Path, **http):  # type: ignore[no-untyped-def]
    users = [{"name": "admin", "password_hash": hash_password(PASSWORD, iterations=1000)}]
    return parse({
        "node": {"storage_dir": str(tmp_path / "storage"), "database_url": f"sqlite:///{tmp_path / 'node.db'}"},
        "http": {"enabled": True, "admin_token": TOKEN, "users": users, **http},
        "peers": [{"name": "viewer", "ae_title": "VIEWER", "host": "127.0.0.1", "port": 1}],
        "rules": [{"name": "ct", "when": "Modality == 'CT'", "pipeline": "ct-denoise-classical",
                   "destinations": ["viewer"]}],
    })


@pytest.fixture
def console(tmp_path: Path):  # type: ignore[no-untyped-def]
    from pacs_node.node import Node
    from pacs_node.web.app import build_app

    node = Node(settings_for(tmp_path))

    def rows(session) -> None:  # type: ignore[no-untyped-def]
        patient = Patient(key="k" * 64)
        session.add(patient)
        session.flush()
        study = Study(study_uid="1.2.3", patient_id=patient.id)
        session.add(study)
        session.flush()
        now = utcnow()
        series = Series(series_uid="1.2.3.4", study_id=study.id, modality="CT", calling_ae="MODALITY", state="complete",
                        instance_count=0, first_received_at=now, last_received_at=now, completed_at=now)
        session.add(series)
        session.flush()
        session.add(Job(id=1, series_id=series.id, rule="ct", pipeline="ct-denoise-classical", state="queued"))
        session.add(Job(id=2, series_id=series.id, rule="ct", pipeline="ct-denoise-classical", state="failed",
                        generation=2, encoded_at=now, finished_at=now, error="viewer: association failed"))
        session.flush()
        session.add(Delivery(job_id=2, destination="viewer", ae_title="VIEWER", host="127.0.0.1", port=1,
                             state="failed", attempts=3, last_error="association failed", finished_at=now))

    node.db.run(rows)
    with TestClient(build_app(node), base_url="http://console.test") as client:
        yield client, node
    node.db.dispose()


def test_pages_render_without_login(console) -> None:  # type: ignore[no-untyped-def]
    client, _ = console
    for path in ("/", "/fragments/dashboard", "/jobs", "/jobs?state=failed", "/rules", "/peers", "/series/1.2.3.4",
                 "/login", "/metrics", "/static/style.css", "/static/live.js"):
        assert client.get(path).status_code == 200, path
    assert client.get("/series/9.9.9").status_code == 404
    assert 'data-testid="retry-2"' in client.get("/jobs").text


def test_actions_need_a_login_or_the_token(console) -> None:  # type: ignore[no-untyped-def]
    client, node = console
    assert client.post("/jobs/2/retry").status_code == 401
    html = client.post("/jobs/2/retry", headers={"Accept": "text/html"}, follow_redirects=False)
    assert html.status_code == 303 and html.headers["location"].startswith("/login")
    assert client.post("/jobs/2/retry", headers={"Authorization": "Bearer wrong"}).status_code == 401
    # a form posted from another site is refused even with a valid session
    assert client.post("/jobs/2/retry", headers={"Authorization": f"Bearer {TOKEN}",
                                                  "Origin": "http://evil.test"}).status_code == 403

    done = client.post("/jobs/2/retry", headers={"Authorization": f"Bearer {TOKEN}"}, follow_redirects=False)
    assert done.status_code == 303 and "resending" in done.headers["location"]
    assert node.db.run(lambda s: s.get(Job, 2).state) == "sending"


def test_login_with_user_then_cancel_a_queued_job(console) -> None:  # type: ignore[no-untyped-def]
    client, node = console
    assert client.post("/login", data={"name": "admin", "password": "wrong", "next": "/jobs"}).status_code == 401
    ok = client.post("/login", data={"name": "admin", "password": PASSWORD, "next": "https://elsewhere.test/x"},
                     follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == "/x"  # no open redirect
    cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    cancelled = client.post("/jobs/1/cancel", follow_redirects=False)
    assert cancelled.status_code == 303 and "cancelled" in cancelled.headers["location"]
    job = node.db.run(lambda s: s.get(Job, 1))
    assert job.state == "failed" and "cancelled by admin" in job.error
    again = client.post("/jobs/1/cancel", follow_redirects=False)
    assert "only+a+queued+job" in again.headers["location"]
    # the token works as a password at the login form too
    client.cookies.clear()
    assert client.post("/login", data={"name": "", "password": TOKEN}, follow_redirects=False).status_code == 303


def test_session_cookie_cannot_be_forged() -> None:
    auth = Auth(parse({"http": {"admin_token": TOKEN}}).http)
    cookie = auth.session_cookie("admin")
    assert auth.user_from_cookie(cookie) == "admin"
    user, expires, mac = cookie.split("|")
    assert auth.user_from_cookie(f"root|{expires}|{mac}") is None
    assert auth.user_from_cookie(f"admin|{int(time.time()) - 1}|{mac}") is None
    assert Auth(parse({"http": {"admin_token": TOKEN}}).http).user_from_cookie(cookie) is None  # new key per start


def test_password_hashes() -> None:
    encoded = hash_password("s3cret", iterations=1000)
    assert encoded.startswith("pbkdf2_sha256$1000$")
    assert verify_password("s3cret", encoded) and not verify_password("s3cret ", encoded)
    assert not verify_password("s3cret", "pbkdf2_sha256$1000$broken")


@pytest.mark.parametrize("data, key", [
    ({"http": {"port": 0}}, "http.port"),
    ({"http": {"admin_token": "short"}}, "http.admin_token"),
    ({"http": {"users": [{"name": "a", "password_hash": "plain"}]}}, "http.users[0].password_hash"),
    ({"http": {"users": [{"password_hash": "x"}]}}, "http.users[0].name"),
    ({"http": {"listen": 1}}, "http.listen"),
    ({"notify": {"webhook_url": "http://hook.test/"}}, "notify.webhook_secret"),
    ({"notify": {"webhook_url": "ftp://hook.test/", "webhook_secret": "x"}}, "notify.webhook_url"),
    ({"peers": [{"name": "p", "ae_title": "P", "stow_token": 5}]}, "peers[0].stow_token"),
    ({"rules": [{"name": "r", "when": "Modality == 'CT'", "pipeline": "p", "webhook_url": "http://h.test/"}]},
     "rules[0].webhook_secret"),
])
def test_config_errors_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(data)
    assert key in str(err.value)


def test_multipart_reader() -> None:
    body = (b"preamble\r\n--XyZ\r\nContent-Type: application/dicom\r\n\r\nfirst\r\n--XyZ\r\n\r\nsecond\r\n"
            b"--XyZ\r\nContent-Type: application/dicom+json\r\n\r\n{}\r\n--XyZ--\r\n")
    parts = stow.split_parts(body, stow.boundary_of('multipart/related; type="application/dicom"; boundary="XyZ"'))
    assert [(p.content_type, p.body) for p in parts] == [
        ("application/dicom", b"first"), ("application/dicom", b"second"), ("application/dicom+json", b"{}")]
    for content_type, status in (("application/dicom", 415), ('multipart/related; type="application/dicom+xml"; boundary=a', 415),
                                 ('multipart/related; type="application/dicom"', 400)):
        with pytest.raises(stow.StowRequestError) as err:
            stow.boundary_of(content_type)
        assert err.value.status == status
    with pytest.raises(stow.StowRequestError):
        stow.split_parts(b"--XyZ\r\n\r\nno end", "XyZ")


def test_webhook_signature_and_replay_window() -> None:
    body = b'{"event": "job.done"}'
    now = time.time()
    headers = {"X-PacsNode-Timestamp": str(int(now)), "X-PacsNode-Signature": sign("k", str(int(now)), body)}
    assert verify("k", headers, body, now=now)
    assert not verify("other", headers, body, now=now)
    assert not verify("k", headers, body + b" ", now=now)
    assert not verify("k", headers, body, now=now + 3600)  # an old call replayed


def test_job_stages_from_the_row() -> None:
    from pacs_node.notify import job_stages

    t0 = dt.datetime(2026, 1, 1, 12, 0, 0)
    job = Job(last_instance_at=t0, series_completed_at=t0 + dt.timedelta(seconds=1),
              started_at=t0 + dt.timedelta(seconds=1.5), encoded_at=t0 + dt.timedelta(seconds=9),
              finished_at=t0 + dt.timedelta(seconds=10), timings="load=0.50 model=6.00 encode=0.40 write=0.10")
    assert job_stages(job) == {"completion": 1.0, "queue": 0.5, "load": 0.5, "model": 6.0, "encode": 0.4,
                               "write": 0.1, "send": 1.0, "total": 10.0}
