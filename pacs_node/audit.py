"""Audit trail: who sent what, what ran, what went where. AE titles and UIDs, never patient data."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from .store.index import AuditEvent, Database

log = logging.getLogger("pacs_node.audit")


def record(db: Database, event: str, **fields: object) -> None:
    """Append an audit event; a failure to audit is logged, never raised into the DICOM path."""
    try:
        db.run(lambda s: s.add(AuditEvent(event=event, **fields)))
    except Exception:  # noqa: BLE001
        log.exception("could not write audit event %s", event)


def add(session: Session, event: str, **fields: object) -> None:
    """Add an audit event to a transaction already open (it commits or rolls back with it)."""
    session.add(AuditEvent(event=event, **fields))
