"""Helpers of the web tests: a node with [http] on, test series carrying known patient data, PHI scans."""

from __future__ import annotations

import io
import re
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pydicom
import pytest
import requests

from conftest import NodeProcess, free_port, node_config, wait_for

#: put into every test instance, so a scan can prove they never leave the node
PATIENT_NAME = "Phi^Testpatient^Quokka"
PATIENT_ID = "PID-7731-ZQX"
ADMIN_PASSWORD = "correct horse battery staple"
ADMIN_TOKEN = "admin-token-0123456789abcdef"


def marked_series(source: Path, out: Path, count: int) -> list[Path]:
    """The first ``count`` slices of ``source``, re-identified with a known patient name and ID."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(source.glob("*.dcm"))[:count]:
        ds = pydicom.dcmread(path)
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        target = out / path.name
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def phi_found(*texts: str | bytes) -> list[str]:
    """Which of the patient name (any of its components) or ID appear in ``texts``."""
    needles = [PATIENT_ID, PATIENT_NAME, "Testpatient", "Quokka", PATIENT_ID.replace("-", "")]
    found = []
    for text in texts:
        s = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        found += [n for n in needles if n.lower() in s.lower()]
    return sorted(set(found))


def start_node(root: Path, peers: list[dict], rules: list[dict], http_port: int | None = None,
               users: bool = True, extra_toml: str = "", **sections: dict) -> NodeProcess:
    """`pacs-node serve` with the web console on a free port (admin user + admin token)."""
    from pacs_node.web.auth import hash_password

    http_port = http_port or free_port()
    port = free_port()
    http = {"enabled": True, "host": "127.0.0.1", "port": http_port, "admin_token": ADMIN_TOKEN}
    text = node_config(port, peers, rules, http=http, **sections) + extra_toml
    if users:
        # a cheap hash: the test logs in, it does not need to resist brute force
        text += f'\n[[http.users]]\nname = "admin"\npassword_hash = "{hash_password(ADMIN_PASSWORD, iterations=20_000)}"\n'
    root.mkdir(parents=True, exist_ok=True)
    node = NodeProcess(root, text)
    node.http_port = http_port  # type: ignore[attr-defined]
    node.start(port)
    try:
        wait_for(lambda: _http_up(http_port), 120, "the web console to answer")
    except AssertionError as exc:
        node.stop()
        raise AssertionError(f"{exc}; the node's log:\n{node.log()[-4000:]}") from None
    return node


def _http_up(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 200
    except requests.RequestException:
        return False


def multipart_related(files: list[Path | bytes]) -> tuple[bytes, str]:
    """A STOW-RS body: multipart/related; type="application/dicom", one part per file."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for item in files:
        data = item if isinstance(item, bytes) else Path(item).read_bytes()
        body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        body.write(data)
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f'multipart/related; type="application/dicom"; boundary={boundary}'


def metric_samples(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value}."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"^(\S+?(?:\{[^}]*\})?)\s+(\S+)$", line)
            if m:
                samples[m.group(1)] = float(m.group(2))
    return samples


@pytest.fixture
def web_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Factory of nodes with the web console on (stopped at the end of the test)."""
    started: list[NodeProcess] = []

    def make(peers: list[dict], rules: list[dict], **kwargs) -> NodeProcess:  # type: ignore[no-untyped-def]
        node = start_node(tmp_path / f"webnode{len(started)}", peers, rules, **kwargs)
        started.append(node)
        return node

    yield make
    for node in started:
        node.stop()
