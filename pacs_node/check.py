"""`pacs-node check`: what the node needs, checked without starting it.

Run it after editing the configuration, before restarting the service, or at 3 a.m. when
results stop arriving: each line names one thing (storage, database, a port, a pipeline's
model, a peer) and says ``ok``, ``warn`` (the node runs, but look at it) or ``FAIL`` (the node
will not start, or that part will not work). Exit status 0 when nothing failed, 1 otherwise.
It changes nothing: no database is created or upgraded, no file is left behind.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from .config import Settings

log = logging.getLogger(__name__)

#: free space under which storage gets a warning (the node refuses instances, status 0xA700,
#: when a write fails for lack of space)
LOW_FREE_BYTES = 5 * 1024 ** 3
#: a certificate that expires within this many days gets a warning
CERT_WARN_DAYS = 30


@dataclass(frozen=True)
class Finding:
    level: str  # "ok", "warn" or "FAIL"
    what: str
    detail: str


def _nearest_existing(path: Path) -> Path:
    """``path`` or the closest folder above it that exists (where it would be created)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _driver_reason(exc: BaseException) -> str:
    """The first line of what the database driver said (SQLAlchemy wraps it in ``orig``)."""
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]


def _storage(settings: Settings) -> Iterator[Finding]:
    root = Path(settings.node.storage_dir)
    existing = _nearest_existing(root)
    if root.exists() and not root.is_dir():
        yield Finding("FAIL", "storage", f"{root} exists and is not a folder")
        return
    if not root.exists():
        if not os.access(existing, os.W_OK | os.X_OK):
            yield Finding("FAIL", "storage", f"{root} does not exist and {existing} is not writable to create it")
            return
        where = existing
        note = f"{root} does not exist yet (created at start)"
    else:
        where = root
        # instances are written into incoming/, then renamed into instances/: both must take files
        for folder in (root / "incoming", root / "instances", root / "results"):
            if folder.exists() and not os.access(folder, os.W_OK | os.X_OK):
                yield Finding("FAIL", "storage", f"{folder} is not writable by this user")
                return
        probe_in = root / "incoming" if (root / "incoming").is_dir() else root
        try:
            fd, name = tempfile.mkstemp(prefix=".pacs-node-check-", dir=probe_in)
            try:
                os.write(fd, b"pacs-node check\n")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(name)
        except OSError as exc:
            yield Finding("FAIL", "storage", f"{probe_in}: cannot write a file: {exc.strerror or exc}")
            return
        note = f"{root} writable"
    usage = shutil.disk_usage(where)
    free = f"{usage.free / 1024 ** 3:.1f} GiB free ({100 * usage.free / max(usage.total, 1):.0f} %)"
    keep = (f"series kept {settings.retention.days:g} days" if settings.retention.days > 0
            else "retention off: nothing is ever deleted")
    if usage.free < LOW_FREE_BYTES:
        yield Finding("warn", "storage", f"{note}, only {free}: instances are refused (0xA700) when the disk "
                                         f"is full; {keep}")
    else:
        yield Finding("ok", "storage", f"{note}, {free}; {keep}")


