"""Small helpers shared by the benchmark scripts (ports, processes, the data cache)."""

from __future__ import annotations

import os
import random
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: the Python environment running the benchmark also holds the pacs-node command
BIN = Path(sys.executable).parent
#: DCMTK and Orthanc disable Nagle only with this (else ~40 ms per instance)
ENV = {**os.environ, "TCP_NODELAY": "1"}


#: ports handed out by free_port in this process (never handed out twice)
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, below the kernel's ephemeral range (32768-60999 here).

    A port from bind(0) lies in the ephemeral range, from which every outgoing connection also
    takes its source port: between this call and the node binding it (seconds, while the node
    imports), a client connection - even a poll of that port, connecting to itself - can hold
    it, and the node cannot listen (the likely cause of one failed CI run of the test suite).
    Below the range no outgoing connection takes it; a port is never handed out twice by one
    process.
    """
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port found in 20000-31999")


def wait_port(port: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open within {timeout:.0f} s")


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a live process in KiB: its resident memory now and its peak so far."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a live process, in MB."""
    try:
        return memory_kib(pid)[1] / 1024
    except (OSError, KeyError):
        return float("nan")
