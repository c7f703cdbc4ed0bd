"""C-STORE sender: one association per destination and job, a status for every instance."""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt

log = logging.getLogger(__name__)


class SendError(Exception):
    """The association could not be made or broke: nothing more can be sent on it."""


@dataclass
class SendReport:
    ok: list[Path] = field(default_factory=list)
    #: (file, status as 0xXXXX text)
    rejected: list[tuple[Path, str]] = field(default_factory=list)


def set_nodelay(event) -> None:  # type: ignore[no-untyped-def]
    """EVT_CONN_OPEN handler: disable Nagle (else ~40 ms per instance with delayed ACKs).

    Also shortens pynetdicom's reactor poll (1 ms by default) for this short, busy association:
    each C-STORE waits on it twice. Measured here: 222-229 -> 262-284 instances/s to storescp,
    same CPU time.
    """
    if hasattr(event.assoc.dul, "_run_loop_delay"):
        event.assoc.dul._run_loop_delay = 0.0001
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def send_files(files: list[Path], calling_ae: str, called_ae: str, host: str, port: int,
               timeout: float = 30.0, tls: ssl.SSLContext | None = None) -> SendReport:
    """Send ``files`` in one association (over TLS with ``tls``); raise SendError if it cannot be made or is lost."""
    metas = []
    for path in files:
        meta = read_file_meta_info(path)
        metas.append((path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    pairs = sorted({(sop_class, ts) for _, sop_class, ts in metas})
    contexts = []
    for sop_class, ts in pairs:
        syntaxes = [ts] + [t for t in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if t != ts]
        contexts.append(build_context(sop_class, syntaxes))
    if len(contexts) > 128:
        raise SendError(f"{len(contexts)} presentation contexts needed, at most 128 per association")
    ae.requested_contexts = contexts
    assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
                         tls_args=(tls, host) if tls is not None else None)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no connection"
        raise SendError(f"association to {called_ae}@{host}:{port} failed ({reason})")
    report = SendReport()
    try:
        for path, _, _ in metas:
            status = assoc.send_c_store(path)
            if not assoc.is_established and not status:
                raise SendError(f"association to {called_ae}@{host}:{port} lost while sending")
            code = int(status.Status) if status and "Status" in status else None
            if code is None:
                raise SendError(f"no response from {called_ae}@{host}:{port} (timeout or abort)")
            # 0xB000, 0xB007, 0xB006 are warnings: the instance was stored.
            if code == 0x0000 or (code & 0xF000) == 0xB000:
                report.ok.append(path)
            else:
                report.rejected.append((path, f"0x{code:04X}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return report
