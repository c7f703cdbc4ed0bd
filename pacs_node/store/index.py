"""The index: patients, studies, series, instances, jobs, deliveries and audit events (SQLAlchemy 2).

No patient name or ID is stored: a patient row holds only a salted hash of the patient ID,
enough to group studies.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from pathlib import Path
from typing import Callable, TypeVar

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

log = logging.getLogger(__name__)

T = TypeVar("T")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def utc_timestamp(when: dt.datetime) -> float:
    """A naive UTC datetime of the index (utcnow) as seconds since the epoch, as file mtimes are."""
    return when.replace(tzinfo=dt.timezone.utc).timestamp()


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patient"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)


class Study(Base):
    __tablename__ = "study"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patient.id"))


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"))
    modality: Mapped[str] = mapped_column(String(16), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    #: the receiver process that last stored an instance (only it knows whether the
    #: association is still open; others complete the series only after a grace period)
    receiver: Mapped[str | None] = mapped_column(String(128), nullable=True)
    #: receiving -> complete (-> purging -> purged, retention); a late instance reopens the series (generation + 1)
    state: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    expected_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    completed_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    #: retention (pacs_node/retention.py): files older than this were deleted, or are being
    #: (state purging); set when a purge begins and kept when the series is sent again
    purge_cutoff: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Instance(Base):
    __tablename__ = "instance"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(400))
    size: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    __tablename__ = "job"
    __table_args__ = (UniqueConstraint("series_id", "rule", "generation", name="uq_job_series_rule_generation"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    rule: Mapped[str] = mapped_column(String(64))
    pipeline: Mapped[str] = mapped_column(String(64), index=True)
    #: peer names or 'sender', comma-separated, fixed when the job is made
    destinations: Mapped[str] = mapped_column(Text, default="")
    #: rule params and output kinds as JSON, fixed when the job is made
    params: Mapped[str] = mapped_column(Text, default="{}")
    outputs: Mapped[str] = mapped_column(Text, default="")
    #: 0 stat, 1 routine, 2 research: lower runs first
    priority: Mapped[int] = mapped_column(Integer, default=1)
    #: queued -> running -> sending -> done | failed
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    encoded_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: last instance received when the series completed; the start of the latency clock
    last_instance_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    series_completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    result_count: Mapped[int] = mapped_column(Integer, default=0)
    #: folder of the encoded results, relative to storage_dir (one per attempt, so a worker
    #: that lost its lease can never mix its files into another worker's results)
    result_path: Mapped[str | None] = mapped_column(String(400), nullable=True)
    #: stage durations in seconds, "load=0.31 model=7.02 encode=0.40"
    timings: Mapped[str] = mapped_column(Text, default="")


class Delivery(Base):
    __tablename__ = "delivery"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    ae_title: Mapped[str] = mapped_column(String(16), default="")
    host: Mapped[str] = mapped_column(String(255), default="")
    port: Mapped[int] = mapped_column(Integer, default=0)
    #: pending -> sending -> done | failed
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    sent_count: Mapped[int] = mapped_column(Integer, default=0)
    failed_count: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class AuditEvent(Base):
    __tablename__ = "audit_event"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(32))
    calling_ae: Mapped[str | None] = mapped_column(String(16), nullable=True)
    called_ae: Mapped[str | None] = mapped_column(String(16), nullable=True)
    address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    study_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    series_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")


def patient_key(patient_id: str, issuer: str = "") -> str:
    """A stable, non-reversible key for grouping a patient's studies (no ID stored)."""
    return hashlib.sha256(f"pacs-node|{issuer}|{patient_id}".encode()).hexdigest()


def _ensure_sqlite_folder(url: str) -> None:
    if url.startswith("sqlite"):
        path = url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)


def connect_args(url: str) -> dict:
    """Driver options: PostgreSQL over libpq (psycopg) gives up connecting after 10 s (libpq waits
    as long as the operating system does, minutes, for a host that drops packets), unless the URL
    sets its own ``connect_timeout``."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    libpq = parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("psycopg", "psycopg2")
    return {"connect_timeout": 10} if libpq and "connect_timeout" not in parsed.query else {}


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        _ensure_sqlite_folder(url)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=20, max_overflow=20)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # Let SQLAlchemy's "begin" below open transactions itself (pysqlite would defer them).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row survives power loss, since an acknowledged instance must.
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn) -> None:  # type: ignore[no-untyped-def]
            # Take the write lock up front: a deferred transaction that reads, then writes,
            # fails with "database is locked" at once when another writer got in between,
            # whereas BEGIN IMMEDIATE waits for busy_timeout.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=20, connect_args=connect_args(url))


def alembic_config(url: str | None = None):  # type: ignore[no-untyped-def]
    """The Alembic configuration of this schema's migrations (for ``url`` when given)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str) -> None:
    """Bring the schema to the latest Alembic revision (creates it on a new database)."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")


class Database:
    """Engine + session factory, with retry of transactions the database reports as busy."""

    def __init__(self, url: str, run_migrations: bool = True) -> None:
        self.url = url
        _ensure_sqlite_folder(url)
        if run_migrations:
            migrate(url)
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def ping(self) -> None:
        """``SELECT 1`` on a plain DBAPI connection (raises when the database does not answer):
        no transaction, so on SQLite no BEGIN IMMEDIATE and no wait for the write lock."""
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("SELECT 1")
            cursor.fetchall()
            cursor.close()
        finally:
            raw.close()

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    def session(self) -> Session:
        return self.sessions()

    def run(self, fn: Callable[[Session], T], attempts: int = 8, retry_conflicts: bool = False) -> T:
        """Run ``fn`` in a transaction; retry when the database is locked or busy.

        ``retry_conflicts``: also retry a unique-key violation, which is how two concurrent
        inserts of the same row (two associations delivering one series) meet on PostgreSQL;
        on the retry the row exists and ``fn`` takes the update path.
        """
        delay = 0.05
        for attempt in range(1, attempts + 1):
            try:
                with self.sessions.begin() as session:
                    return fn(session)
            except IntegrityError:
                if not retry_conflicts or attempt == attempts:
                    raise
                log.info("concurrent insert of the same row, retrying (attempt %d/%d)", attempt, attempts)
                time.sleep(delay)
            except OperationalError as exc:
                text = str(exc.orig).lower() if exc.orig else str(exc).lower()
                transient = "locked" in text or "busy" in text or "deadlock" in text or "could not serialize" in text
                if not transient or attempt == attempts:
                    raise
                log.warning("database busy (%s), retrying in %.2f s (attempt %d/%d)", text[:60], delay, attempt, attempts)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        self.engine.dispose()