def _database(settings: Settings) -> Iterator[Finding]:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from .store.index import alembic_config, connect_args

    url = settings.node.database_url
    try:
        parsed = make_url(url)
    except Exception as exc:  # noqa: BLE001 - a malformed URL is the finding; it may hold a password
        yield Finding("FAIL", "database", f"database_url is not a database URL ({type(exc).__name__}); expected "
                                          f"sqlite:///PATH or postgresql+psycopg://USER@HOST/NAME")
        return
    shown = parsed.render_as_string(hide_password=True)
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if path and path != ":memory:" and not Path(path).exists():
            folder = _nearest_existing(Path(path).parent)
            if not os.access(folder, os.W_OK | os.X_OK):
                yield Finding("FAIL", "database", f"{shown}: does not exist and {folder} is not writable to create it")
            else:
                yield Finding("ok", "database", f"{shown}: does not exist yet (created at start, schema {head})")
            return
    try:
        engine = create_engine(url, connect_args=connect_args(url))
        try:
            with engine.connect() as conn:
                current = MigrationContext.configure(conn).get_current_revision()
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any driver error is the finding
        yield Finding("FAIL", "database", f"{shown}: cannot connect: {_driver_reason(exc)}")
        return
    known = {rev.revision for rev in script.walk_revisions()}
    if current == head:
        yield Finding("ok", "database", f"{shown}: schema {current} (current)")
    elif current is None:
        yield Finding("ok", "database", f"{shown}: empty (the schema {head} is created at start)")
    elif current not in known:
        yield Finding("FAIL", "database", f"{shown}: schema {current} is not one this pacs-node knows (newer "
                                          f"version?); this version's latest is {head}")
    else:
        yield Finding("warn", "database", f"{shown}: schema {current}, upgraded to {head} at start (back it up first)")


def _ports(settings: Settings) -> Iterator[Finding]:
    """Each listening port, bound the way the node binds it and all held until the last is tried
    (two settings naming one port collide here as they would at start): free; or held by this
    node, already running (its run file names a live pid); or held by something else."""
    ports = [("DICOM port", settings.node.host, settings.node.port)]
    if settings.tls.port is not None:
        ports.append(("DICOM TLS port", settings.node.host, int(settings.tls.port)))
    if settings.http.enabled:
        ports.append(("HTTP port", settings.http.host, settings.http.port))
    held: list[socket.socket] = []
    bound: list[tuple[str, int]] = []
    failures: list[tuple[str, str, int, OSError, str | None]] = []
    try:
        for what, host, port in ports:
            try:
                held.append(socket.create_server((host, port)))
            except OSError as exc:
                twin = next((w for w, p in bound if p == port), None)
                failures.append((what, host, port, exc, twin))
            else:
                bound.append((what, port))
                yield Finding("ok", what, f"{host}:{port} free to listen on")
    finally:
        for sock in held:
            sock.close()
    running = _running_node(settings)
    answer: str | None = None
    for what, host, port, exc, twin in failures:
        if exc.errno == errno.EADDRINUSE and twin is not None:
            yield Finding("FAIL", what, f"{host}:{port} is the {twin} too: the two cannot share it")
        elif exc.errno == errno.EADDRINUSE and running is not None and port in running[1]:
            yield Finding("warn", what, f"{host}:{port} in use by this node, already running ({running[0]})")
        elif exc.errno == errno.EADDRINUSE:
            if answer is None:
                answer = _who_answers(settings) if what.startswith("DICOM") else "not a DICOM port: not probed"
            yield Finding("FAIL", what, f"{host}:{port} in use by another process ({answer}): the node cannot "
                                        f"listen there")
        elif exc.errno in (errno.EACCES, errno.EPERM):
            yield Finding("FAIL", what, f"{host}:{port}: no permission to listen (ports below 1024 need root or "
                                        f"CAP_NET_BIND_SERVICE)")
        else:
            yield Finding("FAIL", what, f"{host}:{port}: cannot listen: {exc.strerror or exc}")


def _running_node(settings: Settings) -> tuple[str, set[int]] | None:
    """This configuration's node, when it runs on this host: (who, its ports), from the run file
    it keeps in storage_dir (``node.run_file``) and a live pid."""
    import json

    from .node import run_file

    try:
        info = json.loads(run_file(settings).read_text())
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # left by a node that was killed
    except PermissionError:
        pass  # alive, another user's
    ports = {int(p) for p in (info.get("port"), info.get("tls_port"), info.get("http_port")) if p}
    return f"pid {pid}, since {info.get('started', '?')}", ports


