"""The DICOM upper layer of the storage SCP: a lean acceptor, one thread per association.

Why not pynetdicom's ``AE.start_server``: on this project's 2-core machines a pynetdicom SCP
whose C-STORE handler does nothing at all accepts about 310 instances/s from DCMTK storescu
(its DUL and association reactors hand every PDU between two threads and poll with 1 ms
sleeps), which caps ingest far below what the disk allows (docs/performance.md). This module
keeps pynetdicom for everything that is protocol knowledge: A-ASSOCIATE-RQ decoding and
A-ASSOCIATE-AC encoding (``pynetdicom.pdu``), presentation context and role negotiation
(``pynetdicom.presentation.negotiate_as_acceptor``), command set encoding (``pynetdicom.
dsutils``), file meta (``create_file_meta``). What it adds is the transport: blocking reads of
whole PDUs on the association's own thread, PDV fragments appended straight into one buffer
per message, and the response written by the same thread. The sending side (``scu.py``) does
the same for outgoing associations.

Protocol behaviour (PS3.8): an association is rejected with A-ASSOCIATE-RJ (the handler's
access decision, or "local limit exceeded" past ``max_associations``); anything malformed or
unexpected gets an A-ABORT and the connection is closed; silence longer than the ACSE timeout
(before the request) or the network timeout (after it) closes it too. C-ECHO is answered here;
C-STORE goes to the handler; other DIMSE requests get status 0x0211 (unrecognised operation).
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol

from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from .. import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = logging.getLogger(__name__)

C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
NO_DATASET = 0x0101
STATUS_UNRECOGNISED_OPERATION = 0x0211

# A-ABORT source 2 = service provider; reasons (PS3.8 9.3.8)
ABORT_UNRECOGNISED_PDU, ABORT_UNEXPECTED_PDU, ABORT_INVALID_PARAMETER = 0x01, 0x02, 0x06


class Abort(Exception):
    """Send an A-ABORT with this reason and close the connection."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Closed(Exception):
    """The peer closed the connection, or the read timed out."""


@dataclass
class Association:
    calling_ae: str
    address: str
    port: int
    #: accepted presentation contexts: id -> (abstract syntax, transfer syntax)
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)
    #: work a handler leaves for after the response is sent (the Acceptor runs it before it
    #: reads the next PDU); None where no Acceptor serves the association: do it at once
    after_response: list[Callable[[], None]] | None = None

    @property
    def key(self) -> int:
        return id(self)


class Handler(Protocol):
    def admit(self, calling_ae: str, address: str) -> str | None:
        """None to accept the association, else why it is rejected (logged and audited by the handler)."""

    def accepted(self, assoc: Association) -> None: ...

    def ended(self, assoc: Association, released: bool) -> None: ...

    def c_store(self, assoc: Association, context_id: int, command: Command,
                data: bytearray | memoryview) -> Dataset:
        """Store one instance; return the response status (Status, and ErrorComment on failure).
        Bookkeeping that the sender need not wait for may go to ``assoc.after_response``."""

    def releasing(self, assoc: Association) -> None:
        """The peer asked to release; called before the A-RELEASE-RP is sent."""


@dataclass(frozen=True)
class _Negotiated:
    """What an A-ASSOCIATE-RQ's variable items (application context, presentation contexts,
    user information) negotiate to: the accepted contexts and the A-ASSOCIATE-AC's own variable
    items. The same items always negotiate the same way, so an Acceptor keeps the answer."""
    contexts: dict[int, tuple[str, str]]
    ac_items: bytes


@dataclass
class _Request:
    """An A-ASSOCIATE-RQ as the acceptor uses it."""
    calling_ae: str
    #: the Called and Calling AE Title fields as received: the A-ASSOCIATE-AC echoes them (PS3.8 9.3.3)
    ae_fields: bytes
    #: the variable items, undecoded: the key of the negotiation cache
    items: bytes
    #: pynetdicom's decoding of the request; None where these items were negotiated before
    primitive: A_ASSOCIATE | None
    negotiated: _Negotiated | None


