"""Store received instances: checked UIDs, atomic file writes, index rows.

Two ways in. ``Ingest.store`` writes and indexes one instance before it returns (STOW-RS and
tools). The DIMSE receive path (``net.scp``) writes the file itself, acknowledges once the
file is durable, and leaves the index rows to ``IndexWriter`` (``store/indexer.py``), which
indexes many instances per transaction off the association's thread. Both end in
``Ingest.index``: one transaction for any number of instances.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
from dataclasses import dataclass

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from sqlalchemy import case, insert, select, update
from sqlalchemy.orm import Session

from ..errors import InvalidInstance
from .files import FileStore, check_uid
from .index import Database, Instance, Patient, Series, Study, patient_key, utcnow

log = logging.getLogger(__name__)


class OutOfResources(Exception):
    """Disk full or similar: the instance was not stored (DICOM status 0xA700)."""


def _uid_value(ds: Dataset, tag: int, keyword: str) -> object:
    """A UID element's value as check_uid takes it: straight from the received bytes while
    the element is still raw and encoded as UI (pydicom's conversion adds a regular-expression
    check per value that check_uid repeats more strictly), else pydicom's value."""
    elem = ds.get_item(tag, keep_deferred=True)
    if isinstance(elem, RawDataElement) and elem.VR in (None, "UI") and elem.value is not None:
        return elem.value.decode("latin-1")
    return ds.get(keyword)


@dataclass(frozen=True)
class Stored:
    sop_uid: str
    series_uid: str
    study_uid: str
    replaced: bool


@dataclass(frozen=True)
class Entry:
    """What the index needs to know of one stored instance (no patient name or ID: a key)."""

    pkey: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    transfer_syntax: str
    rel: str
    size: int
    modality: str
    calling_ae: str
    expected: int | None
    received_at: dt.datetime


def out_of_resources(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE, errno.ENFILE)