def _who_answers(settings: Settings) -> str:
    """What answers an association on the node's DICOM port: the Implementation Version Name it
    gives in its A-ASSOCIATE-AC (a pacs-node says PACS_NODE_<version>), or what happened."""
    from .net.echo import echo

    node = settings.node
    wildcard = node.host in ("", "0.0.0.0", "::")
    host = ("::1" if node.host == "::" else "127.0.0.1") if wildcard else node.host
    context = None
    tls = settings.tls
    if tls.listening and tls.port is None:  # node.port speaks TLS only
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # identifying, not trusting
        try:
            context.load_cert_chain(str(tls.certificate), str(tls.private_key))
        except (ssl.SSLError, OSError):
            pass
    outcome = echo(host, node.port, node.ae_title, node.ae_title, 5.0, context)
    if outcome.implementation.startswith("PACS_NODE"):
        return f"a pacs-node ({outcome.implementation}) of another configuration answers C-ECHO"
    if outcome.implementation:
        return f"a DICOM application '{outcome.implementation}' answers"
    if outcome.rejected:
        return f"a DICOM application that rejected an association from {node.ae_title}"
    return "no DICOM answer"


def _tls(settings: Settings) -> Iterator[Finding]:
    tls = settings.tls
    if tls.certificate is None:
        return
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(tls.certificate), str(tls.private_key))
    except (ssl.SSLError, OSError) as exc:
        yield Finding("FAIL", "TLS", f"{tls.certificate} with {tls.private_key}: {exc.strerror or exc} (does the "
                                     f"key belong to the certificate?)")
        return
    if tls.ca_certificates is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=str(tls.ca_certificates))
        except (ssl.SSLError, OSError) as exc:
            yield Finding("FAIL", "TLS", f"ca_certificates {tls.ca_certificates}: {exc.strerror or exc} (a PEM "
                                         f"bundle of CA certificates is expected)")
            return
    from .net.tls import certificate_not_after

    end = certificate_not_after(tls.certificate)
    if end is None:
        yield Finding("ok", "TLS", f"{tls.certificate}: certificate and key load (expiry not read)")
        return
    days = (end - datetime.now(timezone.utc)).total_seconds() / 86400
    when = end.strftime("%Y-%m-%d %H:%M UTC")
    if days < 0:
        yield Finding("FAIL", "TLS", f"{tls.certificate} expired on {when}: peers refuse the handshake")
    elif days < CERT_WARN_DAYS:
        yield Finding("warn", "TLS", f"{tls.certificate} expires on {when}, in {days:.0f} days")
    else:
        yield Finding("ok", "TLS", f"{tls.certificate}: certificate and key load, valid until {when}")


def _pipelines(settings: Settings) -> Iterator[Finding]:
    from .pipelines import get_pipeline

    if not settings.worker.enabled:
        yield Finding("ok", "pipeline", "not loaded: [worker] enabled = false (jobs run in `pacs-node worker` "
                                        "elsewhere; check there)")
        return
    used: dict[str, list[str]] = {}
    for rule in settings.rules:
        used.setdefault(rule.pipeline, []).append(rule.name)
    for name, rules in used.items():
        started = time.monotonic()
        which = f"{name} (rule{'s' if len(rules) > 1 else ''} {', '.join(rules)})"
        try:
            get_pipeline(name)
        except Exception as exc:  # noqa: BLE001 - the reason is the finding
            yield Finding("FAIL", "pipeline", f"{which}: cannot be loaded: {exc}")
            continue
        yield Finding("ok", "pipeline", f"{which}: loaded in {time.monotonic() - started:.1f} s")


def _peers(settings: Settings) -> Iterator[Finding]:
    from .net.echo import echo_peer

    for peer in settings.peers:
        if not peer.host or not peer.port:
            continue  # a sender only: nothing to call
        ok, message = echo_peer(settings, peer)
        yield Finding("ok" if ok else "FAIL", "peer", f"{peer.name}: {message}")


