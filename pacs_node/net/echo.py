"""C-ECHO: the web console's button and `pacs-node check` (peers, and who holds the node's port)."""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass

from ..config import Peer, Settings


@dataclass(frozen=True)
class EchoOutcome:
    ok: bool
    #: what happened, naming AE title, host and port
    message: str
    #: the called application refused the association (A-ASSOCIATE-RJ)
    rejected: bool = False
    #: the Implementation Version Name in its A-ASSOCIATE-AC ('' without an association)
    implementation: str = ""


def echo(host: str, port: int, called_ae: str, calling_ae: str, timeout: float,
         tls_context: ssl.SSLContext | None = None, server_hostname: str | None = None) -> EchoOutcome:
    """One association with a C-ECHO; never raises for a host that is down, refuses, is slow
    (``timeout`` bounds the connect and each exchange) or answers with a failure status."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    from .. import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

    where = f"C-ECHO {called_ae}@{host}:{port}"
    ae = AE(ae_title=calling_ae)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    tls_args = (tls_context, server_hostname or host) if tls_context is not None else None
    connected: list[bool] = []
    t0 = time.perf_counter()
    try:
        assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args,
                             evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(True))])
    except OSError as exc:
        return EchoOutcome(False, f"{where}: {exc.strerror or exc}")
    if not assoc.is_established:
        if assoc.is_rejected:
            return EchoOutcome(False, f"{where}: association failed (rejected)", rejected=True)
        if connected:
            why = "aborted" if time.perf_counter() - t0 < 0.9 * timeout else f"no answer within {timeout:g} s"
            return EchoOutcome(False, f"{where}: connected, association failed ({why})")
        if time.perf_counter() - t0 >= 0.9 * timeout:
            return EchoOutcome(False, f"{where}: cannot connect: no answer within {timeout:g} s")
        # pynetdicom reports a refused or unreachable host as an aborted association too: say which
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            return EchoOutcome(False, f"{where}: cannot connect: {exc.strerror or exc}")
        return EchoOutcome(False, f"{where}: association failed ({'aborted' if assoc.is_aborted else 'no answer'})")
    implementation = str(assoc.acceptor.implementation_version_name or "")
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    ms = (time.perf_counter() - t0) * 1000
    code = int(status.Status) if status and "Status" in status else None
    if code == 0:
        return EchoOutcome(True, f"{where}: success in {ms:.0f} ms", implementation=implementation)
    return EchoOutcome(False, f"{where}: status {code if code is None else hex(code)}", implementation=implementation)


def echo_peer(settings: Settings, peer: Peer, timeout: float | None = None) -> tuple[bool, str]:
    """C-ECHO ``peer`` as this node's AE title (over TLS when it is a TLS peer): (success, what happened)."""
    if not peer.host or not peer.port:
        return False, f"peer {peer.name} has no host and port to call"
    context = None
    if peer.tls:
        from .tls import context_for_peer

        try:
            context = context_for_peer(settings.tls, peer)
        except (ssl.SSLError, OSError, ValueError) as exc:
            return False, f"C-ECHO {peer.ae_title}@{peer.host}:{peer.port}: TLS settings unusable: {exc}"
    outcome = echo(peer.host, peer.port, peer.ae_title, settings.node.ae_title,
                   timeout if timeout is not None else min(settings.send.timeout_seconds, 10.0), context)
    return outcome.ok, outcome.message
