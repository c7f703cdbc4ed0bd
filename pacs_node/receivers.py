"""Extra receiver processes: more DICOM associations served at once, one Python process each.

Associations served by one process share its GIL and its threads (docs/performance.md). With
``[node] receivers = N`` the node starts N - 1 child processes; the main process's listener
hands each new connection on node.port to the next process in turn (the main one included),
passing the socket over a pipe (``multiprocessing.reduction.send_handle``). Until session 5 the
children listened on the port themselves (``SO_REUSEPORT``), but the kernel spreads those
connections by a hash of the peer's port, so four senders often landed 3 + 1 or 4 + 0. Each child
stores and indexes instances exactly like the main process (same storage folder, same
database; SQLite serialises writers across processes with ``BEGIN IMMEDIATE``), and reports
to the main process what its completion tracker must know: an instance of a series arrived on
association A, association A ended. Metrics events are forwarded the same way, so the main
process's /metrics counts every instance.

A child dies with the main process (``PR_SET_PDEATHSIG``, and a watchdog on the parent pid),
and the main process restarts a child that died, ending the associations it had open.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import queue
import signal
import socket
import threading
import time
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any, Callable

from . import logs, metrics
from .complete import CompletionTracker
from .config import Settings

log = logging.getLogger(__name__)


def _die_with_parent(parent_pid: int) -> None:
    try:  # Linux: SIGKILL when the parent dies
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the watchdog below still applies
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


class _ForwardedMetrics:
    """StorageSCP's metrics calls in a receiver process, sent to the main process's /metrics."""

    def __init__(self, events: Any) -> None:
        self.events = events
        self.pid = os.getpid()

    def instance_received(self, transport: str, size: int, started: float | None = None) -> None:
        seconds = time.monotonic() - started if isinstance(started, float) else None
        self.events.put(("m-instance", self.pid, transport, size, seconds))

    def association(self, accepted: bool) -> None:
        self.events.put(("m-association", self.pid, accepted))


def _take_connections(channel: Any, scp: Any, done: threading.Event) -> None:
    """A receiver process's end of the hand-over: (address, descriptor) pairs from the main process."""
    while not done.is_set():
        try:
            address = channel.recv()
            fd = recv_handle(channel)
        except (EOFError, OSError):
            done.set()  # the main process is gone or stopping
            return
        scp.server.serve(socket.socket(fileno=fd), tuple(address))


def _child_main(settings: Settings, receiver_token: str, events: Any, parent_pid: int, channel: Any) -> None:
    _die_with_parent(parent_pid)
    logs.setup(settings.node.log_level)
    from .net.scp import StorageSCP
    from .store.files import FileStore
    from .store.index import Database
    from .store.ingest import Ingest

    pid = os.getpid()
    db = Database(settings.node.database_url, run_migrations=False)
    ingest = Ingest(db, FileStore(settings.node.storage_dir), settings.completion.use_images_in_acquisition,
                    receiver=receiver_token)
    scp = StorageSCP(settings, db, ingest,
                     lambda key, series: events.put(("instance", pid, key, series)),
                     lambda key: events.put(("end", pid, key, None)))
    scp.metrics = _ForwardedMetrics(events)  # the main process owns the metrics endpoint
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole group: the parent decides
    # its association threads log as receiver<pid>-<peer>
    scp.start(extra_tls_listener=False, thread_prefix=f"receiver{pid}", listen=False)
    threading.Thread(target=_take_connections, args=(channel, scp, done), name="handover", daemon=True).start()
    events.put(("ready", pid, 0, None))
    done.wait()
    scp.stop()
    db.dispose()


