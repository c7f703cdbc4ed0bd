"""Store one received instance: checked UIDs, atomic file write, index rows, in that order."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from pydicom.dataset import Dataset
from sqlalchemy import select
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
    def _get_or_create(session: Session, model, where, **values):  # type: ignore[no-untyped-def]
        row = session.execute(select(model).where(where)).scalar_one_or_none()
        if row is None:
            row = model(**values)
            session.add(row)
            session.flush()
        return row

    def _index(self, session: Session, pkey: str, study_uid: str, series_uid: str, sop_uid: str, sop_class: str,
               transfer_syntax: str, rel: str, size: int, modality: str, calling_ae: str,
               expected: int | None) -> str | None:
        """Index the instance; return the path it had before when it was already indexed."""
        now = utcnow()
        patient = self._get_or_create(session, Patient, Patient.key == pkey, key=pkey)
        study = self._get_or_create(session, Study, Study.study_uid == study_uid, study_uid=study_uid, patient_id=patient.id)
        # row lock (PostgreSQL): concurrent associations of one series must not lose count
        # updates; SQLite transactions are serialized already (BEGIN IMMEDIATE)
        series = session.execute(
            select(Series).where(Series.series_uid == series_uid).with_for_update()).scalar_one_or_none()
        if series is None:
            series = Series(series_uid=series_uid, study_id=study.id, modality=modality, calling_ae=calling_ae,
                            state="receiving", generation=1, instance_count=0, first_received_at=now,
                            last_received_at=now)
            session.add(series)
            session.flush()
        elif series.state != "receiving":
            # A late or re-sent instance reopens a completed series; its jobs run again and,
            # with deterministic result UIDs, replace the earlier results at the destination.
            series.state = "receiving"
            series.generation += 1
            series.first_received_at = now
            series.completed_at = None
            series.completed_by = None
        series.last_received_at = now
        series.calling_ae = calling_ae
        series.receiver = self.receiver
        if expected:
            series.expected_count = expected
        instance = session.execute(select(Instance).where(Instance.sop_uid == sop_uid)).scalar_one_or_none()
        previous = instance.path if instance is not None else None
        if instance is None:
            session.add(Instance(sop_uid=sop_uid, series_id=series.id, sop_class_uid=sop_class,
                                 transfer_syntax=transfer_syntax, path=rel, size=size, received_at=now))
            series.instance_count += 1
        else:
            if instance.series_id != series.id:
                old = session.get(Series, instance.series_id)
                if old is not None:
                    old.instance_count = max(0, old.instance_count - 1)
                series.instance_count += 1
            instance.series_id = series.id
            instance.sop_class_uid = sop_class
            instance.transfer_syntax = transfer_syntax
            instance.path = rel
            instance.size = size
            instance.received_at = now
        return previous