#: how many different requests' negotiations an Acceptor keeps (least recently used go first),
#: and the largest variable part it keeps one for
NEGOTIATIONS_KEPT = 64
NEGOTIATION_ITEMS_MAX = 1 << 16


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def abort_pdu(reason: int, source: int = 0x02) -> bytes:
    return _pdu(0x07, bytes((0, 0, source, reason)))


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    return _pdu(0x03, bytes((0, result, source, reason)))


RELEASE_RP = _pdu(0x06, b"\x00" * 4)


def _implicit(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def response_pdu(context_id: int, command_field: int, message_id: int, status: int, sop_class: str | None = None,
                 sop_instance: str | None = None, comment: str | None = None) -> bytes:
    """One P-DATA-TF carrying a response command set (implicit VR little endian, PS3.7 9.3),
    encoded directly: two passes of pydicom's encoder per response cost more than the rest of
    answering."""
    elements = []
    if sop_class:
        elements.append(_implicit(0x00000002, sop_class.encode("ascii", "replace")))
    elements += [_implicit(0x00000100, struct.pack("<H", command_field)),
                 _implicit(0x00000120, struct.pack("<H", message_id & 0xFFFF)),
                 _implicit(0x00000800, struct.pack("<H", NO_DATASET)),
                 _implicit(0x00000900, struct.pack("<H", status))]
    if comment:
        text = comment.encode("ascii", "replace")[:64]
        elements.append(_implicit(0x00000902, text + b" " if len(text) % 2 else text))
    if sop_instance:
        elements.append(_implicit(0x00001000, sop_instance.encode("ascii", "replace")))
    body = b"".join(elements)
    raw = _implicit(0x00000000, struct.pack("<L", len(body))) + body
    return _pdu(0x04, struct.pack(">LBB", len(raw) + 2, context_id, 0x03) + raw)


class Command:
    """A received command set (implicit VR little endian, group 0000, PS3.7 9.3), read
    element by element into raw values; ``get`` decodes the few the node uses. pydicom's
    Dataset did the same with a value conversion and a regular-expression check per UID,
    a fifth of the receive path's Python time."""

    __slots__ = ("_raw",)
    _US = {"CommandField": 0x0100, "MessageID": 0x0110, "MessageIDBeingRespondedTo": 0x0120, "Priority": 0x0700,
           "CommandDataSetType": 0x0800, "Status": 0x0900}
    _TEXT = {"AffectedSOPClassUID": 0x0002, "RequestedSOPClassUID": 0x0003, "MoveDestination": 0x0600,
             "AffectedSOPInstanceUID": 0x1000, "RequestedSOPInstanceUID": 0x1001,
             "MoveOriginatorApplicationEntityTitle": 0x1030}

    def __init__(self, raw: bytes | bytearray) -> None:
        values: dict[int, bytes] = {}
        offset, end = 0, len(raw)
        while offset < end:
            if end - offset < 8:
                raise ValueError("truncated element header")
            group, element, length = struct.unpack_from("<HHL", raw, offset)
            offset += 8
            if group != 0x0000:
                raise ValueError(f"element ({group:04X},{element:04X}) outside the command group")
            if length > end - offset:
                raise ValueError(f"element (0000,{element:04X}) longer than the command set")
            values[element] = bytes(raw[offset:offset + length])
            offset += length
        self._raw = values

    def get(self, keyword: str, default: object = None) -> object:
        if keyword in self._US:
            value = self._raw.get(self._US[keyword])
            if value is None:
                return default
            if len(value) != 2:
                raise ValueError(f"{keyword} is {len(value)} bytes long, not 2")
            return struct.unpack("<H", value)[0]
        value = self._raw.get(self._TEXT[keyword])  # KeyError for a keyword the node never reads
        return default if value is None else value.rstrip(b"\x00 ").decode("latin-1")


def command_pdu(context_id: int, command: Dataset) -> bytes:
    """One P-DATA-TF carrying a whole command set (group length filled in)."""
    command.CommandGroupLength = 0
    raw = encode(command, True, True)
    command.CommandGroupLength = len(raw) - 12  # the group length element itself: tag, length, UL
    raw = encode(command, True, True)
    return _pdu(0x04, struct.pack(">LBB", len(raw) + 2, context_id, 0x03) + raw)


def _kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Make ``sock`` blocking with its timeouts kept by the kernel (SO_RCVTIMEO, SO_SNDTIMEO):
    a read then waits for a whole PDU in one system call (MSG_WAITALL), where a Python
    timeout makes each read return what has arrived and take the GIL again."""
    timeval = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class Acceptor:
    """Listens on (host, port); serves each association on a thread of its own."""

    def __init__(self, host: str, port: int, handler: Handler, contexts: list[PresentationContext], *,
                 ssl_context: ssl.SSLContext | None = None, max_associations: int = 32, max_connections: int = 512,
                 max_pdu: int = 1 << 20, max_pdu_bytes: int = 4 << 20, max_message_bytes: int = 2 << 30,
                 acse_timeout: float = 30.0, network_timeout: float = 60.0, artim_timeout: float = 5.0,
                 thread_prefix: str = "dicom", listen: bool = True) -> None:
        """``listen=False``: no socket of its own; connections come through ``serve`` (a receiver
        process, handed them by the main process)."""
        self.handler = handler
        self.contexts = contexts
        self.ssl_context = ssl_context
        self.max_associations = max_associations
        #: open connections of any kind (each has a thread; silent ones wait up to acse_timeout)
        self.max_connections = max_connections
        self._refused_logged = 0.0
        self.max_pdu = max_pdu
        self.max_pdu_bytes = max_pdu_bytes
        self.max_message_bytes = max_message_bytes
        self.acse_timeout = acse_timeout
        self.thread_prefix = thread_prefix  # association threads are named (and logged) <prefix>-<peer>
        self.network_timeout = network_timeout
        #: how long to wait for the peer to close after our last PDU (PS3.8 ARTIM timer)
        self.artim_timeout = artim_timeout
        self._lock = threading.Lock()
        #: A-ASSOCIATE-RQ variable items -> their negotiation. Decoding a request with pynetdicom
        #: and negotiating it is 10-15 ms of CPU under the GIL for the 128 contexts storescu proposes
        #: (docs/performance.md, session 12); a sender proposes the same every time
        self._negotiated: OrderedDict[bytes, _Negotiated] = OrderedDict()
        self._connections: set[socket.socket] = set()
        self._active = 0
        self._stopping = False
        #: called with each accepted connection before it is served here; True: it was handed to
        #: another process (receivers.ReceiverPool), which serves it
        self.handoff: Callable[[socket.socket, tuple[str, int]], bool] | None = None
        self.socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.server_address: tuple = (host, port)
        if listen:
            self.socket = socket.create_server((host, port), backlog=128)
            self.server_address = self.socket.getsockname()
            self._thread = threading.Thread(target=self._accept_loop,
                                            name=f"dicom-accept-{self.server_address[1]}", daemon=True)
            self._thread.start()

    @property
    def accepting(self) -> bool:
        """Its accept loop runs (always True for one that is handed connections instead)."""
        return not self._stopping and (self._thread is None or self._thread.is_alive())

    # -- listening ---------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                conn, address = self.socket.accept()
            except OSError:
                if self._stopping:
                    return
                time.sleep(0.05)  # e.g. out of file descriptors: don't spin
                continue
            with self._lock:
                full = len(self._connections) >= self.max_connections
                if not full:
                    self._connections.add(conn)
            if full:
                if time.monotonic() - self._refused_logged > 10:
                    self._refused_logged = time.monotonic()
                    log.warning("connection from %s:%d closed at once: %d connections open (the limit; silent "
                                "ones are closed after %.0f s)", address[0], address[1], self.max_connections,
                                self.acse_timeout)
                conn.close()
                continue
            handed = False
            if self.handoff is not None:
                try:
                    handed = self.handoff(conn, address)
                except Exception:  # noqa: BLE001 - served here instead
                    log.exception("connection from %s:%d could not be handed to a receiver process", *address)
            if handed:
                with self._lock:
                    self._connections.discard(conn)
                conn.close()  # the receiver process has its own descriptor of it
                continue
            self._start_serving(conn, address)

    def serve(self, conn: socket.socket, address: tuple[str, int]) -> None:
        """Serve a connection accepted elsewhere (the main process, for a receiver process)."""
        with self._lock:
            self._connections.add(conn)
        self._start_serving(conn, address)

    def _start_serving(self, conn: socket.socket, address: tuple[str, int]) -> None:
        threading.Thread(target=self._serve, args=(conn, address),
                         name=f"{self.thread_prefix}-{address[0]}:{address[1]}", daemon=True).start()

    def shutdown(self) -> None:
        """Stop listening and close every open association's connection."""
        self._stopping = True
        if self.socket is not None:
            try:
                self.socket.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
            except OSError:
                pass
            self.socket.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- one connection ----------------------------------------------------------------------
    def _serve(self, conn: socket.socket, address: tuple[str, int]) -> None:
        sock: socket.socket = conn
        assoc: Association | None = None
        released = False
        counted = False
        said_last = False  # we sent the last PDU of a well-behaved peer (A-ASSOCIATE-RJ or A-RELEASE-RP)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.acse_timeout)
            if self.ssl_context is not None:
                # the handshake runs here, under the timeout, not in the accepting thread
                sock = self.ssl_context.wrap_socket(conn, server_side=True)
            request = self._read_request(sock)
            # only a connection that sent a well-formed request takes an association slot: silent or
            # garbage connections (closed at once, or at the ACSE timeout) never turn callers away
            with self._lock:
                self._active += 1
                counted = True
                over_limit = self._active > self.max_associations
            assoc = self._accept(sock, address, request, over_limit)
            if assoc is None:
                said_last = True
                return
            if isinstance(sock, ssl.SSLSocket):
                sock.settimeout(self.network_timeout)
            else:
                _kernel_timeouts(sock, self.network_timeout)
            released = said_last = self._run(sock, assoc)
        except Abort as exc:
            log.warning("association from %s:%d aborted: %s", address[0], address[1], exc)
            try:
                sock.sendall(abort_pdu(exc.reason))
            except OSError:
                pass
        except Closed as exc:
            if assoc is not None:
                log.info("association from %s@%s:%d ended without release: %s", assoc.calling_ae, address[0],
                         address[1], exc)
        except ssl.SSLError as exc:
            log.warning("TLS connection from %s:%d refused: %s", address[0], address[1], exc.reason or exc)
        except OSError as exc:
            log.info("connection from %s:%d closed: %s", address[0], address[1], exc)
        except Exception:  # noqa: BLE001 - one broken association must not take the listener down
            log.exception("association from %s:%d failed", address[0], address[1])
            try:
                sock.sendall(abort_pdu(0x00))
            except OSError:
                pass
        finally:
            if counted:
                with self._lock:
                    self._active -= 1
            if assoc is not None:
                self.handler.ended(assoc, released)
            if said_last:
                self._await_peer_close(sock)
            try:
                sock.close()
            except OSError:
                pass
            with self._lock:
                self._connections.discard(conn)

    def _await_peer_close(self, sock: socket.socket, limit: int = 1 << 16) -> None:
        """DICOM PS3.8 state Sta13: after our A-ASSOCIATE-RJ or A-RELEASE-RP it is the requestor
        that closes the transport connection; wait for that (up to the ARTIM timeout, reading
        at most ``limit`` bytes). Closing first can make the peer see a dropped connection
        instead of our last PDU (a rejection then reads as an abort). After an A-ABORT of ours
        (a protocol error, maybe a flood) the connection is closed at once."""
        try:
            sock.settimeout(self.artim_timeout)
            left = limit
            while left > 0:
                chunk = sock.recv(min(4096, left))
                if not chunk:
                    break
                left -= len(chunk)
        except (OSError, ValueError):
            pass

    def _read_pdu(self, sock: socket.socket) -> tuple[int, bytearray]:
        header = self._read(sock, 6)
        pdu_type, length = header[0], struct.unpack_from(">L", header, 2)[0]
        if pdu_type not in (1, 2, 3, 4, 5, 6, 7):
            raise Abort(ABORT_UNRECOGNISED_PDU, f"unrecognised PDU type 0x{pdu_type:02x}")
        if length > self.max_pdu_bytes:
            raise Abort(ABORT_INVALID_PARAMETER, f"a PDU of {length} bytes exceeds the {self.max_pdu_bytes}-byte limit")
        return pdu_type, self._read(sock, length)

    @staticmethod
    def _read(sock: socket.socket, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        # a blocking socket (_kernel_timeouts) waits in one call for the whole PDU, without the
        # GIL; one with a Python timeout returns what has arrived, ~64 KiB a call on loopback
        flags = socket.MSG_WAITALL if sock.gettimeout() is None else 0
        while got < n:
            try:
                k = sock.recv_into(view[got:], n - got, flags)
            except (socket.timeout, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO ran out
                raise Closed("timed out waiting for the peer") from None
            if k == 0:
                raise Closed("connection closed by the peer")
            got += k
        return buf

    def _read_request(self, sock: socket.socket) -> _Request:
        """The A-ASSOCIATE-RQ, decoded by pynetdicom (unless its variable items were negotiated
        before: then only its AE titles, by pynetdicom's rules); an A-ABORT for anything else."""
        pdu_type, body = self._read_pdu(sock)
        if pdu_type != 0x01:
            raise Abort(ABORT_UNEXPECTED_PDU, f"expected an A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02x}")
        if len(body) < 68:  # protocol version, reserved, two AE titles, 32 reserved bytes
            raise Abort(ABORT_INVALID_PARAMETER, f"malformed A-ASSOCIATE-RQ ({len(body)} bytes)")
        items = bytes(body[68:])
        with self._lock:
            negotiated = self._negotiated.get(items)
            if negotiated is not None:
                self._negotiated.move_to_end(items)
        try:
            if negotiated is not None:
                titles = A_ASSOCIATE_RQ()  # its setters check the titles as a full decode would
                titles.called_ae_title = bytes(body[4:20])
                titles.calling_ae_title = bytes(body[20:36])
                return _Request(str(titles.calling_ae_title).strip(), bytes(body[4:36]), items, None, negotiated)
            rq = A_ASSOCIATE_RQ()
            rq.decode(bytes(_pdu(0x01, bytes(body))))
            primitive = rq.to_primitive()
            list(primitive.presentation_context_definition_list)
        except Exception as exc:  # noqa: BLE001 - pynetdicom raises many types on garbage
            raise Abort(ABORT_INVALID_PARAMETER, f"malformed A-ASSOCIATE-RQ ({type(exc).__name__})") from None
        return _Request(str(primitive.calling_ae_title or "").strip(), bytes(body[4:36]), items, primitive, None)

    def _accept(self, sock: socket.socket, address: tuple[str, int], request: _Request,
                over_limit: bool) -> Association | None:
        """Reject (None) or accept the request: negotiate contexts, send the A-ASSOCIATE-AC."""
        calling = request.calling_ae
        reason = self.handler.admit(calling, address[0])
        if reason is not None:
            sock.sendall(reject_pdu(0x01, 0x01, 0x03))  # permanent, service user, calling AE not recognised
            return None
        if over_limit:
            log.warning("association from %s@%s rejected: %d associations open (the limit)", calling, address[0],
                        self.max_associations)
            sock.sendall(reject_pdu(0x02, 0x03, 0x02))  # transient, provider (presentation), local limit exceeded
            return None
        negotiated = request.negotiated
        if negotiated is None:
            assert request.primitive is not None
            negotiated = self._negotiate(request.primitive)
            if len(request.items) <= NEGOTIATION_ITEMS_MAX:
                with self._lock:
                    self._negotiated[request.items] = negotiated
                    while len(self._negotiated) > NEGOTIATIONS_KEPT:
                        self._negotiated.popitem(last=False)
        assoc = Association(calling, address[0], address[1], contexts=dict(negotiated.contexts), after_response=[])
        # protocol version 1, reserved, the AE title fields echoed, 32 reserved bytes, the items
        sock.sendall(_pdu(0x02, b"\x00\x01\x00\x00" + request.ae_fields + bytes(32) + negotiated.ac_items))
        self.handler.accepted(assoc)
        return assoc

    def _negotiate(self, primitive: A_ASSOCIATE) -> _Negotiated:
        """Presentation contexts and roles (pynetdicom), and the A-ASSOCIATE-AC's variable items."""
        proposed = list(primitive.presentation_context_definition_list)
        if not proposed:
            raise Abort(ABORT_INVALID_PARAMETER, "A-ASSOCIATE-RQ without presentation contexts")
        info = list(primitive.user_information or [])
        roles = {item.sop_class_uid: (item.scu_role, item.scp_role)
                 for item in info if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}
        results, ac_roles = negotiate_as_acceptor(proposed, self.contexts, roles)
        contexts = {int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                    for cx in results if cx.result == 0x00 and cx.context_id is not None}

        ac = A_ASSOCIATE()
        ac.application_context_name = primitive.application_context_name
        ac.calling_ae_title = primitive.calling_ae_title
        ac.called_ae_title = primitive.called_ae_title
        ac.result = 0x00
        ac.result_source = 0x01
        ac.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.max_pdu
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        impl_version = ImplementationVersionNameNotification()
        impl_version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        user_info: list = [max_length, impl_uid, impl_version, *ac_roles]
        if any(isinstance(item, AsynchronousOperationsWindowNegotiation) for item in info):
            window = AsynchronousOperationsWindowNegotiation()
            window.maximum_number_operations_invoked = 1
            window.maximum_number_operations_performed = 1
            user_info.append(window)
        ac.user_information = user_info
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(ac)
        return _Negotiated(contexts, pdu.encode()[6 + 68:])

    def _run(self, sock: socket.socket, assoc: Association) -> bool:
        """Serve DIMSE messages until release (True) or abort by the peer (False)."""
        command_bytes = bytearray()
        command: Command | None = None
        command_context = 0
        data: list[memoryview] = []  # the data set's fragments, views into the PDUs that brought them
        size = 0
        while True:
            pdu_type, body = self._read_pdu(sock)
            if pdu_type == 0x05:  # A-RELEASE-RQ
                self.handler.releasing(assoc)
                sock.sendall(RELEASE_RP)
                return True
            if pdu_type == 0x07:  # A-ABORT
                return False
            if pdu_type != 0x04:
                raise Abort(ABORT_UNEXPECTED_PDU, f"unexpected PDU type 0x{pdu_type:02x} on an open association")
            view = memoryview(body)
            offset, end = 0, len(body)
            if end < 6:
                raise Abort(ABORT_INVALID_PARAMETER, "P-DATA-TF without a presentation data value")
            while offset < end:
                if end - offset < 6:
                    raise Abort(ABORT_INVALID_PARAMETER, "truncated presentation data value item")
                length = struct.unpack_from(">L", body, offset)[0]
                if length < 2 or offset + 4 + length > end:
                    raise Abort(ABORT_INVALID_PARAMETER, f"presentation data value item length {length} is invalid")
                context_id, control = body[offset + 4], body[offset + 5]
                fragment = view[offset + 6: offset + 4 + length]
                offset += 4 + length
                if context_id not in assoc.contexts:
                    raise Abort(ABORT_INVALID_PARAMETER, f"presentation context {context_id} was not accepted")
                if control & 0x01:  # command fragment
                    if command is not None:
                        raise Abort(ABORT_UNEXPECTED_PDU, "a command arrived before the previous one's data set")
                    command_bytes += fragment
                    if len(command_bytes) > 65536:
                        raise Abort(ABORT_INVALID_PARAMETER, "command set longer than 64 KiB")
                    if not control & 0x02:
                        continue
                    command = self._decode_command(command_bytes)
                    command_bytes = bytearray()
                    command_context = context_id
                    if int(command.get("CommandDataSetType", NO_DATASET)) == NO_DATASET:
                        self._dispatch(sock, assoc, command_context, command, None)
                        command = None
                else:
                    if command is None:
                        raise Abort(ABORT_UNEXPECTED_PDU, "a data set fragment arrived without its command")
                    if context_id != command_context:
                        raise Abort(ABORT_INVALID_PARAMETER, f"data set on presentation context {context_id}, its "
                                                             f"command on {command_context}")
                    data.append(fragment)
                    size += len(fragment)
                    if size > self.max_message_bytes:
                        log.warning("association from %s@%s aborted: its instance exceeds [node] max_instance_mb "
                                    "(%.0f MB)", assoc.calling_ae, assoc.address, self.max_message_bytes / 1e6)
                        raise Abort(ABORT_INVALID_PARAMETER, "data set exceeds the size limit")
                    if control & 0x02:
                        whole = data[0] if len(data) == 1 else bytearray().join(data)
                        self._dispatch(sock, assoc, command_context, command, whole)
                        command, data, size = None, [], 0

    @staticmethod
    def _decode_command(raw: bytearray) -> Command:
        try:
            command = Command(raw)
            field_ = command.get("CommandField")
            if field_ is None:
                raise ValueError("no Command Field")
            command.get("MessageID")
            command.get("CommandDataSetType")
        except Exception as exc:  # noqa: BLE001
            raise Abort(ABORT_INVALID_PARAMETER, f"unreadable command set ({exc})") from None
        if field_ & 0x8000:
            raise Abort(ABORT_UNEXPECTED_PDU, f"a response (command field 0x{field_:04x}) sent to the SCP")
        return command

    def _dispatch(self, sock: socket.socket, assoc: Association, context_id: int, command: Command,
                  data: bytearray | memoryview | None) -> None:
        field_ = int(command.get("CommandField"))
        if field_ == C_CANCEL_RQ:
            return
        sop_class = command.get("AffectedSOPClassUID")
        sop_instance = None
        message_id = int(command.get("MessageID", 0) or 0)
        comment = None
        if field_ == C_ECHO_RQ:
            status = 0x0000
        elif field_ == C_STORE_RQ:
            sop_instance = command.get("AffectedSOPInstanceUID")
            if data is None:
                status, comment = 0xC000, "C-STORE-RQ without a data set"
            else:
                result = self.handler.c_store(assoc, context_id, command, data)
                status, comment = int(result.Status), result.get("ErrorComment")
        else:
            log.warning("association from %s@%s: DIMSE command 0x%04x is not supported", assoc.calling_ae,
                        assoc.address, field_)
            status = STATUS_UNRECOGNISED_OPERATION
        try:
            sock.sendall(response_pdu(context_id, field_ | 0x8000, message_id, status, str(sop_class or "") or None,
                                      str(sop_instance or "") or None, comment))
        finally:  # also when the peer is gone: what was stored is still indexed
            if assoc.after_response:
                for work in assoc.after_response:
                    work()
                assoc.after_response.clear()
