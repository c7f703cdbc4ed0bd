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


@dataclass(frozen=True)
class CompletionSettings:
    quiet_seconds: float = 2.0
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


@dataclass(frozen=True)
class Peer:
    name: str
    ae_title: str
    host: str | None = None
    port: int | None = None
    #: hosts/IPs a peer may call from (empty: any host, the AE title alone identifies it)
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    name: str
    when: str
    pipeline: str
    destinations: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    priority: str = "routine"


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = NodeSettings()
    completion: CompletionSettings = CompletionSettings()
    send: SendSettings = SendSettings()
    worker: WorkerSettings = WorkerSettings()
    peers: tuple[Peer, ...] = ()
    rules: tuple[Rule, ...] = ()
    source: Path | None = None

    def peer_by_name(self, name: str) -> Peer | None:
        return next((p for p in self.peers if p.name == name), None)

    def peer_by_ae(self, ae_title: str) -> Peer | None:
        return next((p for p in self.peers if p.ae_title == ae_title), None)


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
    )
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
    )
    _no_unknown(w, "worker.")

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
            )
        )
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
            )
        )
        _no_unknown(r, pre)

    _no_unknown(data, "")
    return Settings(node=node, completion=completion, send=send, worker=worker, peers=tuple(peers), rules=tuple(rules))


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
