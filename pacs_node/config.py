"""config.toml -> typed settings; every error names the bad key and the reason."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

PRIORITIES = ("stat", "routine", "research")


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "PACSNODE"
    host: str = "0.0.0.0"
    port: int = 11112
    storage_dir: Path = Path("var/storage")
    database_url: str = "sqlite:///var/pacs-node.db"
    allow_any_caller: bool = False
    log_level: str = "INFO"
    #: largest DICOM message (one instance) an association may send; larger ones are aborted
    max_instance_mb: float = 2048.0
    #: processes listening on the DICOM port (1 = the node process only)
    receivers: int = 1


@dataclass(frozen=True)
class CompletionSettings:
    quiet_seconds: float = 1.5
    max_wait_seconds: float = 600.0
    #: complete as soon as ImagesInAcquisition instances of the series have arrived
    use_images_in_acquisition: bool = True


@dataclass(frozen=True)
class SendSettings:
    max_attempts: int = 5
    backoff_seconds: float = 2.0
    backoff_max_seconds: float = 300.0
    timeout_seconds: float = 30.0


@dataclass(frozen=True)
class WorkerSettings:
    enabled: bool = True
    poll_seconds: float = 0.2
    #: a running job's lease; a worker renews it every third of this, and a job whose
    #: worker died is claimed again by another once it has expired
    lease_seconds: float = 60.0
    #: a routine job that has waited this long is taken before new stat jobs (no starvation)
    starvation_seconds: float = 600.0
    #: "HH:MM-HH:MM" (local time) when research jobs may run; empty: whenever nothing else waits
    research_window: str = ""
    #: read a series into memory while it waits out completion.quiet_seconds, for its job
    #: (pacs_node/readahead.py); the most MB of float32 voxels held so; 0 = off
    read_ahead_mb: int = 2048


@dataclass(frozen=True)
class Peer:
    name: str
    ae_title: str
    host: str | None = None
    port: int | None = None
    #: hosts/IPs a peer may call from (empty: any host, the AE title alone identifies it)
    allowed_hosts: tuple[str, ...] = ()
    #: send results to this peer over DICOM TLS (needs [tls] ca_certificates to verify it)
    tls: bool = False
    #: bearer token of this peer for DICOMweb STOW-RS (None: it cannot upload over HTTP)
    stow_token: str | None = None


@dataclass(frozen=True)
class TlsSettings:
    """DICOM TLS (PS3.15 B.1): our certificate, the CAs we trust, and whether callers need a certificate."""

    #: our certificate chain and key (PEM); shown to callers and, for mutual TLS, to peers we call
    certificate: Path | None = None
    private_key: Path | None = None
    #: CA bundle (PEM) that verifies peers we call and, with mutual TLS, callers' certificates
    ca_certificates: Path | None = None
    #: TLS listener port; absent: node.port itself speaks TLS only
    port: int | None = None
    #: mutual TLS: a caller without a certificate signed by ca_certificates is refused in the handshake
    require_client_certificate: bool = False
    #: check that a peer's certificate names the host we call (SAN DNS or IP)
    verify_peer_hostname: bool = True

    @property
    def listening(self) -> bool:
        return self.certificate is not None


@dataclass(frozen=True)
class Rule:
    name: str
    when: str
    pipeline: str
    destinations: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    priority: str = "routine"
    #: webhook called when this rule's jobs end (None: [notify] webhook_url)
    webhook_url: str | None = None
    webhook_secret: str | None = None


@dataclass(frozen=True)
class HttpUser:
    name: str
    #: "pbkdf2_sha256$<iterations>$<salt>$<hash>", made by `python -m pacs_node.web.auth`
    password_hash: str


@dataclass(frozen=True)
class HttpSettings:
    """The web console, /metrics and DICOMweb STOW-RS (pacs_node/web)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    #: a bearer token (or login with it) for actions that change state; None: users only
    admin_token: str | None = None
    users: tuple[HttpUser, ...] = ()


