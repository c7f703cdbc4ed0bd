"""DICOM SCP: C-ECHO and C-STORE for every storage SOP class; thin handlers over Ingest.

The transport is ``acceptor.Acceptor`` (pynetdicom's PDU codecs and negotiation, our own
per-association loop). Access control happens at association time: the calling AE title must
be a configured peer (unless allow_any_caller), calling from one of its allowed hosts if any
are listed. An instance is acknowledged only after Ingest wrote it and indexed it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from typing import Callable

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from .. import audit, metrics
from ..config import Settings
from ..errors import InvalidInstance
from ..store.index import Database
from ..store.ingest import Ingest, OutOfResources
from .acceptor import Acceptor, Association
from .tls import server_context

log = logging.getLogger(__name__)

# pynetdicom picks, per context, the first of OUR syntaxes that the sender proposed. Compressed
# first: the instance is stored as it arrives (no transcoding), and a sender that proposes
# both its native JPEG syntax and an uncompressed one often cannot decompress (DCMTK cannot
# for JPEG-LS or JPEG 2000), so choosing uncompressed would fail the transfer.
_UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
ACCEPT_ORDER = [ts for ts in ALL_TRANSFER_SYNTAXES if UID(ts).is_compressed] + _UNCOMPRESSED + [
    ts for ts in ALL_TRANSFER_SYNTAXES if not UID(ts).is_compressed and ts not in _UNCOMPRESSED]

STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110

#: The largest PDU we accept (advertised to callers): one PDU per typical CT/MR instance.
MAX_PDU = 1024 * 1024
#: A PDU header claiming more than this closes the connection instead of growing memory.
MAX_PDU_BYTES = 4 * 1024 * 1024


def check_lengths(ds: Dataset) -> None:
    """Refuse a dataset whose elements claim more bytes than arrived (pydicom reads them short, silently)."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if length is not None and length != 0xFFFFFFFF and isinstance(value, bytes) and len(value) < length:
            raise InvalidInstance(f"element {tag} claims {length} bytes, the dataset ends after {len(value)}")


def check_pixel_data(ds: Dataset, transfer_syntax: str) -> None:
    """Refuse native pixel data shorter than its Rows x Columns x samples x frames x bits says."""
    if "PixelData" not in ds:
        return
    if UID(transfer_syntax).is_encapsulated:
        # encapsulated pixel data has an undefined length (fragments); a defined one means
        # native pixels sent under a compressed syntax, which no decoder will read
        if not getattr(ds["PixelData"], "is_undefined_length", True):
            raise InvalidInstance(f"PixelData is not encapsulated, as transfer syntax {transfer_syntax} requires")
        return
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        raise InvalidInstance("PixelData without valid Rows, Columns and BitsAllocated") from None
    expected = (rows * columns * samples * frames * bits + 7) // 8
    have = len(ds.PixelData or b"")
    if have < expected:
        raise InvalidInstance(f"PixelData has {have} bytes, Rows x Columns x frames needs {expected}")


@dataclass
class _AssocStats:
    calling_ae: str
    address: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    failed: int = 0
    bytes: int = 0
    series: set[str] = field(default_factory=set)


