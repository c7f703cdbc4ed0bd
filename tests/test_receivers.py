"""Scenario: `[node] receivers = 2`: a second process listens on the node's port. Four modalities
send at once; every instance is stored once, every series completes once and is processed once;
a receiver process that dies is restarted; and the receivers die with the node (kill -9).
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from conftest import storescu, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from crash_soak import synthetic_ct_series  # noqa: E402

SENDERS, SLICES = 4, 6


def alive(pid: int) -> bool:
    """Running (a zombie that no one reaped counts as dead)."""
    try:
        state = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:")]
    except OSError:
        return False
    return bool(state) and "Z" not in state[0].split()[1]


def receiver_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"receiver process (\d+) started", log)]


def test_two_receiver_processes_share_the_port_and_lose_nothing(node_factory, storescp, tmp_path):
    peers = [{"name": f"modality{i}", "ae_title": f"MOD{i}"} for i in range(SENDERS)] + [
        {"name": "viewer", "ae_title": "STORESCP", "host": "127.0.0.1", "port": storescp.port}]
    rules = [{"name": "ct", "when": "Modality == 'CT'", "pipeline": "ct-denoise-classical", "destinations": ["viewer"]}]
    node = node_factory(peers, rules, node={"receivers": 2}, completion={"quiet_seconds": 1.5, "max_wait_seconds": 120})
    wait_for(lambda: "listening" in "".join(re.findall(r"receiver process \d+ listening", node.log())), 60,
             "the receiver process to listen")

    folders = []
    for i in range(SENDERS):
        synthetic_ct_series(tmp_path / f"s{i}", SLICES, 64, patient_id=f"RCV-{i}", seed=i)
        folders.append(tmp_path / f"s{i}")

    def send_all(tag: str) -> None:
        procs = [subprocess.Popen(["storescu", "-aet", f"MOD{i}", "-aec", "PACSNODE", "127.0.0.1", str(node.port),
                                   str(folders[i]), "+sd"], env={**os.environ, "TCP_NODELAY": "1"},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for i in range(SENDERS)]
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, f"{tag}: {out.decode()[-500:]}"

    # several rounds of 4 parallel senders, so both processes get associations
    for _ in range(3):
        send_all("send")
    db = node.root / "node.db"

    def settled() -> bool:
        states = dict(sqlite3.connect(db).execute("select state, count(*) from job group by state").fetchall())
        return states.get("done", 0) >= SENDERS and set(states) == {"done"}

    wait_for(settled, 240, "every series' jobs done")
    con = sqlite3.connect(db)
    assert con.execute("select count(*) from instance").fetchone()[0] == SENDERS * SLICES
    series = con.execute("select state, generation, instance_count from series").fetchall()
    # the resends reopened each series (generation 2, 3), never two jobs of one generation
    jobs = con.execute("select series_id, generation, count(*) from job group by series_id, generation").fetchall()
    assert all(n == 1 for *_, n in jobs), jobs
    assert len(series) == SENDERS and all(c == SLICES for _, _, c in series), series
    wait_for(lambda: len(storescp.files()) >= SENDERS * SLICES, 120, "the results at the destination")
    # both processes served associations: the receiver's threads log as receiver<pid>-<peer>
    log = node.log()
    (child,) = receiver_pids(log)
    ended = re.findall(r" (\S+) pacs_node\.net\.scp: association from MOD\d@\S+ released: (\d+) instance", log)
    by_child = sum(int(n) for thread, n in ended if thread.startswith(f"receiver{child}-"))
    by_main = sum(int(n) for thread, n in ended if thread.startswith("dicom-"))
    assert by_child > 0 and by_main > 0, ended
    assert by_child + by_main == 3 * SENDERS * SLICES

    # a receiver that dies is restarted, and the node keeps receiving
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: len(re.findall(r"receiver process \d+ listening", node.log())) == 2, 60,
             "the receiver to be restarted")
    assert "exited (code -9); its open associations end now, restarting it" in node.log()
    more = synthetic_ct_series(tmp_path / "more", 3, 64, patient_id="RCV-9", seed=9)
    assert storescu(node.port, *more, calling="MOD0").returncode == 0
    wait_for(lambda: sqlite3.connect(db).execute("select count(*) from instance").fetchone()[0]
             == SENDERS * SLICES + 3, 30, "the new instances")

    # kill -9 of the node takes its receivers with it
    newest = receiver_pids(node.log())[-1]
    assert alive(newest)
    node.proc.kill()
    node.proc.wait()
    wait_for(lambda: not alive(newest), 10, "the receiver to die with the node")


def test_a_dead_receiver_has_its_stored_files_indexed_before_its_associations_end(tmp_path):
    """The pool runs the recovery (index the files a dead receiver had acknowledged but not
    indexed) before the completion tracker hears that its associations ended."""
    import threading

    from conftest import free_port
    from pacs_node.complete import CompletionTracker
    from pacs_node.config import parse
    from pacs_node.receivers import ReceiverPool
    from pacs_node.store.index import Database

    port = free_port()
    settings = parse({"node": {"port": port, "storage_dir": str(tmp_path / "s"), "allow_any_caller": True,
                               "database_url": f"sqlite:///{tmp_path}/n.db"}}, tmp_path)
    tracker = CompletionTracker(Database(settings.node.database_url), settings.completion, lambda s, x: None)
    order: list[str] = []
    recovered = threading.Event()
    ended = tracker.association_ended
    tracker.association_ended = lambda key: (order.append("ended"), ended(key))  # type: ignore[method-assign]
    pool = ReceiverPool(settings, "token", tracker, 1, recover=lambda: (order.append("recover"), recovered.set()))
    pool.start()
    try:
        wait_for(lambda: 0 in pool._ready, 60, "the receiver process to be ready")
        tracker.instance_received((pool._procs[0].pid, 1), "1.2.3")  # an association it had open
        pool._open[pool._procs[0].pid] = {(pool._procs[0].pid, 1)}
        killed = pool._procs[0].pid
        os.kill(killed, signal.SIGKILL)
        assert recovered.wait(30)
        wait_for(lambda: "ended" in order, 10, "its association to end")
        assert order[:2] == ["recover", "ended"]
        wait_for(lambda: pool._procs[0].pid != killed and 0 in pool._ready, 60, "the restarted receiver")
    finally:
        pool.stop()