class ReceiverPool:
    """Starts, watches and stops the extra receiver processes; feeds their events to the tracker."""

    def __init__(self, settings: Settings, receiver_token: str, tracker: CompletionTracker, count: int,
                 recover: Callable[[], object] | None = None) -> None:
        """``recover`` runs when a receiver process died, before its associations end: it
        indexes the files that process had acknowledged but not yet indexed."""
        self.recover = recover
        self.settings = settings
        self.token = receiver_token
        self.tracker = tracker
        self.count = count
        self._ctx = mp.get_context("spawn")  # no fork of a process that runs threads
        self.events = self._ctx.Queue()
        self._procs: list[Any] = []
        self._open: dict[int, set[tuple[int, int]]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._channels: list[Any] = []
        self._handoff_lock = threading.Lock()
        self._turn = 0
        #: indexes of the receiver processes that said they are ready
        self._ready: set[int] = set()

    def _spawn(self) -> tuple[Any, Any]:
        ours, theirs = self._ctx.Pipe()
        proc = self._ctx.Process(target=_child_main,
                                 args=(self.settings, self.token, self.events, os.getpid(), theirs),
                                 name="pacs-node-receiver", daemon=True)
        proc.start()
        theirs.close()
        log.info("receiver process %d started", proc.pid)
        return proc, ours

    def start(self) -> None:
        spawned = [self._spawn() for _ in range(self.count)]
        self._procs = [proc for proc, _ in spawned]
        self._channels = [channel for _, channel in spawned]
        self._thread = threading.Thread(target=self._run, name="receivers", daemon=True)
        self._thread.start()

    def _handle(self, event: tuple) -> None:
        kind, pid = event[0], event[1]
        if kind == "instance":
            key = (pid, event[2])
            self._open.setdefault(pid, set()).add(key)
            self.tracker.instance_received(key, event[3])
        elif kind == "end":
            key = (pid, event[2])
            self._open.get(pid, set()).discard(key)
            self.tracker.association_ended(key)
        elif kind == "m-instance":
            _, _, transport, size, seconds = event
            metrics.instance_received(transport, size, time.monotonic() - seconds if seconds is not None else None)
        elif kind == "m-association":
            metrics.association(event[2])
        elif kind == "ready":
            for i, proc in enumerate(self._procs):
                if proc.pid == pid:
                    self._ready.add(i)
            log.info("receiver process %d listening (connections handed over by the main process)", pid)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._handle(self.events.get(timeout=0.5))
                continue
            except queue.Empty:
                pass
            except Exception:  # noqa: BLE001 - one bad event must not stop the feed
                log.exception("receiver event could not be handled")
                continue
            for i, proc in enumerate(self._procs):
                if proc.is_alive() or self._stop.is_set():
                    continue
                log.error("receiver process %d exited (code %s); its open associations end now, restarting it",
                          proc.pid, proc.exitcode)
                if self.recover is not None:
                    try:
                        self.recover()
                    except Exception:  # noqa: BLE001 - the next start indexes them anyway
                        log.exception("indexing the files of receiver process %d failed", proc.pid)
                for key in self._open.pop(proc.pid, set()):
                    self.tracker.association_ended(key)
                with self._handoff_lock:
                    self._ready.discard(i)
                    self._channels[i].close()
                    self._procs[i], self._channels[i] = self._spawn()

    def handoff(self, conn: socket.socket, address: tuple[str, int]) -> bool:
        """The main process's listener calls this with each new connection: every (count + 1)-th
        stays in the main process, the others go to the receiver processes in turn. Handing
        them over, rather than letting the kernel spread connections over several listening
        sockets (SO_REUSEPORT hashes the peer's port, so four senders often land 3 + 1 or 4 + 0),
        keeps the processes evenly loaded. False: serve it here."""
        with self._handoff_lock:
            self._turn = (self._turn + 1) % (self.count + 1)
            if self._turn == 0 or self._stop.is_set():
                return False
            i = self._turn - 1
            proc, channel = self._procs[i], self._channels[i]
            if not proc.is_alive() or i not in self._ready:
                return False
            try:
                channel.send(address)
                send_handle(channel, conn.fileno(), proc.pid)
            except OSError:
                return False
            return True

    def stop(self) -> None:
        self._stop.set()
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: the child stops its listener and flushes its audit rows
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        with self._handoff_lock:
            for channel in self._channels:
                channel.close()
        # what they reported while stopping
        try:
            while True:
                self._handle(self.events.get_nowait())
        except (queue.Empty, OSError, ValueError):
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