def _webhooks(settings: Settings) -> Iterator[Finding]:
    """Each webhook URL ([notify] and the rules' own): its host resolves and takes a TCP
    connection (no request is sent: a call would be an event to the receiver)."""
    import urllib.parse

    urls: dict[str, list[str]] = {}
    if settings.notify.webhook_url:
        urls.setdefault(settings.notify.webhook_url, []).append("[notify]")
    for rule in settings.rules:
        if rule.webhook_url:
            urls.setdefault(rule.webhook_url, []).append(f"rule {rule.name}")
    for url, users in urls.items():
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        shown = f"{parts.scheme}://{host}:{port}{parts.path}"  # no user:password@, no query
        timeout = min(settings.notify.timeout_seconds, 10.0)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            yield Finding("FAIL", "webhook", f"{shown} ({', '.join(users)}): cannot connect: {exc.strerror or exc}")
            continue
        yield Finding("ok", "webhook", f"{shown} ({', '.join(users)}): takes connections")


def run_checks(settings: Settings, echo: bool = True, pipelines: bool = True) -> Iterator[Finding]:
    """Every finding, in order: configuration, storage, database, ports, TLS, pipelines, peers.
    A check that itself breaks is a FAIL line naming it; the others still run."""
    yield Finding("ok", "config", f"{settings.source or 'defaults'}: {len(settings.peers)} peer(s), "
                                  f"{len(settings.rules)} rule(s)")
    steps: list[tuple[str, Callable[[Settings], Iterator[Finding]]]] = [
        ("storage", _storage), ("database", _database), ("ports", _ports), ("TLS", _tls)]
    if pipelines:
        steps.append(("pipeline", _pipelines))
    if echo:
        steps.append(("peer", _peers))
        steps.append(("webhook", _webhooks))
    for name, step in steps:
        try:
            yield from step(settings)
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            yield Finding("FAIL", name, f"the check itself failed: {type(exc).__name__}: {exc}")


#: free space under which /healthz fails: an instance cannot be written any more
FULL_BYTES = 64 * 1024 ** 2


def node_health(node) -> dict:  # type: ignore[no-untyped-def]
    """A running node's health for ``GET /healthz``: database answers, storage writable with room,
    DICOM listener accepting, no loop thread ended. ``{"status": "ok" | "unhealthy", "checks":
    {name: "ok ..." | "warn ..." | "fail ..."}}``; unhealthy when any check fails."""
    checks: dict[str, str] = {}
    try:
        node.db.ping()
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - the reason is the finding
        # /healthz needs no login: the driver's words (host, user name) go to the log, not the answer
        log.warning("health check: the database does not answer SELECT 1: %s", _driver_reason(exc)[:300])
        checks["database"] = f"fail: {type(getattr(exc, 'orig', None) or exc).__name__} (the node's log has the reason)"
    root = Path(node.files.root)
    try:
        usage = shutil.disk_usage(root)
    except OSError as exc:
        checks["storage"] = f"fail: {root}: {exc.strerror or exc}"
    else:
        free = f"{usage.free / 1024 ** 3:.1f} GiB free"
        unwritable = [f for f in (root / "incoming", root / "instances") if not os.access(f, os.W_OK | os.X_OK)]
        if unwritable:
            checks["storage"] = f"fail: {unwritable[0]} is not writable"
        elif usage.free < FULL_BYTES:
            checks["storage"] = f"fail: full ({usage.free / 1024 ** 2:.0f} MiB free)"
        elif usage.free < LOW_FREE_BYTES:
            checks["storage"] = f"warn: only {free}"
        else:
            checks["storage"] = f"ok: {free}"
    checks["dicom listener"] = "ok" if node.scp.listening else "fail: not accepting connections"
    stopped = node.stopped_threads()
    checks["threads"] = "ok" if not stopped else f"fail: ended: {', '.join(stopped)}"
    status = "unhealthy" if any(v.startswith("fail") for v in checks.values()) else "ok"
    return {"status": status, "checks": checks}