class Ingest:
    def __init__(self, db: Database, files: FileStore, use_images_in_acquisition: bool = True,
                 receiver: str | None = None) -> None:
        self.db = db
        self.receiver = receiver
        self.files = files
        self.use_images_in_acquisition = use_images_in_acquisition

    def entry(self, ds: Dataset, size: int, calling_ae: str, transfer_syntax: str,
              affected_sop_uid: str | None = None) -> Entry:
        """The index entry of a dataset; raise InvalidInstance for UIDs that cannot name a file."""
        sop_uid = check_uid(_uid_value(ds, 0x00080018, "SOPInstanceUID"), "SOPInstanceUID")
        series_uid = check_uid(_uid_value(ds, 0x0020000E, "SeriesInstanceUID"), "SeriesInstanceUID")
        study_uid = check_uid(_uid_value(ds, 0x0020000D, "StudyInstanceUID"), "StudyInstanceUID")
        sop_class = check_uid(_uid_value(ds, 0x00080016, "SOPClassUID"), "SOPClassUID")
        if affected_sop_uid and affected_sop_uid != sop_uid:
            raise InvalidInstance("SOPInstanceUID in the dataset differs from the request's Affected SOP Instance UID")
        expected = None
        if self.use_images_in_acquisition:
            try:
                value = int(ds.get("ImagesInAcquisition") or 0)
                expected = value if value > 0 else None
            except (TypeError, ValueError):
                expected = None
        rel = self.files.relative(self.files.instance_path(study_uid, series_uid, sop_uid))
        return Entry(patient_key(str(ds.get("PatientID", "") or ""), str(ds.get("IssuerOfPatientID", "") or "")),
                     study_uid, series_uid, sop_uid, sop_class, transfer_syntax, rel, size,
                     str(ds.get("Modality", "") or "")[:16], calling_ae, expected, utcnow())

    def store(self, ds: Dataset, encoded: bytes, calling_ae: str, transfer_syntax: str,
              affected_sop_uid: str | None = None) -> Stored:
        """Write and index ``encoded`` (the whole DICOM file); raise InvalidInstance or OutOfResources."""
        entry = self.entry(ds, len(encoded), calling_ae, transfer_syntax, affected_sop_uid)
        tmp = None
        try:  # as the DIMSE path does: a synced temp file, renamed into place (FileStore.place)
            tmp = self.files.write_temp((encoded,))
            self.files.place(tmp, entry.rel)
            tmp = None
        except OSError as exc:
            if out_of_resources(exc):
                raise OutOfResources(f"cannot write instance: {exc.strerror}") from exc
            raise
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        previous = self.index([entry])[0]
        return Stored(entry.sop_uid, entry.series_uid, entry.study_uid, previous is not None)

    def index(self, entries: list[Entry]) -> list[str | None]:
        """Index ``entries`` in one transaction; return, per entry, the path its SOP Instance
        UID had before (None if new). Files the index no longer points at are removed after
        the commit."""
        result: list[tuple[list[str | None], list[str]]] = []

        def run(session: Session) -> None:
            result[:] = [self._index(session, entries)]

        self.db.run(run, retry_conflicts=True)
        previous, orphans = result[0]
        for rel in orphans:
            # the SOP Instance UID came back under another study/series: the index points at
            # the new file, so the old one is an orphan (removed only after the commit)
            self.files.absolute(rel).unlink(missing_ok=True)
        return previous

    @staticmethod
    def _id_of(session: Session, table, where, **values) -> int:  # type: ignore[no-untyped-def]
        found = session.execute(select(table.c.id).where(where)).scalar_one_or_none()
        if found is None:
            found = session.execute(insert(table).values(**values)).inserted_primary_key[0]
        return int(found)

    def _index(self, session: Session, entries: list[Entry]) -> tuple[list[str | None], list[str]]:
        """Index a batch: a few statements per series, one multi-row insert for the new instances.

        SQLAlchemy Core, not the ORM: this runs for every received instance, and the ORM's unit
        of work cost more than the SQL itself (docs/performance.md).
        """
        series_t, instance_t = Series.__table__, Instance.__table__
        # row locks (PostgreSQL): concurrent receivers of one series must not lose count
        # updates; SQLite transactions are serialized already (BEGIN IMMEDIATE)
        series_uids = sorted({e.series_uid for e in entries})
        rows = {r.series_uid: r for r in session.execute(
            select(series_t.c.id, series_t.c.state, series_t.c.series_uid, series_t.c.purge_cutoff)
            .where(series_t.c.series_uid.in_(series_uids)).with_for_update())}
        # a file written before its series' retention cutoff is one retention removes (found
        # again by index_missing_files while the removal runs, or left by a stop): never indexed
        # again; a received instance is always newer (received_at = now)
        keep = [not (row := rows.get(e.series_uid)) or row.purge_cutoff is None or e.received_at >= row.purge_cutoff
                for e in entries]
        if not all(keep):
            log.warning("not indexed: %d file(s) written before their series' retention cutoff (being removed)",
                        keep.count(False))
            kept_previous, kept_orphans = self._index(session, [e for e, k in zip(entries, keep) if k]) \
                if any(keep) else ([], [])
            it = iter(kept_previous)
            return [next(it) if k else None for k in keep], kept_orphans
        series_ids: dict[str, int] = {}
        changes: dict[str, dict] = {}
        for e in entries:
            if e.series_uid in series_ids:
                continue
            row = rows.get(e.series_uid)
            if row is None:
                patient_id = self._id_of(session, Patient.__table__, Patient.__table__.c.key == e.pkey, key=e.pkey)
                study_id = self._id_of(session, Study.__table__, Study.__table__.c.study_uid == e.study_uid,
                                       study_uid=e.study_uid, patient_id=patient_id)
                series_ids[e.series_uid] = int(session.execute(insert(series_t).values(
                    series_uid=e.series_uid, study_id=study_id, modality=e.modality, calling_ae=e.calling_ae,
                    state="receiving", generation=1, instance_count=0, first_received_at=e.received_at,
                    last_received_at=e.received_at, receiver=self.receiver)).inserted_primary_key[0])
                changes[e.series_uid] = {}
            else:
                series_ids[e.series_uid] = int(row.id)
                changes[e.series_uid] = {}
                if row.state != "receiving":
                    # A late or re-sent instance reopens a completed series; its jobs run again and,
                    # with deterministic result UIDs, replace the earlier results at the destination.
                    changes[e.series_uid].update(state="receiving", generation=series_t.c.generation + 1,
                                                 first_received_at=e.received_at, completed_at=None,
                                                 completed_by=None)
        # row locks (PostgreSQL) here too: retention deletes a purged series' instance rows, and
        # an instance moving to another series must not be updated after its row is gone
        found = {r.sop_uid: r for r in session.execute(
            select(instance_t.c.id, instance_t.c.series_id, instance_t.c.path, instance_t.c.sop_uid)
            .where(instance_t.c.sop_uid.in_(sorted({e.sop_uid for e in entries}))).with_for_update())}
        previous: list[str | None] = []
        orphans: list[str] = []
        last: dict[str, Entry] = {}  # an SOP Instance UID twice in one batch: the later one wins
        for e in entries:
            earlier = last.get(e.sop_uid)
            if earlier is not None:
                previous.append(earlier.rel)
                if earlier.rel != e.rel:
                    orphans.append(earlier.rel)
            else:
                row = found.get(e.sop_uid)
                previous.append(row.path if row is not None else None)
                if row is not None and row.path != e.rel:
                    orphans.append(row.path)
            last[e.sop_uid] = e
        delta: dict[int, int] = {}  # instance count change per series id
        new_rows = []
        for e in last.values():
            series_id = series_ids[e.series_uid]
            values = dict(series_id=series_id, sop_class_uid=e.sop_class, transfer_syntax=e.transfer_syntax,
                          path=e.rel, size=e.size, received_at=e.received_at)
            row = found.get(e.sop_uid)
            if row is None:
                new_rows.append(dict(sop_uid=e.sop_uid, **values))
                delta[series_id] = delta.get(series_id, 0) + 1
            else:
                if row.series_id != series_id:  # it moves: one fewer in the series it was in
                    delta[row.series_id] = delta.get(row.series_id, 0) - 1
                    delta[series_id] = delta.get(series_id, 0) + 1
                session.execute(update(instance_t).where(instance_t.c.id == row.id).values(**values))
        if new_rows:
            session.execute(insert(instance_t), new_rows)
        count = series_t.c.instance_count
        by_series: dict[str, list[Entry]] = {}
        for e in entries:
            by_series.setdefault(e.series_uid, []).append(e)
        for series_uid, series_id in series_ids.items():
            mine = by_series[series_uid]
            latest = max(mine, key=lambda e: e.received_at)
            change = dict(changes[series_uid], last_received_at=latest.received_at, calling_ae=latest.calling_ae,
                          receiver=self.receiver)
            expected = [e.expected for e in mine if e.expected]
            if expected:
                change["expected_count"] = expected[-1]
            d = delta.pop(series_id, 0)
            if d:
                change["instance_count"] = case((count + d > 0, count + d), else_=0)
            session.execute(update(series_t).where(series_t.c.id == series_id).values(**change))
        for series_id, d in delta.items():  # series that only lost instances to another one
            if d:
                session.execute(update(series_t).where(series_t.c.id == series_id).values(
                    instance_count=case((count + d > 0, count + d), else_=0)))
        return previous, orphans
