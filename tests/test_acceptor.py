"""The SCP's upper layer (pacs_node/net/acceptor.py) against real callers and raw sockets:
association slots, silent connections, an unsupported DIMSE request, release and abort.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dsutils import decode
from pynetdicom.sop_class import Verification

from pacs_node.net.acceptor import command_pdu

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from conftest import wait_for  # noqa: E402
from fuzz_store import CALLING, associate_rq  # noqa: E402

PEERS = [{"name": "raw", "ae_title": CALLING}, {"name": "probe", "ae_title": "PROBE"}]


def associate(port: int):  # type: ignore[no-untyped-def]
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="PACSNODE")


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf
    header = exactly(6)
    return header[0], exactly(struct.unpack(">L", header[2:])[0])


def test_association_slots_silent_connections_do_not_count_and_the_33rd_is_rejected(node_factory):
    node = node_factory(PEERS, [])
    # 40 connections that never send a request: they must not take association slots
    silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(40)]
    try:
        held = [associate(node.port) for _ in range(32)]
        assert all(a.is_established for a in held)
        # the 33rd caller on a raw socket: pynetdicom's requestor can report a fast rejection as an
        # abort (its DUL closes the socket before its ACSE thread checks the connection)
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as extra:
            extra.sendall(associate_rq())
            kind, body = read_pdu(extra)
        assert kind == 0x03, f"a 33rd concurrent association got PDU type 0x{kind:02x}, not A-ASSOCIATE-RJ"
        assert tuple(body[1:4]) == (0x02, 0x03, 0x02), "not 'transient, provider, local limit exceeded'"
        held.pop().release()

        def next_caller():  # type: ignore[no-untyped-def]
            # the slot is freed when the node's thread for the released association ends (after its
            # A-RELEASE-RP), which a loaded machine may schedule late
            a = associate(node.port)
            return a if a.is_established else None

        again = wait_for(next_caller, 10, "a freed slot to be given to the next caller")
        assert again.send_c_echo().Status == 0x0000
        again.release()
        for a in held:
            a.release()
    finally:
        for s in silent:
            s.close()
    assert "32 associations open (the limit)" in node.log()


def test_unsupported_dimse_request_gets_0211_and_the_association_stays_usable(node_factory):
    node = node_factory(PEERS, [])
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(associate_rq())
        kind, _ = read_pdu(sock)
        assert kind == 0x02, "association not accepted"
        find = Dataset()
        find.AffectedSOPClassUID = Verification
        find.CommandField = 0x0020  # C-FIND-RQ, on a Verification context
        find.MessageID = 7
        find.Priority = 0
        find.CommandDataSetType = 0x0101
        sock.sendall(command_pdu(1, find))
        kind, body = read_pdu(sock)
        assert kind == 0x04
        rsp = decode(BytesIO(body[6:]), True, True)
        assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8020, 7, 0x0211)

        echo = Dataset()
        echo.AffectedSOPClassUID = Verification
        echo.CommandField = 0x0030
        echo.MessageID = 8
        echo.CommandDataSetType = 0x0101
        sock.sendall(command_pdu(1, echo))
        kind, body = read_pdu(sock)
        rsp = decode(BytesIO(body[6:]), True, True)
        assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8030, 8, 0x0000)

        sock.sendall(struct.pack(">BBL", 0x05, 0, 4) + b"\0" * 4)  # A-RELEASE-RQ
        kind, _ = read_pdu(sock)
        assert kind == 0x06, "no A-RELEASE-RP"

    # a data set fragment with no command before it: A-ABORT, and the node serves the next caller
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(associate_rq())
        assert read_pdu(sock)[0] == 0x02
        pdv = struct.pack(">LBB", 6, 1, 0x02) + b"\0" * 4  # data, last fragment
        sock.sendall(struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv)
        kind, body = read_pdu(sock)
        assert kind == 0x07 and body[2] == 0x02, "expected an A-ABORT from the service provider"
    assert "a data set fragment arrived without its command" in node.log()
    a = associate(node.port)
    assert a.is_established and a.send_c_echo().Status == 0x0000
    a.release()


def test_connections_beyond_the_limit_are_closed_at_once():
    """Each connection has a thread until it sends a request or the ACSE timeout passes: past
    max_connections, a new one is closed straight away instead of adding threads without bound."""
    from pacs_node.net.acceptor import Acceptor

    class Refuse:
        def admit(self, calling, address):  # type: ignore[no-untyped-def]
            return "test"

    acceptor = Acceptor("127.0.0.1", 0, Refuse(), [], max_connections=3, acse_timeout=30)
    port = acceptor.server_address[1]
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        wait_for(lambda: len(acceptor._connections) == 3, 10, "the acceptor to count the 3 connections")
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        started = time.monotonic()
        assert extra.recv(10) == b"", "the connection over the limit was not closed"
        assert time.monotonic() - started < 10  # closed at once, not after the 30 s ACSE timeout
        extra.close()
        held.pop().close()
        wait_for(lambda: len(acceptor._connections) == 2, 10, "the acceptor to drop the closed connection")
        again = socket.create_connection(("127.0.0.1", port), timeout=1)
        with pytest.raises(socket.timeout):  # kept open, waiting for its A-ASSOCIATE-RQ
            again.recv(10)
        again.close()
    finally:
        for s in held:
            s.close()
        acceptor.shutdown()


def test_reads_under_kernel_timeouts_wait_for_the_whole_pdu_and_time_out():
    """After the A-ASSOCIATE-AC the acceptor's socket is blocking with SO_RCVTIMEO (one read
    per PDU, MSG_WAITALL): bytes arriving in pieces make one read; silence ends it as Closed."""
    import threading

    from pacs_node.net.acceptor import Acceptor, Closed, _kernel_timeouts

    ours, peer = socket.socketpair()
    try:
        _kernel_timeouts(ours, 2.0)  # far above the pieces' 0.05 s gaps, even on a loaded machine

        def dribble() -> None:
            for piece in (b"abc", b"defg", b"hij"):
                peer.sendall(piece)
                time.sleep(0.05)

        threading.Thread(target=dribble).start()
        assert Acceptor._read(ours, 10) == bytearray(b"abcdefghij")
        started = time.monotonic()
        with pytest.raises(Closed, match="timed out"):
            Acceptor._read(ours, 4)
        assert 1.5 < time.monotonic() - started < 10
    finally:
        ours.close()
        peer.close()


def test_work_left_for_after_the_response_runs_even_when_the_peer_is_gone():
    """StorageSCP indexes an instance after its C-STORE-RSP is sent (assoc.after_response);
    a peer that vanished before hearing the response must not leave the stored file unindexed."""
    from pacs_node.net.acceptor import Acceptor, Association, Command

    done: list[str] = []

    class Handler:
        def c_store(self, assoc, context_id, command, data):  # type: ignore[no-untyped-def]
            assoc.after_response.append(lambda: done.append("indexed"))
            rsp = Dataset()
            rsp.Status = 0
            return rsp

    acceptor = Acceptor("127.0.0.1", 0, Handler(), [], listen=False)  # type: ignore[arg-type]
    assoc = Association("SCU", "127.0.0.1", 1, after_response=[])
    raw = struct.pack("<HHL", 0, 0x0100, 2) + struct.pack("<H", 0x0001)
    ours, peer = socket.socketpair()
    peer.close()
    try:
        with pytest.raises(OSError):
            acceptor._dispatch(ours, assoc, 1, Command(raw), bytearray(b"x"))
    finally:
        ours.close()
    assert done == ["indexed"] and assoc.after_response == []


def test_a_request_seen_before_is_answered_from_the_cache_and_still_checked(node_factory):
    """The acceptor keeps each distinct request's negotiation (decoding the 128 contexts
    storescu proposes costs 10-15 ms of CPU): a repeated request gets the same A-ASSOCIATE-AC,
    byte for byte, with its own AE titles echoed, and still goes through access control and the
    AE title checks."""
    from fuzz_store import echo_pdata

    node = node_factory(PEERS, [])

    def request(rq: bytes) -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
            sock.sendall(rq)
            kind, body = read_pdu(sock)
            if kind == 0x02:  # accepted: the association works (C-ECHO), then release
                sock.sendall(echo_pdata())
                reply, pdv = read_pdu(sock)
                assert reply == 0x04
                assert decode(BytesIO(pdv[6:]), True, True).Status == 0x0000
                sock.sendall(struct.pack(">BBL", 0x05, 0, 4) + b"\0" * 4)
                assert read_pdu(sock)[0] == 0x06
            return kind, body

    first = request(associate_rq())
    again = request(associate_rq())
    assert first[0] == again[0] == 0x02
    assert first[1] == again[1], "a repeated request got a different A-ASSOCIATE-AC"
    assert first[1][4:36] == associate_rq()[10:42], "the AC does not echo the request's AE title fields"
    # the same items from a caller that is not a peer: rejected, as without the cache
    kind, body = request(associate_rq(calling="STRANGER"))
    assert kind == 0x03 and tuple(body[1:4]) == (0x01, 0x01, 0x03), "an unknown caller was not rejected"
    # the same items under a Calling AE Title of 16 spaces (not allowed): aborted, as a full decode does
    kind, _ = request(associate_rq(calling=""))
    assert kind == 0x07
    assert "malformed A-ASSOCIATE-RQ (ValueError)" in node.log()
    # another peer with other items is negotiated afresh
    a = associate(node.port)
    assert a.is_established and a.send_c_echo().Status == 0x0000
    a.release()