@dataclass(frozen=True)
class NotifySettings:
    """Webhook called when a job ends; a rule's own webhook_url/webhook_secret take precedence."""

    webhook_url: str | None = None
    webhook_secret: str | None = None
    max_attempts: int = 5
    backoff_seconds: float = 2.0
    timeout_seconds: float = 10.0


@dataclass(frozen=True)
class RetentionSettings:
    """How long received series and their results stay on this node (it is not an archive)."""

    #: a series' instance files and its jobs' result files are deleted this many days after its
    #: last instance arrived, once none of its jobs is queued, running or sending; 0 = never
    days: float = 7.0
    #: how often the node looks for such series
    interval_minutes: float = 60.0


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = NodeSettings()
    completion: CompletionSettings = CompletionSettings()
    send: SendSettings = SendSettings()
    worker: WorkerSettings = WorkerSettings()
    tls: TlsSettings = TlsSettings()
    http: HttpSettings = HttpSettings()
    notify: NotifySettings = NotifySettings()
    retention: RetentionSettings = RetentionSettings()
    peers: tuple[Peer, ...] = ()
    rules: tuple[Rule, ...] = ()
    source: Path | None = None

    def peer_by_name(self, name: str) -> Peer | None:
        return next((p for p in self.peers if p.name == name), None)

    def peer_by_ae(self, ae_title: str) -> Peer | None:
        return next((p for p in self.peers if p.ae_title == ae_title), None)


