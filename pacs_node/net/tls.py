"""DICOM TLS: the ssl contexts of the SCP (server side) and the SCU (client side) from [tls].

BCP 195 asks for TLS 1.2 or later; older versions are refused in both directions. With
``require_client_certificate`` the handshake itself refuses a caller without a certificate
signed by ``ca_certificates``, before any DICOM byte is read, so AE-title checks only ever
see authenticated callers.
"""

from __future__ import annotations

import logging
import ssl
from datetime import datetime, timezone
from pathlib import Path

from ..config import Peer, TlsSettings

log = logging.getLogger(__name__)


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The context the SCP listens with; needs our certificate and key."""
    if tls.certificate is None or tls.private_key is None:
        raise ValueError("a TLS listener needs tls.certificate and tls.private_key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return ctx


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """The context the SCU calls a TLS peer with: verifies it, and shows our certificate if we have one."""
    if tls.ca_certificates is None:
        raise ValueError("calling a peer over TLS needs tls.ca_certificates to verify it")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(tls.ca_certificates))
    ctx.check_hostname = tls.verify_peer_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if tls.certificate is not None and tls.private_key is not None:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return ctx


def context_for_peer(tls: TlsSettings, peer: Peer | None) -> ssl.SSLContext | None:
    """The client context for sending to ``peer``, or None when it is called over plain TCP."""
    if peer is None or not peer.tls:
        return None
    return client_context(tls)


def certificate_not_after(path: Path | str) -> datetime | None:
    """When the (first) certificate of a PEM file expires, UTC; None if it cannot be read."""
    try:
        decoded = ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]  # the stdlib's PEM reader
    except (AttributeError, ssl.SSLError, OSError):
        return None
    return datetime.fromtimestamp(ssl.cert_time_to_seconds(decoded["notAfter"]), tz=timezone.utc)


def warn_if_expiring(tls: TlsSettings, days: float = 30.0) -> None:
    """Log a warning at start when our certificate expires within ``days`` (or has expired)."""
    if tls.certificate is None:
        return
    end = certificate_not_after(tls.certificate)
    if end is None:
        return
    left = (end - datetime.now(timezone.utc)).total_seconds() / 86400
    if left < 0:
        log.error("TLS certificate %s expired on %s: peers will refuse the handshake", tls.certificate,
                  end.strftime("%Y-%m-%d %H:%M UTC"))
    elif left < days:
        log.warning("TLS certificate %s expires on %s, in %.0f day(s): renew it", tls.certificate,
                    end.strftime("%Y-%m-%d %H:%M UTC"), left)