def _failure(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


class StorageSCP:
    def __init__(self, settings: Settings, db: Database, ingest: Ingest,
                 on_instance: Callable[[int, str], None], on_association_end: Callable[[int], None]) -> None:
        self.settings = settings
        self.db = db
        self.ingest = ingest
        self.on_instance = on_instance
        self.on_association_end = on_association_end
        #: where instance and association counts go: this process's metrics, or a forwarder in
        #: an extra receiver process (pacs_node.receivers)
        self.metrics = metrics
        self._stats: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()
        self.server = None
        #: the extra TLS listener when [tls] port is set
        self.tls_server = None
        # Association audit rows are written by one thread of their own: under load, a
        # C-ECHO (or an A-ASSOCIATE-RJ) must not wait for the database write lock behind the
        # instances being indexed. A kill -9 can lose the rows still queued, never an instance.
        self._audit_queue: queue.Queue[tuple[str, dict] | None] = queue.Queue()
        self._audit_thread: threading.Thread | None = None

    def _record(self, event: str, **fields: object) -> None:
        self._audit_queue.put((event, fields))

    def _write_audit(self) -> None:
        while (item := self._audit_queue.get()) is not None:
            audit.record(self.db, item[0], **item[1])

    # -- association life cycle (called by the Acceptor) ---------------------------------------
    def admit(self, calling: str, address: str) -> str | None:
        peer = self.settings.peer_by_ae(calling)
        reason = None
        if peer is None and not self.settings.node.allow_any_caller:
            reason = "calling AE title not recognized"
        elif peer is not None and peer.allowed_hosts and address not in peer.allowed_hosts:
            reason = f"calling AE title not recognized from host {address}"
        if reason:
            log.warning("association from %s@%s rejected: %s", calling, address, reason)
            self.metrics.association(accepted=False)
            self._record("association-rejected", calling_ae=calling[:16], address=address, detail=reason)
        return reason

    def accepted(self, assoc: Association) -> None:
        stats = _AssocStats(assoc.calling_ae, f"{assoc.address}:{assoc.port}")
        with self._lock:
            self._stats[assoc.key] = stats
        self.metrics.association(accepted=True)
        self._record("association-accepted", calling_ae=stats.calling_ae[:16],
                     called_ae=self.settings.node.ae_title, address=assoc.address)

    def ended(self, assoc: Association, released: bool) -> None:
        with self._lock:
            stats = self._stats.pop(assoc.key, None)
        self.on_association_end(assoc.key)
        if stats is None:
            return
        how = "released" if released else "aborted"
        if stats.stored or stats.failed:
            log.info("association from %s@%s %s: %d instance(s) stored, %d failed, %.1f MB in %.2f s, %d series",
                     stats.calling_ae, stats.address, how, stats.stored, stats.failed, stats.bytes / 1e6,
                     time.monotonic() - stats.started, len(stats.series))
            self._record("instances-received", calling_ae=stats.calling_ae[:16],
                         called_ae=self.settings.node.ae_title, address=stats.address.split(":")[0],
                         count=stats.stored, seconds=time.monotonic() - stats.started,
                         detail=f"{how}; failed={stats.failed}; series={','.join(sorted(stats.series))}"[:2000])

    # -- C-STORE ------------------------------------------------------------------------------
    def c_store(self, assoc: Association, context_id: int, command: Dataset, data: bytearray) -> Dataset:
        started = time.monotonic()
        stats = self._stats.get(assoc.key)
        calling = assoc.calling_ae
        transfer_syntax = assoc.contexts[context_id][1]
        try:
            affected = str(command.get("AffectedSOPInstanceUID", "") or "")
            meta = create_file_meta(sop_class_uid=UID(str(command.get("AffectedSOPClassUID", "") or "")),
                                    sop_instance_uid=UID(affected), transfer_syntax=UID(transfer_syntax))
            meta.SourceApplicationEntityTitle = calling[:16] or "UNKNOWN"
            encoded = b"".join((b"\x00" * 128, b"DICM", encode_file_meta(meta), data))
            ds = pydicom.dcmread(BytesIO(encoded))
            # read every element now (pydicom defers it): a truncated or garbled dataset is
            # refused here instead of failing later in a job
            check_lengths(ds)
            for _ in ds.iterall():
                pass
            check_pixel_data(ds, transfer_syntax)
            stored = self.ingest.store(ds, encoded, calling, transfer_syntax, affected)
        except InvalidInstance as exc:
            log.warning("C-STORE from %s refused: %s", calling, exc)
            self._count(stats, ok=False)
            return _failure(STATUS_CANNOT_UNDERSTAND, str(exc))
        except OutOfResources as exc:
            log.error("C-STORE from %s refused: %s", calling, exc)
            self._count(stats, ok=False)
            return _failure(STATUS_OUT_OF_RESOURCES, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bad dataset must not take the node down
            log.warning("C-STORE from %s refused: dataset could not be read or stored (%s)", calling, type(exc).__name__)
            log.debug("C-STORE failure detail", exc_info=True)
            self._count(stats, ok=False)
            return _failure(STATUS_CANNOT_UNDERSTAND, f"cannot read or store dataset: {type(exc).__name__}")
        self._count(stats, ok=True, size=len(encoded), series=stored.series_uid)
        self.metrics.instance_received("dimse", len(encoded), started)
        self.on_instance(assoc.key, stored.series_uid)
        status = Dataset()
        status.Status = 0x0000
        return status

    @staticmethod
    def _count(stats: _AssocStats | None, ok: bool, size: int = 0, series: str | None = None) -> None:
        if stats is None:
            return
        if ok:
            stats.stored += 1
            stats.bytes += size
            if series:
                stats.series.add(series)
        else:
            stats.failed += 1

    def start(self, reuse_port: bool = False, extra_tls_listener: bool = True, thread_prefix: str = "dicom") -> None:
        """Listen on node.port (and [tls] port); ``reuse_port`` when receiver processes share
        the port, ``extra_tls_listener=False`` in those (the main process serves [tls] port)."""
        node = self.settings.node
        self._audit_thread = threading.Thread(target=self._write_audit, name="scp-audit", daemon=True)
        self._audit_thread.start()
        contexts = [build_context(Verification)]
        contexts += [build_context(cx.abstract_syntax, ACCEPT_ORDER) for cx in AllStoragePresentationContexts]
        options = dict(max_associations=32, max_pdu=MAX_PDU, max_pdu_bytes=MAX_PDU_BYTES,
                       max_message_bytes=int(node.max_instance_mb * 1e6), acse_timeout=30.0, network_timeout=60.0,
                       reuse_port=reuse_port, thread_prefix=thread_prefix)
        tls = self.settings.tls
        # [tls] without a port: node.port speaks TLS only; with one: plain on node.port, TLS there
        plain = not tls.listening or tls.port is not None
        secure = tls.listening and (not plain or extra_tls_listener)
        if plain:
            self.server = Acceptor(node.host, node.port, self, contexts, **options)
        if secure:
            listener = Acceptor(node.host, tls.port if plain else node.port, self, contexts,
                                ssl_context=server_context(tls), **options)
            if plain:
                self.tls_server = listener
            else:
                self.server = listener
        callers = "any caller" if node.allow_any_caller else f"{len(self.settings.peers)} known peer(s)"
        if plain:
            log.info("listening for DICOM on %s:%d as AE %s (%s)", node.host, self.port, node.ae_title, callers)
        if secure:
            log.info("listening for DICOM TLS on %s:%d as AE %s (%s, client certificate %s)", node.host,
                     self.tls_port, node.ae_title, callers,
                     "required" if tls.require_client_certificate else "not required")

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server else 0

    @property
    def tls_port(self) -> int:
        """The TLS listener's port (node.port when it is TLS only); 0 without TLS."""
        if self.tls_server is not None:
            return int(self.tls_server.server_address[1])
        return self.port if self.settings.tls.listening else 0

    def stop(self) -> None:
        for server in (self.server, self.tls_server):
            if server is not None:
                server.shutdown()
        self.server = self.tls_server = None
        if self._audit_thread is not None:
            self._audit_queue.put(None)  # after what is queued: every row is written before stop returns
            self._audit_thread.join(timeout=30)
            self._audit_thread = None
