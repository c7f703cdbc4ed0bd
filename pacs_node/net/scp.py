"""DICOM SCP: C-ECHO and C-STORE for every storage SOP class; thin handlers over Ingest.

The transport is ``acceptor.Acceptor`` (pynetdicom's PDU codecs and negotiation, our own
per-association loop). Access control happens at association time: the calling AE title must
be a configured peer (unless allow_any_caller), calling from one of its allowed hosts if any
are listed. An instance is acknowledged only after Ingest wrote it and indexed it.
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset as _read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import (ALL_TRANSFER_SYNTAXES, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION,
                        AllStoragePresentationContexts)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from .. import audit, metrics
from ..config import Settings
from ..errors import InvalidInstance
from ..store.index import Database
from ..store.indexer import IndexWriter
from ..store.ingest import Entry, Ingest, out_of_resources
from ..volume import element_vr
from .acceptor import Acceptor, Association, Command
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


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (the file meta group)."""
    if vr == b"OB":
        return struct.pack("<HH2sxxL", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def file_header(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information group (PS3.10 7.1) of a received instance,
    built directly: pydicom's writer took longer than the rest of the receive path's checks."""
    body = b"".join((
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", _padded(sop_class, b"\x00")),
        _element(0x00020003, b"UI", _padded(sop_instance, b"\x00")),
        _element(0x00020010, b"UI", _padded(transfer_syntax, b"\x00")),
        _element(0x00020012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
        _element(0x00020013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        _element(0x00020016, b"AE", _padded(source_ae, b" ")),
    ))
    return b"\x00" * 128 + b"DICM" + _element(0x00020000, b"UL", struct.pack("<L", len(body))) + body


class _View:
    """A read-only file over a buffer, without copying it (pydicom reads through read/seek/tell)."""

    def __init__(self, buffer: bytes | bytearray | memoryview) -> None:
        self.buffer = memoryview(buffer).cast("B")
        self.size = len(self.buffer)
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        chunk = self.buffer[self.pos:end].tobytes()
        self.pos = end
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos


#: a deflated data set larger than this once inflated is refused (a "deflate bomb")
_MAX_INFLATED = 1 << 30
#: values this long are not copied out of the received buffer (pixel data); only their length is checked
_DEFER = 16384


def _at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    return tag == 0x7FE00010


def read_dataset(data: bytes | bytearray | memoryview, transfer_syntax: str) -> Dataset:
    """The received data set, every element read and checked (pydicom defers reading; a
    truncated or garbled data set is refused here instead of failing later in a job): each
    element's bytes must all be there, each sequence must parse, item by item."""
    ts = UID(transfer_syntax)
    if ts == DeflatedExplicitVRLittleEndian:
        inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        data = inflate.decompress(bytes(data), _MAX_INFLATED)
        if inflate.unconsumed_tail:
            raise InvalidInstance(f"the deflated data set inflates to more than {_MAX_INFLATED >> 20} MiB")
    fp = _View(data)
    # everything up to the pixel data is read (and checked below); the pixel data, and what
    # may follow it, with long values deferred: no copy of the pixels, their length is checked
    ds = _read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian, stop_when=_at_pixel_data)
    if fp.pos < fp.size:
        start = fp.pos
        ds.update(_read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian, defer_size=_DEFER))
        if fp.size - fp.pos >= 8:
            # pydicom drops, with a warning only, encapsulated pixel data whose delimiter is missing
            raise InvalidInstance(f"the data set ends inside an element: {fp.size - start} bytes from the pixel "
                                  "data on could not be read")
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length != 0:
            # deferred (long values: pixel data): only the length is checked
            if raw.length != 0xFFFFFFFF and raw.value_tell + raw.length > fp.size:
                raise InvalidInstance(f"element {tag} claims {raw.length} bytes, the dataset ends after "
                                      f"{fp.size - raw.value_tell}")
            continue
        check_lengths(ds, [tag])
        if isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF and element_vr(raw) != "SQ":
            continue  # a plain value: converting it is left to whoever reads it
        # sequences (and undefined lengths): every item read and every element in it converted
        for element in ds[tag].value if ds[tag].VR == "SQ" else ():
            check_lengths(element)
            for _ in element.iterall():
                pass
    check_pixel_data(ds, transfer_syntax)
    return ds


