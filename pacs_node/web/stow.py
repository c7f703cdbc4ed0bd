"""DICOMweb STOW-RS (PS3.18 10.5): instances posted over HTTP join the C-STORE path.

A request is multipart/related; type="application/dicom", one Part 10 file per part. The
caller is a [[peers]] entry identified by its stow_token (Authorization: Bearer), from one
of its allowed_hosts if any are listed. Each instance goes through the same Ingest.store as
a C-STORE (stored exactly as sent, then indexed), and the completion tracker sees the request
as it sees an association: open while the request is read, ended when it is answered.
"""

from __future__ import annotations

import hmac
import io
import itertools
import logging
import time
from dataclasses import dataclass, field

import pydicom
from pydicom.errors import InvalidDicomError

from .. import audit, metrics
from ..config import Peer, Settings
from ..errors import InvalidInstance
from ..store.ingest import OutOfResources

log = logging.getLogger(__name__)

#: a request body larger than this is refused (413) before it is read whole
MAX_REQUEST_BYTES = 1 << 30

#: PS3.18 Table 10.5.3-2 failure reasons
FAILURE_PROCESSING = 0x0110
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_STUDY_MISMATCH = 0xC409  # the instance belongs to another study than the URL names (as dcm4chee reports it)

# Completion keys of STOW requests: negative, so they never equal an association's id().
_request_keys = itertools.count(-1, -1)


