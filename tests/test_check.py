"""`pacs-node check`: each finding against the real thing (DCMTK storescp as a peer, a closed
port, a port held by another process, a running node, an older database schema, openssl-made
certificates), run as the command line an administrator types."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

from conftest import BIN, StoreSCP, free_port, node_config


def check(config: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "pacs-node"), "check", "--config", str(config), *extra], capture_output=True,
                          text=True, cwd=config.parent, timeout=180, env={**os.environ, **(env or {})})


def line(out: str, level: str, what: str) -> str:
    """The one output line with this level and subject (fails the test if there is none)."""
    found = [ln for ln in out.splitlines() if ln.split()[:2] == [level, what]]
    assert found, f"no '{level} {what}' line in:\n{out}"
    return found[0]


def migrate_to(url: str, revision: str) -> None:
    from alembic import command

    from pacs_node.store.index import alembic_config

    command.upgrade(alembic_config(url), revision)


def test_check_names_each_problem_and_exits_1(tmp_path: Path, storescp: StoreSCP) -> None:
    down = free_port()  # nothing listens here
    port = free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()  # another process's listener on the node's port
    peers = [{"name": "dest", "ae_title": "STORESCP", "host": "127.0.0.1", "port": storescp.port},
             {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": down}]
    rules = [{"name": "ct", "when": "Modality == 'CT'", "pipeline": "ct-denoise-classical", "destinations": ["dest"]},
             {"name": "mr", "when": "Modality == 'MR'", "pipeline": "anomaly-ct", "destinations": ["archive"]}]
    config = tmp_path / "node.toml"
    config.write_text(node_config(port, peers, rules))
    (tmp_path / "storage").write_text("a file where the storage folder should be")
    migrate_to(f"sqlite:///{tmp_path / 'node.db'}", "0002")
    try:  # a models folder without the anomaly-ct weights: that rule's pipeline cannot be loaded
        out = check(config, env={"PACS_NODE_MODELS": str(tmp_path / "no-models")})
    finally:
        holder.close()
    assert out.returncode == 1, out.stdout + out.stderr
    assert "is not a folder" in line(out.stdout, "FAIL", "storage")
    assert "schema 0002, upgraded to 0003 at start" in line(out.stdout, "warn", "database")
    assert f"127.0.0.1:{port} in use by another process (no DICOM answer)" in line(out.stdout, "FAIL", "DICOM")
    assert "ct-denoise-classical (rule ct): loaded" in out.stdout
    assert "anomaly-ct (rule mr): cannot be loaded" in line(out.stdout, "FAIL", "pipeline")
    assert f"dest: C-ECHO STORESCP@127.0.0.1:{storescp.port}: success" in line(out.stdout, "ok", "peer")
    assert f"archive: C-ECHO ARCHIVE@127.0.0.1:{down}: cannot connect" in line(out.stdout, "FAIL", "peer")
    assert out.stdout.rstrip().endswith("4 problem(s), 1 warning(s)")
    assert "Traceback" not in out.stderr and "ERROR" not in out.stderr  # findings, not library noise
    # it changed nothing: the old schema is still there, no probe file was left
    out = check(config, "--no-echo", "--no-pipelines")
    subjects = {ln.split()[1] for ln in out.stdout.splitlines()[:-1]}
    assert "schema 0002" in out.stdout and not subjects & {"peer", "pipeline"}, out.stdout


def test_check_passes_on_a_working_node_and_sees_it_running(node_factory, storescp: StoreSCP) -> None:
    node = node_factory([{"name": "dest", "ae_title": "STORESCP", "host": "127.0.0.1", "port": storescp.port}],
                        [{"name": "ct", "when": "Modality == 'CT'", "pipeline": "ct-denoise-classical",
                          "destinations": ["dest"]}])
    out = node.cli("check")  # exit status 0 or it raises
    assert "writable" in line(out.stdout, "ok", "storage")
    assert "schema 0003 (current)" in line(out.stdout, "ok", "database")
    # the node's run file (storage/run/<host>.json) names a live pid holding the port
    assert "in use by this node, already running (pid " in line(out.stdout, "warn", "DICOM")
    assert "success" in line(out.stdout, "ok", "peer")
    assert not list((node.root / "storage").glob(".pacs-node-check-*"))


def test_check_reads_the_tls_certificate(tmp_path: Path) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.pem",
            "-days", "10", "-subj", "/CN=pacs-node")
    openssl("genrsa", "-out", "other.key", "2048")
    config = tmp_path / "node.toml"
    base = node_config(free_port(), [], [])
    config.write_text(base + f'\n[tls]\ncertificate = "{tmp_path / "node.pem"}"\nprivate_key = "{tmp_path / "node.key"}"\n')
    out = check(config)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "node.pem expires on" in line(out.stdout, "warn", "TLS") and "in 10 days" in out.stdout
    config.write_text(base + f'\n[tls]\ncertificate = "{tmp_path / "node.pem"}"\nprivate_key = "{tmp_path / "other.key"}"\n')
    out = check(config)
    assert out.returncode == 1
    assert "does the key belong to the certificate?" in line(out.stdout, "FAIL", "TLS")


def test_check_says_why_the_database_cannot_be_reached_without_showing_its_password(tmp_path: Path) -> None:
    closed = free_port()
    config = tmp_path / "node.toml"
    config.write_text(node_config(free_port(), [], []).replace(
        'database_url = "sqlite:///node.db"', f'database_url = "postgresql+psycopg://pacs:s3cret@127.0.0.1:{closed}/pacs"'))
    out = check(config)
    assert out.returncode == 1
    found = line(out.stdout, "FAIL", "database")
    assert f"127.0.0.1:{closed}/pacs: cannot connect" in found and "***" in found
    assert "s3cret" not in out.stdout + out.stderr


def test_healthz_is_200_on_a_running_node_and_503_naming_what_broke(tmp_path: Path) -> None:
    """GET /healthz (no login, no patient data): database, storage, DICOM listener, node loops."""
    import threading

    from starlette.testclient import TestClient

    from pacs_node.config import parse
    from pacs_node.node import Node
    from pacs_node.web.app import build_app

    settings = parse({"node": {"host": "127.0.0.1", "port": free_port(), "storage_dir": str(tmp_path / "storage"),
                               "database_url": f"sqlite:///{tmp_path / 'node.db'}"},
                      "http": {"enabled": False}, "retention": {"days": 0}})  # off: its loop idles, not ends
    node = Node(settings)
    client = TestClient(build_app(node), base_url="http://node.test")
    before = client.get("/healthz")  # not started: nothing listens
    assert before.status_code == 503 and before.json()["checks"]["dicom listener"].startswith("fail")
    assert before.json()["checks"]["database"] == "ok"
    node.start()
    from pacs_node.node import run_file

    assert json.loads(run_file(settings).read_text())["pid"] == os.getpid()
    try:
        ok = client.get("/healthz")
        assert ok.status_code == 200, ok.text
        assert ok.json()["status"] == "ok" and ok.json()["checks"]["storage"].startswith("ok: ")
        ended = threading.Thread(target=lambda: None, name="sender")
        ended.start()
        ended.join()
        node._threads.append(ended)  # a node loop that died
        broken = client.get("/healthz")
        assert broken.status_code == 503 and broken.json()["checks"]["threads"] == "fail: ended: sender"
    finally:
        node.stop()
    assert client.get("/healthz").status_code == 503  # stopped: the listener is gone
    assert not run_file(settings).exists()


def test_check_tells_another_dicom_application_and_a_port_used_twice_from_a_running_node(
        tmp_path: Path, storescp: StoreSCP) -> None:
    config = tmp_path / "node.toml"
    config.write_text(node_config(storescp.port, [], []))  # DCMTK storescp holds the node's port
    out = check(config, "--no-echo", "--no-pipelines")
    assert out.returncode == 1
    assert "a DICOM application 'OFFIS_DCMTK" in line(out.stdout, "FAIL", "DICOM")
    port = free_port()
    config.write_text(node_config(port, [], [], http={"enabled": True, "host": "127.0.0.1", "port": port}))
    out = check(config, "--no-echo", "--no-pipelines")
    assert out.returncode == 1
    assert f"127.0.0.1:{port} free to listen on" in line(out.stdout, "ok", "DICOM")
    assert f"127.0.0.1:{port} is the DICOM port too" in line(out.stdout, "FAIL", "HTTP")


def test_check_reports_bad_settings_as_findings_not_tracebacks(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out",
                    "node.pem", "-days", "365", "-subj", "/CN=pacs-node"], cwd=tmp_path, check=True, capture_output=True)
    config = tmp_path / "node.toml"
    text = node_config(free_port(), [], []).replace('database_url = "sqlite:///node.db"',
                                                    'database_url = "pacs:s3cret@dbhost/pacs"')
    config.write_text(text + f'\n[tls]\ncertificate = "{tmp_path / "node.pem"}"\nprivate_key = "{tmp_path / "node.key"}"'
                             f'\nca_certificates = "{tmp_path / "ca.pem"}"\n')
    out = check(config, "--no-echo", "--no-pipelines")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "is not a database URL" in line(out.stdout, "FAIL", "database")
    assert "ca_certificates" in line(out.stdout, "FAIL", "TLS")
    assert "free to listen on" in line(out.stdout, "ok", "DICOM")  # the checks after the database still ran
    assert "s3cret" not in out.stdout + out.stderr
    # a SQLite URL with options names the same file the node opens
    migrate_to(f"sqlite:///{tmp_path / 'opts.db'}", "0002")
    config.write_text(node_config(free_port(), [], []).replace(
        'database_url = "sqlite:///node.db"', f'database_url = "sqlite:///{tmp_path / "opts.db"}?timeout=30"'))
    assert "schema 0002" in line(check(config, "--no-echo", "--no-pipelines").stdout, "warn", "database")


def test_a_run_file_left_by_a_killed_node_does_not_excuse_a_held_port(tmp_path: Path) -> None:
    from pacs_node.config import load
    from pacs_node.node import run_file

    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(node_config(port, [], []))
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    path = run_file(load(config))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": gone.pid, "port": port, "started": "2026-11-29T00:00:00+00:00"}))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        out = check(config, "--no-echo", "--no-pipelines")
    assert out.returncode == 1
    assert "in use by another process (no DICOM answer)" in line(out.stdout, "FAIL", "DICOM")


def test_healthz_names_a_database_failure_without_its_host_or_user(tmp_path: Path, caplog) -> None:
    import logging

    from starlette.testclient import TestClient

    from pacs_node.config import parse
    from pacs_node.node import Node
    from pacs_node.web.app import build_app

    settings = parse({"node": {"storage_dir": str(tmp_path / "storage"),
                               "database_url": f"sqlite:///{tmp_path / 'node.db'}"}})
    node = Node(settings)
    node.db.engine.dispose()
    (tmp_path / "node.db").unlink()
    (tmp_path / "node.db").mkdir()  # the database file is now a folder: every connect fails
    with caplog.at_level(logging.WARNING, logger="pacs_node.check"):
        answer = TestClient(build_app(node)).get("/healthz")
    assert answer.status_code == 503
    database = answer.json()["checks"]["database"]
    assert database.startswith("fail: ") and "node.db" not in database and str(tmp_path) not in database
    assert "the database does not answer SELECT 1" in caplog.text


def test_check_connects_to_each_webhook_without_calling_it(tmp_path: Path) -> None:
    closed = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        open_port = listener.getsockname()[1]
        config = tmp_path / "node.toml"
        config.write_text(node_config(
            free_port(), [{"name": "dest", "ae_title": "DEST", "host": "127.0.0.1", "port": closed}],
            [{"name": "ct", "when": "Modality == 'CT'", "pipeline": "ct-denoise-classical", "destinations": ["dest"],
              "webhook_url": f"http://127.0.0.1:{closed}/hook", "webhook_secret": "0123456789abcdef0123"}],
            notify={"webhook_url": f"http://user:pw@127.0.0.1:{open_port}/ris?token=t0k3n",
                    "webhook_secret": "0123456789abcdef0123"}))
        out = check(config, "--no-pipelines")
        listener.settimeout(1)
        conn, _ = listener.accept()  # check's connection: nothing was sent on it
        conn.settimeout(2)
        assert conn.recv(1) == b""
        conn.close()
    assert out.returncode == 1
    assert f"http://127.0.0.1:{open_port}/ris ([notify]): takes connections" in line(out.stdout, "ok", "webhook")
    assert f"http://127.0.0.1:{closed}/hook (rule ct): cannot connect" in line(out.stdout, "FAIL", "webhook")
    assert "pw" not in out.stdout and "t0k3n" not in out.stdout