def toml_value(text: str) -> Any:
    """A command-line value read as TOML (numbers, booleans, arrays, quoted strings), else the text itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _take(table: dict[str, Any], key: str, prefix: str, kind: type | tuple[type, ...], default: Any) -> Any:
    if key not in table:
        return default
    value = table.pop(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{prefix}{key}", f"expected {names}, got {type(value).__name__} {value!r}")
    return value


def _no_unknown(table: dict[str, Any], prefix: str) -> None:
    if table:
        raise ConfigError(f"{prefix}{sorted(table)[0]}", "unknown key (check the spelling against config.toml)")


def _ae_title(value: str, key: str) -> str:
    if not value or len(value) > 16 or "\\" in value or not value.isprintable() or value != value.strip():
        raise ConfigError(key, f"AE title {value!r} must be 1-16 printable characters, no backslash or outer spaces")
    return value


def _port(value: int, key: str) -> int:
    if not 0 < value < 65536:
        raise ConfigError(key, f"port {value} out of range 1-65535")
    return value


def _positive(value: float, key: str, allow_zero: bool = False) -> float:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def _window(value: str, key: str) -> str:
    if not value:
        return ""
    import re

    m = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)", value.strip())
    if not m:
        raise ConfigError(key, f"{value!r} is not HH:MM-HH:MM (e.g. \"20:00-06:00\")")
    return value.strip()


def _webhook_url(value: str | None, key: str) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise ConfigError(key, f"{value!r} is not an http:// or https:// URL")
    return value


def _http_and_notify(data: dict[str, Any]) -> tuple[HttpSettings, NotifySettings]:
    h = data.pop("http", {})
    dh = HttpSettings()
    users = []
    for i, raw in enumerate(_take(h, "users", "http.", list, [])):
        u = dict(raw) if isinstance(raw, dict) else {}
        pre = f"http.users[{i}]."
        name = _take(u, "name", pre, str, "")
        password_hash = _take(u, "password_hash", pre, str, "")
        if not name:
            raise ConfigError(pre + "name", "required")
        if not password_hash.startswith("pbkdf2_sha256$") or password_hash.count("$") != 3:
            raise ConfigError(pre + "password_hash", "expected pbkdf2_sha256$<iterations>$<salt>$<hash> "
                              "(make one with: python -m pacs_node.web.auth)")
        _no_unknown(u, pre)
        users.append(HttpUser(name, password_hash))
    token = _take(h, "admin_token", "http.", str, None)
    if token is not None and len(token) < 16:
        raise ConfigError("http.admin_token", "must be at least 16 characters")
    http = HttpSettings(
        enabled=_take(h, "enabled", "http.", bool, dh.enabled),
        host=_take(h, "host", "http.", str, dh.host),
        port=_port(_take(h, "port", "http.", int, dh.port), "http.port"),
        admin_token=token,
        users=tuple(users),
    )
    _no_unknown(h, "http.")

    n = data.pop("notify", {})
    dn = NotifySettings()
    notify = NotifySettings(
        webhook_url=_webhook_url(_take(n, "webhook_url", "notify.", str, None), "notify.webhook_url"),
        webhook_secret=_take(n, "webhook_secret", "notify.", str, None),
        max_attempts=int(_positive(_take(n, "max_attempts", "notify.", int, dn.max_attempts), "notify.max_attempts")),
        backoff_seconds=_positive(_take(n, "backoff_seconds", "notify.", float, dn.backoff_seconds), "notify.backoff_seconds", True),
        timeout_seconds=_positive(_take(n, "timeout_seconds", "notify.", float, dn.timeout_seconds), "notify.timeout_seconds"),
    )
    if notify.webhook_url and not notify.webhook_secret:
        raise ConfigError("notify.webhook_secret", "required when notify.webhook_url is set (calls are signed)")
    _no_unknown(n, "notify.")
    return http, notify


def parse(data: dict[str, Any], base_dir: Path | None = None) -> Settings:
    """Turn the parsed TOML into Settings; relative paths resolve against ``base_dir``."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    base_dir = base_dir or Path.cwd()

    n = data.pop("node", {})
    d = NodeSettings()
    storage = Path(_take(n, "storage_dir", "node.", str, str(d.storage_dir)))
    db_url = _take(n, "database_url", "node.", str, d.database_url)
    if db_url.startswith("sqlite:///") and not db_url.startswith("sqlite:////"):
        rel = db_url[len("sqlite:///"):]
        if rel and rel != ":memory:":
            db_url = "sqlite:///" + str((base_dir / rel).resolve())
    node = NodeSettings(
        ae_title=_ae_title(_take(n, "ae_title", "node.", str, d.ae_title), "node.ae_title"),
        host=_take(n, "host", "node.", str, d.host),
        port=_port(_take(n, "port", "node.", int, d.port), "node.port"),
        storage_dir=storage if storage.is_absolute() else (base_dir / storage).resolve(),
        database_url=db_url,
        allow_any_caller=_take(n, "allow_any_caller", "node.", bool, d.allow_any_caller),
        log_level=_take(n, "log_level", "node.", str, d.log_level).upper(),
        max_instance_mb=float(_take(n, "max_instance_mb", "node.", float, d.max_instance_mb)),
        receivers=_take(n, "receivers", "node.", int, d.receivers),
    )
    if not 1 <= node.receivers <= 16:
        raise ConfigError("node.receivers", f"{node.receivers} is not between 1 and 16")
    if node.max_instance_mb <= 0:
        raise ConfigError("node.max_instance_mb", f"{node.max_instance_mb} must be above 0")
    if node.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("node.log_level", f"{node.log_level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    _no_unknown(n, "node.")

    c = data.pop("completion", {})
    dc = CompletionSettings()
    completion = CompletionSettings(
        quiet_seconds=_positive(_take(c, "quiet_seconds", "completion.", float, dc.quiet_seconds), "completion.quiet_seconds", True),
        max_wait_seconds=_positive(_take(c, "max_wait_seconds", "completion.", float, dc.max_wait_seconds), "completion.max_wait_seconds"),
        use_images_in_acquisition=_take(c, "use_images_in_acquisition", "completion.", bool, dc.use_images_in_acquisition),
    )
    if completion.max_wait_seconds < completion.quiet_seconds:
        raise ConfigError("completion.max_wait_seconds", "must be >= completion.quiet_seconds")
    _no_unknown(c, "completion.")

    s = data.pop("send", {})
    ds_ = SendSettings()
    send = SendSettings(
        max_attempts=int(_positive(_take(s, "max_attempts", "send.", int, ds_.max_attempts), "send.max_attempts")),
        backoff_seconds=_positive(_take(s, "backoff_seconds", "send.", float, ds_.backoff_seconds), "send.backoff_seconds", True),
        backoff_max_seconds=_positive(_take(s, "backoff_max_seconds", "send.", float, ds_.backoff_max_seconds), "send.backoff_max_seconds", True),
        timeout_seconds=_positive(_take(s, "timeout_seconds", "send.", float, ds_.timeout_seconds), "send.timeout_seconds"),
    )
    _no_unknown(s, "send.")

    w = data.pop("worker", {})
    dw = WorkerSettings()
    worker = WorkerSettings(
        enabled=_take(w, "enabled", "worker.", bool, dw.enabled),
        poll_seconds=_positive(_take(w, "poll_seconds", "worker.", float, dw.poll_seconds), "worker.poll_seconds"),
        lease_seconds=_positive(_take(w, "lease_seconds", "worker.", float, dw.lease_seconds), "worker.lease_seconds"),
        starvation_seconds=_positive(_take(w, "starvation_seconds", "worker.", float, dw.starvation_seconds),
                                     "worker.starvation_seconds"),
        research_window=_window(_take(w, "research_window", "worker.", str, dw.research_window), "worker.research_window"),
        read_ahead_mb=int(_positive(_take(w, "read_ahead_mb", "worker.", int, dw.read_ahead_mb), "worker.read_ahead_mb", True)),
    )
    _no_unknown(w, "worker.")

    t = data.pop("tls", {})
    if not isinstance(t, dict):
        raise ConfigError("tls", "must be a table ([tls])")

    def tls_path(key: str) -> Path | None:
        value = _take(t, key, "tls.", str, None)
        if value is None:
            return None
        path = Path(value) if Path(value).is_absolute() else (base_dir / value).resolve()
        if not path.is_file():
            raise ConfigError(f"tls.{key}", f"{path} does not exist or is not a file")
        return path

    tls_port = _take(t, "port", "tls.", int, None)
    tls = TlsSettings(
        certificate=tls_path("certificate"),
        private_key=tls_path("private_key"),
        ca_certificates=tls_path("ca_certificates"),
        port=_port(tls_port, "tls.port") if tls_port is not None else None,
        require_client_certificate=_take(t, "require_client_certificate", "tls.", bool, False),
        verify_peer_hostname=_take(t, "verify_peer_hostname", "tls.", bool, True),
    )
    if (tls.certificate is None) != (tls.private_key is None):
        raise ConfigError("tls.private_key" if tls.private_key is None else "tls.certificate",
                          "certificate and private_key go together")
    if tls.require_client_certificate and tls.ca_certificates is None:
        raise ConfigError("tls.ca_certificates", "required when require_client_certificate = true")
    if tls.port is not None and tls.certificate is None:
        raise ConfigError("tls.port", "a TLS listener needs tls.certificate and tls.private_key")
    _no_unknown(t, "tls.")

    http, notify = _http_and_notify(data)

    k = data.pop("retention", {})
    dk = RetentionSettings()
    retention = RetentionSettings(
        days=_positive(_take(k, "days", "retention.", float, dk.days), "retention.days", True),
        interval_minutes=_positive(_take(k, "interval_minutes", "retention.", float, dk.interval_minutes),
                                   "retention.interval_minutes"),
    )
    _no_unknown(k, "retention.")

    peers: list[Peer] = []
    raw_peers = data.pop("peers", [])
    if not isinstance(raw_peers, list):
        raise ConfigError("peers", "must be an array of tables ([[peers]])")
    for i, raw in enumerate(raw_peers):
        p = dict(raw)
        pre = f"peers[{i}]."
        name = _take(p, "name", pre, str, None)
        if not name:
            raise ConfigError(pre + "name", "required")
        if name == "sender":
            raise ConfigError(pre + "name", "'sender' is reserved (it means: back to the AE that sent the series)")
        ae = _take(p, "ae_title", pre, str, None)
        if ae is None:
            raise ConfigError(pre + "ae_title", "required")
        port = _take(p, "port", pre, int, None)
        hosts = _take(p, "allowed_hosts", pre, list, [])
        peers.append(
            Peer(
                name=name,
                ae_title=_ae_title(ae, pre + "ae_title"),
                host=_take(p, "host", pre, str, None),
                port=_port(port, pre + "port") if port is not None else None,
                allowed_hosts=tuple(str(h) for h in hosts),
                tls=_take(p, "tls", pre, bool, False),
                stow_token=_take(p, "stow_token", pre, str, None),
            )
        )
        if peers[-1].tls and tls.ca_certificates is None:
            raise ConfigError(pre + "tls", "sending over TLS needs [tls] ca_certificates to verify the peer")
        _no_unknown(p, pre)
    names = [p.name for p in peers]
    dup = {x for x in names if names.count(x) > 1}
    if dup:
        raise ConfigError("peers", f"duplicate peer name {sorted(dup)[0]!r}")

    rules: list[Rule] = []
    raw_rules = data.pop("rules", [])
    if not isinstance(raw_rules, list):
        raise ConfigError("rules", "must be an array of tables ([[rules]])")
    for i, raw in enumerate(raw_rules):
        r = dict(raw)
        pre = f"rules[{i}]."
        name = _take(r, "name", pre, str, None)
        when = _take(r, "when", pre, str, None)
        pipeline = _take(r, "pipeline", pre, str, None)
        for key, val in (("name", name), ("when", when), ("pipeline", pipeline)):
            if not val:
                raise ConfigError(pre + key, "required")
        dests = _take(r, "destinations", pre, list, [])
        for dest in dests:
            if dest != "sender":
                peer = next((p for p in peers if p.name == dest), None)
                if peer is None:
                    raise ConfigError(pre + "destinations", f"{dest!r} is neither 'sender' nor a [[peers]] name")
                if peer.host is None or peer.port is None:
                    raise ConfigError(pre + "destinations", f"peer {dest!r} has no host/port to send to")
        priority = _take(r, "priority", pre, str, "routine")
        if priority not in PRIORITIES:
            raise ConfigError(pre + "priority", f"{priority!r} is not one of {', '.join(PRIORITIES)}")
        rules.append(
            Rule(
                name=name,
                when=when,
                pipeline=pipeline,
                destinations=tuple(dests),
                params=dict(_take(r, "params", pre, dict, {})),
                outputs=tuple(_take(r, "outputs", pre, list, [])),
                priority=priority,
                webhook_url=_webhook_url(_take(r, "webhook_url", pre, str, None), pre + "webhook_url"),
                webhook_secret=_take(r, "webhook_secret", pre, str, None),
            )
        )
        _no_unknown(r, pre)
        if rules[-1].webhook_url and not (rules[-1].webhook_secret or notify.webhook_secret):
            raise ConfigError(pre + "webhook_secret", "required when webhook_url is set (or set notify.webhook_secret)")

    _no_unknown(data, "")
    return Settings(node=node, completion=completion, send=send, worker=worker, tls=tls, http=http, notify=notify,
                    retention=retention, peers=tuple(peers), rules=tuple(rules))


def load(path: Path | str) -> Settings:
    """Read and validate a config file."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("(file)", f"{path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("(file)", f"{path} is not valid TOML: {exc}") from None
    settings = parse(data, base_dir=path.resolve().parent)
    return Settings(**{**settings.__dict__, "source": path.resolve()})
