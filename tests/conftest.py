"""Fixtures that start real peers: the node itself, DCMTK storescp, Orthanc."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from common import free_port  # noqa: E402 - ports below the ephemeral range, never twice in a run

BIN = Path(sys.executable).parent
os.environ.setdefault("TCP_NODELAY", "1")  # DCMTK and Orthanc: no 40 ms Nagle stall per instance


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def associate_noting_rejection(ae, *args, **kwargs):  # type: ignore[no-untyped-def]
    """``ae.associate(...)`` and the A-ASSOCIATE-RJ PDU the peer sent, if any.

    pynetdicom can report a fast rejection as an abort (its DUL closes the socket on the RJ
    before its ACSE thread checks that the connection is up), so ``is_rejected`` alone is racy.
    """
    from pynetdicom import evt
    from pynetdicom.pdu import A_ASSOCIATE_RJ

    seen: list = []

    def note(event):  # type: ignore[no-untyped-def]
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            seen.append(event.pdu)

    assoc = ae.associate(*args, evt_handlers=[(evt.EVT_PDU_RECV, note)], **kwargs)
    return assoc, (seen[0] if seen else None)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make test`, which installs it")
    return path


@pytest.fixture(scope="session")
def data() -> Path:
    from pacs_node.datasets import data_dir

    return data_dir()


@pytest.fixture(scope="session")
def ge_head(data: Path) -> Path:
    return data / "ct" / "ge-head-tilt"


def stop_process(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM a fixture's process, wait ``timeout`` s for it, then kill it; always reaped."""
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class NodeProcess:
    """`pacs-node serve` as a real process with its own config, storage and database."""

    def __init__(self, root: Path, config_text: str) -> None:
        self.root = root
        self.config = root / "node.toml"
        self.config.write_text(config_text)
        self.log_path = root / "node.log"
        self.proc: subprocess.Popen | None = None

    def start(self, port: int, args: tuple[str, ...] = ("serve",)) -> "NodeProcess":
        self.port = port
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(BIN / "pacs-node"), *args, "--config", str(self.config)],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=self.root)
        try:
            wait_for(lambda: port_open(port) or self.proc.poll() is not None, 60, "the node to listen")
        except AssertionError as exc:
            self.stop()
            raise AssertionError(f"{exc}; the node's log:\n{self.log()[-4000:]}") from None
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()}")
        return self

    def stop(self) -> None:
        stop_process(self.proc, 30)
        if self.proc:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        sub = list(args)
        # --config belongs to the leaf subcommand ("jobs list --config F")
        out = subprocess.run([str(BIN / "pacs-node"), *sub, "--config", str(self.config)],
                             capture_output=True, text=True, cwd=self.root, timeout=120)
        if check and out.returncode != 0:
            raise AssertionError(f"pacs-node {' '.join(sub)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out


def node_config(port: int, peers: list[dict], rules: list[dict], **sections: dict) -> str:
    lines = ["[node]", 'ae_title = "PACSNODE"', 'host = "127.0.0.1"', f"port = {port}",
             'storage_dir = "storage"', 'database_url = "sqlite:///node.db"', 'log_level = "INFO"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in sections.pop("node", {}).items()] + [""]
    defaults = {"completion": {"quiet_seconds": 1.0, "max_wait_seconds": 120.0},
                "send": {"max_attempts": 3, "backoff_seconds": 0.5, "backoff_max_seconds": 2.0, "timeout_seconds": 10.0}}
    for name, values in {**defaults, **sections}.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        lines.append("")
    for table, items in (("peers", peers), ("rules", rules)):
        for item in items:
            lines.append(f"[[{table}]]")
            for k, v in item.items():
                if isinstance(v, dict):
                    inner = ", ".join(f"{ik} = {json.dumps(iv)}" for ik, iv in v.items())
                    lines.append(f"{k} = {{ {inner} }}")
                else:
                    lines.append(f"{k} = {json.dumps(v)}")
            lines.append("")
    return "\n".join(lines)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    started: list[NodeProcess] = []

    def make(peers: list[dict], rules: list[dict], port: int | None = None, args: tuple[str, ...] = ("serve",),
             database_url: str | None = None, **sections: dict) -> NodeProcess:
        port = port or free_port()
        root = tmp_path / f"node{len(started)}"
        root.mkdir()
        text = node_config(port, peers, rules, **sections)
        if database_url:
            text = text.replace('database_url = "sqlite:///node.db"', f'database_url = "{database_url}"')
        node = NodeProcess(root, text)
        started.append(node)
        return node.start(port, args)

    yield make
    for node in started:
        node.stop()


class StoreSCP:
    """DCMTK storescp writing every received instance to a folder."""

    def __init__(self, root: Path, ae_title: str = "STORESCP") -> None:
        self.root = root
        self.ae_title = ae_title
        self.out = root / "received"
        self.out.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "StoreSCP":
        self._log = open(self.root / "storescp.log", "ab")
        self.proc = subprocess.Popen([tool("storescp"), "-aet", self.ae_title, "-od", str(self.out), "+xa",
                                      str(self.port)], stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(lambda: port_open(self.port), 20, "storescp to listen")
        return self

    def stop(self) -> None:
        stop_process(self.proc, 10)
        if self.proc:
            self._log.close()

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "storescp").start()
    yield scp
    scp.stop()


def storescu(port: int, *paths: Path | str, calling: str = "STORESCU", called: str = "PACSNODE",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([tool("storescu"), "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port),
                           *[str(p) for p in paths], "+sd"], capture_output=True, text=True, timeout=300)


class Orthanc:
    """A real Orthanc (Debian package) on free ports, with the node as a DICOM modality."""

    def __init__(self, root: Path, node_port: int) -> None:
        self.root = root
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.ae_title = "ORTHANC"
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "pacs-node-test",
            "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": {"pacsnode": ["PACSNODE", "127.0.0.1", node_port]},
            "Plugins": [],
            "StableAge": 1,
        }
        (root / "orthanc.json").write_text(json.dumps(config))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Orthanc":
        self._log = open(self.root / "orthanc.log", "ab")
        self.proc = subprocess.Popen([tool("Orthanc"), str(self.root / "orthanc.json")], stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=self.root)
        wait_for(lambda: self._up(), 60, "Orthanc to answer /system")
        return self

    def _up(self) -> bool:
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, path: str) -> object:
        with urllib.request.urlopen(self.url(path), timeout=30) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> tuple[str, bytes]:
        with urllib.request.urlopen(self.url(path), timeout=60) as r:
            return r.headers.get("Content-Type", ""), r.read()

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> object:
        req = urllib.request.Request(self.url(path), data=body, method="POST", headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def stop(self) -> None:
        stop_process(self.proc, 20)
        if self.proc:
            self._log.close()


def dciodvfy_errors(path: Path) -> set[str]:
    """The 'Error' lines dciodvfy prints for a file, with values that differ per file removed."""
    out = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    errors = set()
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("Error"):
            errors.add(line.strip())
    return errors


_VALID_DATES = {"DA": "20200101", "TM": "120000", "DT": "20200101120000"}


def converted_enhanced(files: list[Path], out: Path, shuffle: bool = True, series_uid: str | None = None) -> Path:
    """The single-frame files as one Legacy Converted Enhanced image (highdicom's converter: the
    functional-group encoding of Enhanced MR / CT, none of which is among the shared data), its
    frames (per-frame groups and pixels together) in a shuffled order: the loader must sort by
    position, and results must refer to the right frame, whatever the frame order."""
    import warnings

    import highdicom as hd
    import numpy as np
    import pydicom

    datasets = [pydicom.dcmread(p) for p in files]
    for ds in datasets:  # "***" in dates (de-identified UIH) stops highdicom's converter
        for elem in ds:
            if elem.VR in _VALID_DATES and elem.value and "*" in str(elem.value):
                elem.value = _VALID_DATES[elem.VR]
    cls = {"MR": hd.legacy.LegacyConvertedEnhancedMRImage, "CT": hd.legacy.LegacyConvertedEnhancedCTImage}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = cls[datasets[0].Modality](datasets, series_instance_uid=series_uid or hd.UID(), series_number=901,
                                          sop_instance_uid=hd.UID(), instance_number=1)
    if shuffle:  # the converter sorts the frames by position
        order = np.random.default_rng(3).permutation(len(datasets))
        pixels = image.pixel_array.reshape(len(datasets), int(image.Rows), int(image.Columns))
        image.PixelData = np.ascontiguousarray(pixels[order]).tobytes()
        image.PerFrameFunctionalGroupsSequence = [image.PerFrameFunctionalGroupsSequence[i] for i in order]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "enhanced.dcm"
    image.save_as(path)
    return path
