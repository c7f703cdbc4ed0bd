"""C-ECHO a configured peer: used by the web console's button and by `pacs-node check`."""

from __future__ import annotations

import socket
import time

from ..config import Peer, Settings


def echo_peer(settings: Settings, peer: Peer, timeout: float | None = None) -> tuple[bool, str]:
    """C-ECHO ``peer`` as this node's AE title (over TLS when it is a TLS peer).

    Returns (success, what happened), the message naming AE title, host and port; never raises
    for a peer that is down, refuses or answers with a failure status.
    """
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    where = f"C-ECHO {peer.ae_title}@{peer.host}:{peer.port}"
    if not peer.host or not peer.port:
        return False, f"peer {peer.name} has no host and port to call"
    ae = AE(ae_title=settings.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = (
        timeout if timeout is not None else min(settings.send.timeout_seconds, 10.0))
    ae.add_requested_context(Verification)
    tls_args = None
    if peer.tls:
        from .tls import context_for_peer

        context = context_for_peer(settings.tls, peer)
        tls_args = (context, peer.host) if context is not None else None
    t0 = time.perf_counter()
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    except OSError as exc:
        return False, f"{where}: {exc.strerror or exc}"
    if not assoc.is_established:
        if assoc.is_rejected:
            return False, f"{where}: association failed (rejected)"
        # pynetdicom reports a refused or unreachable host as an aborted association too: say which
        try:
            socket.create_connection((peer.host, peer.port), timeout=ae.acse_timeout).close()
        except OSError as exc:
            return False, f"{where}: cannot connect: {exc.strerror or exc}"
        return False, f"{where}: association failed ({'aborted' if assoc.is_aborted else 'no answer'})"
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    ms = (time.perf_counter() - t0) * 1000
    code = int(status.Status) if status and "Status" in status else None
    if code == 0:
        return True, f"{where}: success in {ms:.0f} ms"
    return False, f"{where}: status {code if code is None else hex(code)}"