def check_lengths(ds: Dataset, tags: list | None = None) -> None:
    """Refuse a dataset whose elements claim more bytes than arrived (pydicom reads them short, silently)."""
    for tag in list(ds.keys()) if tags is None else tags:
        raw = ds.get_item(tag)
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if length is not None and length != 0xFFFFFFFF and isinstance(value, bytes) and len(value) < length:
            raise InvalidInstance(f"element {tag} claims {length} bytes, the dataset ends after {len(value)}")


def check_pixel_data(ds: Dataset, transfer_syntax: str) -> None:
    """Refuse native pixel data shorter than its Rows x Columns x samples x frames x bits says."""
    if "PixelData" not in ds:
        return
    raw = ds.get_item("PixelData", keep_deferred=True)  # a deferred value is not read: lengths suffice
    if isinstance(raw, RawDataElement):
        undefined = raw.length == 0xFFFFFFFF
        have = raw.length if raw.value is None else len(raw.value)
    else:
        undefined = bool(raw.is_undefined_length)
        have = len(raw.value or b"")
    if UID(transfer_syntax).is_encapsulated:
        # encapsulated pixel data has an undefined length (fragments); a defined one means
        # native pixels sent under a compressed syntax, which no decoder will read
        if not undefined:
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


_SUCCESS = Dataset()
_SUCCESS.Status = 0x0000


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
        #: index rows of received instances, written off the associations' threads
        self.indexer = IndexWriter(ingest)
        #: data sets are checked here while the association's thread writes their files
        self._checkers: ThreadPoolExecutor | None = None

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
        self._prepare_temp()

    def releasing(self, assoc: Association) -> None:
        """Before the A-RELEASE-RP: what the association stored is indexed when the sender hears it."""
        if not self.indexer.flush(timeout=60):
            log.error("association from %s@%s released while %d instance(s) still wait for the index",
                      assoc.calling_ae, assoc.address, self.indexer.pending)

    def ended(self, assoc: Association, released: bool) -> None:
        with self._lock:
            stats = self._stats.pop(assoc.key, None)
        # the completion tracker may complete the series once it hears this: index first
        self.indexer.flush(timeout=60)
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
    def c_store(self, assoc: Association, context_id: int, command: Command | Dataset,
                data: bytearray | memoryview) -> Dataset:
        """Write the instance's file while another thread checks the data set, move the file
        into place once both are done, acknowledge; the index rows follow (IndexWriter), queued
        after the response where an Acceptor serves the association."""
        started = time.monotonic()
        stats = self._stats.get(assoc.key)
        calling = assoc.calling_ae
        transfer_syntax = assoc.contexts[context_id][1]
        if self.indexer.error:
            self._count(stats, ok=False)
            return _failure(STATUS_OUT_OF_RESOURCES, f"{self.indexer.error}; try again later")
        tmp = checking = None
        try:
            affected = str(command.get("AffectedSOPInstanceUID", "") or "")
            header = file_header(str(command.get("AffectedSOPClassUID", "") or ""), affected, transfer_syntax,
                                 calling[:16] or "UNKNOWN")
            # another thread checks the data set while this one writes the file: the write and
            # its sync are one system call without the GIL (FileStore.write_temp), the check is
            # Python that needs it
            check = (self._check, data, transfer_syntax, len(header) + len(data), calling, affected)

            def hand_over() -> None:
                nonlocal checking
                checking = self._checkers.submit(*check)

            tmp = self.ingest.files.write_temp((header, data), hand_over)
            entry = checking.result()
            self.ingest.files.place(tmp, entry.rel)
            tmp = None
        except InvalidInstance as exc:
            log.warning("C-STORE from %s refused: %s", calling, exc)
            self._count(stats, ok=False)
            return _failure(STATUS_CANNOT_UNDERSTAND, str(exc))
        except OSError as exc:
            self._count(stats, ok=False)
            if out_of_resources(exc):
                log.error("C-STORE from %s refused: cannot write instance: %s", calling, exc.strerror)
                return _failure(STATUS_OUT_OF_RESOURCES, f"cannot write instance: {exc.strerror}")
            log.error("C-STORE from %s refused: cannot write instance: %s", calling, exc)
            return _failure(STATUS_PROCESSING_FAILURE, f"cannot write instance: {exc.strerror or type(exc).__name__}")
        except Exception as exc:  # noqa: BLE001 - a bad dataset must not take the node down
            log.warning("C-STORE from %s refused: dataset could not be read or stored (%s)", calling, type(exc).__name__)
            log.debug("C-STORE failure detail", exc_info=True)
            self._count(stats, ok=False)
            return _failure(STATUS_CANNOT_UNDERSTAND, f"cannot read or store dataset: {type(exc).__name__}")
        finally:
            if checking is not None and not checking.done():  # the write failed: the check ends first
                wait([checking])
            if tmp is not None:  # refused: the temp file goes
                tmp.unlink(missing_ok=True)

        def bookkeeping() -> None:  # the sender need not wait for this: after the response
            self.indexer.submit(entry)
            self._count(stats, ok=True, size=entry.size, series=entry.series_uid)
            self.metrics.instance_received("dimse", entry.size, started)
            self.on_instance(assoc.key, entry.series_uid)
            self._prepare_temp()

        if assoc.after_response is None:
            bookkeeping()
        else:
            assoc.after_response.append(bookkeeping)
        return _SUCCESS

    def _prepare_temp(self) -> None:
        """The next instance's temp file, made while its sender is busy (FileStore.prepare_temp)."""
        try:
            self.ingest.files.prepare_temp()
        except OSError as exc:  # the write itself will meet it again and answer for it
            log.debug("could not make a temp file ahead: %s", exc)

    def _check(self, data: bytearray | memoryview, transfer_syntax: str, size: int, calling: str,
               affected: str) -> Entry:
        """The data set's checks (read_dataset) and its index entry; InvalidInstance if it is
        not one the node stores."""
        try:
            ds = read_dataset(data, transfer_syntax)
        except InvalidInstance:
            raise
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types (OSError too) on garbage
            log.debug("C-STORE data set unreadable", exc_info=True)
            raise InvalidInstance(f"cannot read data set: {type(exc).__name__}") from exc
        return self.ingest.entry(ds, size, calling, transfer_syntax, affected)

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

    def start(self, extra_tls_listener: bool = True, thread_prefix: str = "dicom", listen: bool = True) -> None:
        """Listen on node.port (and [tls] port); in a receiver process ``listen=False`` (it is
        handed node.port's connections: ``server.serve``) and ``extra_tls_listener=False`` (the
        main process serves [tls] port)."""
        node = self.settings.node
        self._audit_thread = threading.Thread(target=self._write_audit, name="scp-audit", daemon=True)
        self._audit_thread.start()
        self.indexer.start()
        self._checkers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="instance-check")
        contexts = [build_context(Verification)]
        contexts += [build_context(cx.abstract_syntax, ACCEPT_ORDER) for cx in AllStoragePresentationContexts]
        options = dict(max_associations=32, max_pdu=MAX_PDU, max_pdu_bytes=MAX_PDU_BYTES,
                       max_message_bytes=int(node.max_instance_mb * 1e6), acse_timeout=30.0, network_timeout=60.0,
                       thread_prefix=thread_prefix)
        tls = self.settings.tls
        if not listen:
            # a receiver process: no socket of its own; node.port's connections are handed to it
            # (TLS ones when node.port speaks TLS only: the handshake runs here)
            tls_only = tls.listening and tls.port is None
            self.server = Acceptor(node.host, node.port, self, contexts, listen=False,
                                   ssl_context=server_context(tls) if tls_only else None, **options)
            return
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
    def listening(self) -> bool:
        """Every listener it started accepts connections (False before start and after stop)."""
        servers = [s for s in (self.server, self.tls_server) if s is not None]
        return bool(servers) and all(s.accepting for s in servers)

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
        if self._checkers is not None:
            self._checkers.shutdown(wait=True)
            self._checkers = None
        self.ingest.files.close_spares()
        self.indexer.stop()
        if self._audit_thread is not None:
            self._audit_queue.put(None)  # after what is queued: every row is written before stop returns
            self._audit_thread.join(timeout=30)
            self._audit_thread = None