class StowRequestError(Exception):
    """The request as a whole cannot be processed (HTTP status and reason)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Part:
    content_type: str
    body: bytes


def boundary_of(content_type: str) -> str:
    """The boundary of a multipart/related; type="application/dicom" content type."""
    main, *params = [p.strip() for p in content_type.split(";")]
    if main.lower() != "multipart/related":
        raise StowRequestError(415, f"Content-Type must be multipart/related, not {main!r}")
    values = {}
    for param in params:
        key, _, value = param.partition("=")
        values[key.strip().lower()] = value.strip().strip('"')
    kind = values.get("type", "application/dicom").lower()
    if kind != "application/dicom":
        raise StowRequestError(415, f"only type=\"application/dicom\" is supported, not {kind!r}")
    if not values.get("boundary"):
        raise StowRequestError(400, "multipart boundary missing in Content-Type")
    return values["boundary"]


def split_parts(body: bytes, boundary: str) -> list[Part]:
    """RFC 2046 multipart body -> parts (headers parsed, content kept as bytes)."""
    delimiter = b"--" + boundary.encode("latin-1")
    pos = body.find(delimiter)
    if pos < 0:
        raise StowRequestError(400, "multipart boundary not found in the body")
    parts: list[Part] = []
    while True:
        pos += len(delimiter)
        if body[pos:pos + 2] == b"--":
            return parts
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            raise StowRequestError(400, "multipart body ends inside a part header")
        start = line_end + 2
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise StowRequestError(400, "multipart body has no closing boundary")
        raw = body[start:end]
        if raw.startswith(b"\r\n"):
            header_block, content = b"", raw[2:]
        else:
            split = raw.find(b"\r\n\r\n")
            if split < 0:
                raise StowRequestError(400, f"part {len(parts) + 1} has no blank line after its headers")
            header_block, content = raw[:split], raw[split + 4:]
        content_type = "application/dicom"
        for line in header_block.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                content_type = value.strip().split(";")[0].lower()
        parts.append(Part(content_type, content))
        pos = end + 2


def peer_for_token(settings: Settings, authorization: str | None) -> Peer | None:
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    token = authorization[7:].strip().encode()
    found = None
    for peer in settings.peers:
        # compare with every peer's token, so timing does not tell which one was close
        if peer.stow_token and hmac.compare_digest(token, peer.stow_token.encode()):
            found = peer
    return found


@dataclass
class StowResult:
    stored: list[tuple[str, str]] = field(default_factory=list)  # (SOP Class, SOP Instance)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # (SOP Class, SOP Instance, reason)
    series: set[str] = field(default_factory=set)

    @property
    def http_status(self) -> int:
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def response(self, base_url: str) -> dict:
        """The PS3.18 response as application/dicom+json."""
        body: dict = {}
        if self.stored:
            body["00081199"] = {"vr": "SQ", "Value": [
                {"00081150": {"vr": "UI", "Value": [cls]}, "00081155": {"vr": "UI", "Value": [uid]}}
                for cls, uid in self.stored]}
        if self.failed:
            body["00081198"] = {"vr": "SQ", "Value": [
                {"00081150": {"vr": "UI", "Value": [cls]}, "00081155": {"vr": "UI", "Value": [uid]},
                 "00081197": {"vr": "US", "Value": [reason]}}
                for cls, uid, reason in self.failed]}
        if base_url:
            body["00081190"] = {"vr": "UR", "Value": [base_url]}
        return body


def _check_dataset(ds: pydicom.Dataset, transfer_syntax: str) -> None:
    """The same checks the SCP makes before storing (every element readable, pixel data long enough)."""
    for _ in ds.iterall():
        pass
    try:
        from ..net.scp import check_pixel_data
    except ImportError:  # an SCP without the check: the store's own UID checks still apply
        return
    check_pixel_data(ds, transfer_syntax)


def store_parts(node, peer: Peer, address: str, parts: list[Part], study_uid: str | None) -> StowResult:  # type: ignore[no-untyped-def]
    """Store every part through the node's Ingest, as one 'association' for completion."""
    key = next(_request_keys)
    result = StowResult()
    started = time.monotonic()
    size = 0
    try:
        for part in parts:
            t0 = time.monotonic()
            sop_class, sop_uid = "", ""
            try:
                if part.content_type not in ("application/dicom", "application/octet-stream"):
                    raise InvalidInstance(f"part type {part.content_type!r} is not application/dicom")
                ds = pydicom.dcmread(io.BytesIO(part.body))
                sop_class = str(ds.get("SOPClassUID", "") or "")
                sop_uid = str(ds.get("SOPInstanceUID", "") or "")
                meta = getattr(ds, "file_meta", None)
                transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
                if not transfer_syntax:
                    raise InvalidInstance("not a DICOM Part 10 file (no TransferSyntaxUID in its File Meta)")
                if study_uid and str(ds.get("StudyInstanceUID", "")) != study_uid:
                    result.failed.append((sop_class, sop_uid, FAILURE_STUDY_MISMATCH))
                    metrics.instances_refused.labels("stow").inc()
                    continue
                _check_dataset(ds, transfer_syntax)
                stored = node.ingest.store(ds, part.body, peer.ae_title, transfer_syntax)
            except (InvalidInstance, InvalidDicomError) as exc:
                log.warning("STOW-RS from %s refused an instance: %s", peer.ae_title, exc)
                result.failed.append((sop_class, sop_uid, FAILURE_CANNOT_UNDERSTAND))
                metrics.instances_refused.labels("stow").inc()
                continue
            except OutOfResources as exc:
                log.error("STOW-RS from %s refused an instance: %s", peer.ae_title, exc)
                result.failed.append((sop_class, sop_uid, FAILURE_OUT_OF_RESOURCES))
                metrics.instances_refused.labels("stow").inc()
                continue
            except Exception as exc:  # noqa: BLE001 - a bad part fails alone, as a bad C-STORE does
                log.warning("STOW-RS from %s refused an instance: cannot read or store it (%s)", peer.ae_title,
                            type(exc).__name__)
                log.debug("STOW-RS failure detail", exc_info=True)
                result.failed.append((sop_class, sop_uid, FAILURE_PROCESSING))
                metrics.instances_refused.labels("stow").inc()
                continue
            size += len(part.body)
            result.stored.append((sop_class, stored.sop_uid))
            result.series.add(stored.series_uid)
            metrics.instance_received("stow", len(part.body), t0)
            node.tracker.instance_received(key, stored.series_uid)
    finally:
        node.tracker.association_ended(key)
    elapsed = time.monotonic() - started
    log.info("STOW-RS from %s@%s: %d instance(s) stored, %d failed, %.1f MB in %.2f s, %d series", peer.ae_title,
             address, len(result.stored), len(result.failed), size / 1e6, elapsed, len(result.series))
    audit.record(node.db, "instances-received", calling_ae=peer.ae_title[:16], called_ae=node.settings.node.ae_title,
                 address=address, count=len(result.stored), seconds=elapsed,
                 detail=f"stow-rs; failed={len(result.failed)}; series={','.join(sorted(result.series))}"[:2000])
    return result
