"""Store one received instance: checked UIDs, atomic file write, index rows, in that order."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from pydicom.dataset import Dataset
from sqlalchemy import case, insert, select, update
from sqlalchemy.orm import Session

from ..errors import InvalidInstance
from .files import FileStore, check_uid, write_atomic
from .index import Database, Instance, Patient, Series, Study, patient_key, utcnow

log = logging.getLogger(__name__)


class OutOfResources(Exception):
    """Disk full or similar: the instance was not stored (DICOM status 0xA700)."""


@dataclass(frozen=True)
class Stored:
    sop_uid: str
    series_uid: str
    study_uid: str
    replaced: bool


class Ingest:
    def __init__(self, db: Database, files: FileStore, use_images_in_acquisition: bool = True,
                 receiver: str | None = None) -> None:
        self.db = db
        self.receiver = receiver
        self.files = files
        self.use_images_in_acquisition = use_images_in_acquisition

    def store(self, ds: Dataset, encoded: bytes, calling_ae: str, transfer_syntax: str,
              affected_sop_uid: str | None = None) -> Stored:
        """Write and index ``encoded`` (the whole DICOM file); raise InvalidInstance or OutOfResources."""
        sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
        series_uid = check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
        study_uid = check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
        sop_class = check_uid(ds.get("SOPClassUID"), "SOPClassUID")
        if affected_sop_uid and affected_sop_uid != sop_uid:
            raise InvalidInstance("SOPInstanceUID in the dataset differs from the request's Affected SOP Instance UID")
        path = self.files.instance_path(study_uid, series_uid, sop_uid)
        try:
            write_atomic(path, encoded)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE):
                raise OutOfResources(f"cannot write instance: {exc.strerror}") from exc
            raise
        modality = str(ds.get("Modality", "") or "")[:16]
        pkey = patient_key(str(ds.get("PatientID", "") or ""), str(ds.get("IssuerOfPatientID", "") or ""))
        expected = None
        if self.use_images_in_acquisition:
            try:
                value = int(ds.get("ImagesInAcquisition") or 0)
                expected = value if value > 0 else None
            except (TypeError, ValueError):
                expected = None
        rel = self.files.relative(path)

        def index(session: Session) -> str | None:
            return self._index(session, pkey, study_uid, series_uid, sop_uid, sop_class, transfer_syntax,
                               rel, len(encoded), modality, calling_ae, expected)

        previous = self.db.run(index, retry_conflicts=True)
        if previous is not None and previous != rel:
            # the SOP Instance UID came back under another study/series: the index now points
            # at the new file, so the old one is an orphan (removed only after the commit)
            self.files.absolute(previous).unlink(missing_ok=True)
        return Stored(sop_uid, series_uid, study_uid, previous is not None)

    @staticmethod
    def _id_of(session: Session, table, where, **values) -> int:  # type: ignore[no-untyped-def]
        found = session.execute(select(table.c.id).where(where)).scalar_one_or_none()
        if found is None:
            found = session.execute(insert(table).values(**values)).inserted_primary_key[0]
        return int(found)

    def _index(self, session: Session, pkey: str, study_uid: str, series_uid: str, sop_uid: str, sop_class: str,
               transfer_syntax: str, rel: str, size: int, modality: str, calling_ae: str,
               expected: int | None) -> str | None:
        """Index the instance; return the path it had before when it was already indexed.

        SQLAlchemy Core, not the ORM: this runs once per received instance, and the ORM's unit
        of work cost more than the SQL itself (docs/performance.md).
        """
        now = utcnow()
        series_t, instance_t = Series.__table__, Instance.__table__
        # row lock (PostgreSQL): concurrent associations of one series must not lose count
        # updates; SQLite transactions are serialized already (BEGIN IMMEDIATE)
        row = session.execute(select(series_t.c.id, series_t.c.state).where(series_t.c.series_uid == series_uid)
                              .with_for_update()).first()
        changes: dict = {"last_received_at": now, "calling_ae": calling_ae, "receiver": self.receiver}
        if row is None:
            patient_id = self._id_of(session, Patient.__table__, Patient.__table__.c.key == pkey, key=pkey)
            study_id = self._id_of(session, Study.__table__, Study.__table__.c.study_uid == study_uid,
                                   study_uid=study_uid, patient_id=patient_id)
            series_id = int(session.execute(insert(series_t).values(
                series_uid=series_uid, study_id=study_id, modality=modality, calling_ae=calling_ae, state="receiving",
                generation=1, instance_count=0, first_received_at=now, last_received_at=now,
                receiver=self.receiver)).inserted_primary_key[0])
        else:
            series_id = int(row.id)
            if row.state != "receiving":
                # A late or re-sent instance reopens a completed series; its jobs run again and,
                # with deterministic result UIDs, replace the earlier results at the destination.
                changes.update(state="receiving", generation=series_t.c.generation + 1, first_received_at=now,
                               completed_at=None, completed_by=None)
        if expected:
            changes["expected_count"] = expected
        found = session.execute(select(instance_t.c.id, instance_t.c.series_id, instance_t.c.path)
                                .where(instance_t.c.sop_uid == sop_uid)).first()
        previous = found.path if found is not None else None
        values = dict(series_id=series_id, sop_class_uid=sop_class, transfer_syntax=transfer_syntax, path=rel,
                      size=size, received_at=now)
        if found is None:
            session.execute(insert(instance_t).values(sop_uid=sop_uid, **values))
        else:
            if found.series_id != series_id:  # it moves: one fewer in the series it was in
                count = series_t.c.instance_count
                session.execute(update(series_t).where(series_t.c.id == found.series_id).values(
                    instance_count=case((count > 0, count - 1), else_=0)))
            session.execute(update(instance_t).where(instance_t.c.id == found.id).values(**values))
        if found is None or found.series_id != series_id:
            changes["instance_count"] = series_t.c.instance_count + 1
        session.execute(update(series_t).where(series_t.c.id == series_id).values(**changes))
        return previous
